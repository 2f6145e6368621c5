"""What the README, Getting started, CITATION.cff and pyproject.toml say agrees.

One version, one statement of the tested Python versions (the classifiers
and the CI stages), and an install that works from a clone.
"""

import pathlib
import re
import tomllib

import rst_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _read(name: str) -> str:
  return (ROOT / name).read_text(encoding='utf-8')


def test_citation_and_changelog_carry_the_package_version():
  version = rst_optax.__version__
  cff = re.search(r'^version:\s*(\S+)$', _read('CITATION.cff'), re.M)
  assert cff and cff.group(1) == version
  assert f'version = {{{version}}}' in _read('docs/citing.md')
  # A development version (0.2.0.dev0) is the release's, unreleased.
  release, dev, _ = version.partition('.dev')
  heading = (rf'^## {re.escape(release)} \(unreleased\)$' if dev
             else rf'^## {re.escape(version)} \(\d{{4}}-\d\d-\d\d\)$')
  assert re.search(heading, _read('CHANGELOG.md'), re.M)
  pyproject = tomllib.loads(_read('pyproject.toml'))['project']
  assert 'version' in pyproject['dynamic']  # rst_optax.__version__ is it


def test_classifiers_name_the_python_versions_ci_tests():
  project = tomllib.loads(_read('pyproject.toml'))['project']
  classified = sorted(
      c.rsplit(' ', 1)[-1] for c in project['classifiers']
      if re.fullmatch(r'Programming Language :: Python :: 3\.\d+', c))
  # CI: make test and make test-min on the Makefile's python3 (3.11), make
  # test-py313 on 3.13.
  assert classified == ['3.11', '3.13']
  makefile = _read('Makefile')
  assert 'PYENV_VERSION=3.13' in makefile
  assert project['requires-python'] == '>=3.11'
  for page in ('README.md', 'docs/getting_started.md'):
    assert 'Python 3.11 and 3.13' in ' '.join(_read(page).split()), page


def test_install_is_from_a_clone_and_says_the_index_does_not_have_it():
  for page in ('README.md', 'docs/getting_started.md'):
    text = _read(page)
    assert 'not yet on the package index' in text, page
    assert 'pip install .  ' in text and 'pip install ".[flax]"' in text, page
    assert 'pip install rst_optax' not in text, page
    assert '[flax]"' not in text.replace('".[flax]"', ''), page
