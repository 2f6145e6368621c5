"""The built documentation site: offline, math rendered locally, API complete.

The site is built once per test session (``sphinx -W``, as ``make docs``
does), by the first pytest worker that needs it, into the session's temporary
folder; the other workers wait for it and read the same pages. The build
needs the ``docs`` extra, which ``make test`` installs; the stages that
install only ``dev`` (``make test-min``, ``make test-py313``) skip these
tests, and ``make docs`` builds the site there.
"""

import contextlib
import fcntl
import inspect
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest

pytest.importorskip('sphinx', reason='the docs extra is not installed')
bs4 = pytest.importorskip('bs4', reason='the docs extra is not installed')

import rst_optax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Elements whose attribute the browser loads by itself (links are followed
# only when clicked, so <a href> is not one).
LOADED = {'script': 'src', 'img': 'src', 'iframe': 'src', 'source': 'src',
          'video': 'src', 'audio': 'src', 'embed': 'src', 'object': 'data',
          'link': 'href'}
LATEX = re.compile(r'\\[A-Za-z]{2,}|:math:|\$\$')
MATHJAX = '_static/mathjax/tex-chtml.js'


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path, 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope='session')
def site(tmp_path_factory) -> pathlib.Path:
  """The folder of the built HTML site, built once per session."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # shared by the workers of this run, new for each run
  out, log = base / 'docs_site', base / 'docs_site.log'
  with _locked(base / 'docs_site.lock'):
    if not log.exists():
      result = subprocess.run(
          [sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-W',
           '--keep-going', '-d', str(base / 'docs_doctrees'),
           str(ROOT / 'docs'), str(out)],
          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
      log.write_text(f'{result.returncode}\n{result.stdout}{result.stderr}')
  code, _, output = log.read_text().partition('\n')
  assert code == '0', f'the docs build failed:\n{output}'
  return out


def pages(site: pathlib.Path) -> dict[pathlib.Path, 'bs4.BeautifulSoup']:
  found = {path: bs4.BeautifulSoup(path.read_text(encoding='utf-8'),
                                   'html.parser')
           for path in site.rglob('*.html')}
  assert len(found) > 10, sorted(found)
  return found


def _is_remote(url: str) -> bool:
  parts = urllib.parse.urlsplit(url.strip())
  return bool(parts.netloc) or parts.scheme not in ('', 'data')


def test_no_page_loads_anything_from_outside(site):
  remote = []
  for path, soup in pages(site).items():
    for tag, attribute in LOADED.items():
      for element in soup.find_all(tag):
        url = element.get(attribute)
        if url and _is_remote(url):
          remote.append(f'{path.relative_to(site)}: <{tag} {attribute}={url}>')
  for path in site.rglob('*.css'):
    for url in re.findall(r'(?:url\(|@import)\s*["\']?([^"\')\s;]+)',
                          path.read_text(encoding='utf-8')):
      if _is_remote(url):
        remote.append(f'{path.relative_to(site)}: {url}')
  assert not remote, '\n'.join(remote)


def test_every_page_with_math_loads_the_local_mathjax(site):
  with_math = []
  for path, soup in pages(site).items():
    if not soup.select('.math'):
      continue
    with_math.append(path.name)
    sources = [s['src'] for s in soup.find_all('script', src=True)]
    local = [s for s in sources if s.endswith(MATHJAX) and not _is_remote(s)]
    assert local, f'{path.name} has math but no local MathJax: {sources}'
    assert (path.parent / local[0]).is_file(), local[0]
  assert 'api.html' in with_math, with_math  # the check is not vacuous
  fonts = site / '_static/mathjax/output/chtml/fonts/woff-v2'
  assert any(fonts.glob('*.woff')), 'MathJax fonts missing'


def test_no_raw_latex_outside_math(site):
  raw = []
  for path, soup in pages(site).items():
    if '_modules' in path.parts or path.name in ('genindex.html',
                                                 'search.html'):
      continue  # source listings and indexes, not prose
    for element in soup.select('.math, pre, code, script, style, '
                               'span.pre, .highlight'):
      element.decompose()
    main = soup.find('article') or soup
    for match in LATEX.finditer(main.get_text(' ')):
      raw.append(f'{path.name}: {match.group()!r}')
  assert not raw, '\n'.join(raw)


def _public_objects():
  """(full name, object) of every public name of the package."""
  modules = {'rst_optax': rst_optax}
  for name in ('schedules', 'sharpness', 'flax_utils', 'equinox_utils'):
    modules[f'rst_optax.{name}'] = __import__(f'rst_optax.{name}',
                                              fromlist=['_'])
  for module_name, module in modules.items():
    for name in module.__all__:
      value = getattr(module, name)
      if inspect.ismodule(value):
        continue
      yield f'{module_name}.{name}', value


def _entry_fields(dt) -> set[str]:
  """The names in the field lists (Parameters, Variables) of one entry."""
  dd = dt.find_next_sibling('dd')
  names = set()
  for field_list in dd.find_all('dl', recursive=False):
    if 'field-list' in field_list.get('class', []):
      names.update(s.get_text() for s in field_list.find_all('strong'))
  return names


def test_every_public_name_and_argument_is_on_the_api_page(site):
  soup = pages(site)[site / 'api.html']
  missing = []
  for name, value in _public_objects():
    dt = soup.find(id=name)
    if dt is None:
      missing.append(f'{name}: no entry')
      continue
    if not (inspect.isfunction(value) or inspect.isclass(value)):
      continue
    shown = {em.find(class_='n').get_text() for em in
             dt.find_all('em', class_='sig-param') if em.find(class_='n')}
    described = _entry_fields(dt)
    for parameter in inspect.signature(value).parameters.values():
      star = {parameter.VAR_POSITIONAL: '*', parameter.VAR_KEYWORD: '**'}.get(
          parameter.kind, '')
      if parameter.name not in shown:
        missing.append(f'{name}: {parameter.name} not in the signature')
      if star + parameter.name not in described:
        missing.append(f'{name}: {star}{parameter.name} not described')
  assert not missing, '\n'.join(missing)


def test_every_figure_links_to_its_full_size(site):
  unlinked = []
  for path, soup in pages(site).items():
    for image in soup.select('article img'):
      if image.get('src', '').startswith('_static/'):
        continue  # the theme's icons (the module index's toggles)
      link = image.find_parent('a')
      if link is None or link.get('href') != image.get('src'):
        unlinked.append(f"{path.name}: {image.get('src')}")
  assert not unlinked, '\n'.join(unlinked)


def test_the_benchmarks_page_opens_with_the_results_and_links_each_one(site):
  soup = pages(site)[site / 'benchmarks.html']
  first = soup.find('article').find('section').find('section')
  assert first.find('h2').get_text().startswith('Results at a glance')
  linked = {a['href'].split('#')[0] for a in first.find_all('a', href=True)}
  for page in ('benchmarks_step_cost', 'benchmarks_size_sweep',
               'benchmarks_accuracy', 'benchmarks_label_noise',
               'benchmarks_accelerator'):
    assert f'{page}.html' in linked, linked
    assert (site / f'{page}.html').is_file()
