"""The runner of the documentation's code blocks (docs/conftest.py) and the README.

The pages themselves run as tests when pytest collects ``docs/``; these tests
check that the runner does run them, reports a failing block with its page
and line, skips only the ``notest`` blocks that say why, and that the README's
quick start is the tested one of ``docs/getting_started.md``.
"""

import importlib.util
import pathlib
import shutil
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'


def _runner():
  spec = importlib.util.spec_from_file_location(
      'docs_runner', DOCS / 'conftest.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_parse_blocks_reads_language_options_and_code():
  page = textwrap.dedent('''\
      Text.

      ```python notest
      # Not run by the docs tests: needs a GPU.
      x = 1
      ```

      ````markdown
      ```python
      inside = 'a fence inside a longer fence is not a block'
      ```
      ````

      ~~~py
      y = 2
      ~~~

      ```sh
      make docs
      ```
      ''')
  blocks = _runner().parse_blocks(page)
  assert [(b.language, sorted(b.options), b.line) for b in blocks] == [
      ('python', ['notest'], 3), ('markdown', [], 8), ('py', [], 14),
      ('sh', [], 18)]
  assert blocks[0].code == '# Not run by the docs tests: needs a GPU.\nx = 1\n'
  assert blocks[2].code == 'y = 2\n'


def test_every_page_with_python_code_is_collected():
  runner = _runner()
  pages = sorted(p.name for p in DOCS.glob('*.md') if runner.python_blocks(p))
  assert 'getting_started.md' in pages
  assert len(runner.prelude()) == 1  # the quick start's data and model


def test_readme_quick_start_is_the_tested_one():
  runner = _runner()
  readme = [b.code for b in runner.python_blocks(ROOT / 'README.md')]
  tested = [b.code for b in runner.python_blocks(DOCS / 'getting_started.md')
            if 'notest' not in b.options]
  assert readme, 'README.md has no python block'
  for code in readme:
    assert code in tested, (
        'a python block of README.md is not a tested block of '
        f'docs/getting_started.md:\n{code}')


def test_runner_runs_blocks_reports_failures_and_checks_notest(tmp_path):
  shutil.copy(DOCS / 'conftest.py', tmp_path / 'conftest.py')
  (tmp_path / 'getting_started.md').write_text(
      '```python prelude\nshared = 41\n```\n')
  (tmp_path / 'good.md').write_text(textwrap.dedent('''\
      ```python
      value = shared + 1
      ```

      ```python notest
      # Not run by the docs tests: it would fail.
      raise SystemExit('a notest block ran')
      ```

      ```python
      assert value == 42
      ```
      '''))
  (tmp_path / 'bad.md').write_text(
      'Intro.\n\n```python\nok = 1\n```\n\n```python\n1 / 0\n```\n')
  (tmp_path / 'unmarked.md').write_text(
      '```python notest\nimport gpu_only_module\n```\n')
  (tmp_path / 'shell_only.md').write_text('```sh\nexit 1\n```\n')
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-rA',
       '-o', 'addopts=', str(tmp_path)],
      cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
  out = result.stdout + result.stderr
  assert 'PASSED good.md::code_blocks' in out, out
  assert 'PASSED getting_started.md::code_blocks' in out, out
  assert 'FAILED bad.md::code_blocks - bad.md:7: ZeroDivisionError' in out, out
  assert 'FAILED unmarked.md::code_blocks - unmarked.md:1: a "python notest"' in out
  assert 'shell_only' not in out, out
  assert '2 failed, 2 passed' in out, out
