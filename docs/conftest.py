"""Runs the Python code of the documentation pages, so the docs cannot rot.

Every fenced block opened with ```` ```python ```` in ``docs/*.md`` runs when
pytest collects this folder (``make test`` does). The blocks of one page run
in order, in one namespace, as a reader would paste them into one session;
each page starts from the quick start's first block (``getting_started.md``,
marked ```` ```python prelude ````), so any page may use the ``params``,
``loss_fn``, ``batch`` and ``batches`` defined there.

A block that cannot run on a CPU in seconds (it needs a GPU, several
processes or a data set) is opened with ```` ```python notest ```` and starts
with a comment line ``# Not run by the docs tests: <why>``, so the reader
sees it; the page says so too. Sphinx renders both kinds as Python.
"""

import dataclasses
import pathlib
import re
import traceback

import pytest

DOCS = pathlib.Path(__file__).parent
PRELUDE_PAGE = DOCS / 'getting_started.md'
NOT_RUN_COMMENT = '# Not run by the docs tests:'
# Sphinx's configuration is not a test module (and needs the docs extra).
collect_ignore = ['conf.py']

_FENCE = re.compile(r'^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$')


@dataclasses.dataclass(frozen=True)
class Block:
  """One fenced code block of a page."""

  line: int  # 1-based line of the opening fence
  options: frozenset[str]  # the words after the language
  language: str
  code: str


def parse_blocks(text: str) -> list[Block]:
  """The fenced code blocks of a Markdown page (CommonMark fences)."""
  blocks, lines, i = [], text.splitlines(), 0
  while i < len(lines):
    match = _FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    fence, words = match['fence'], match['info'].split()
    body, j = [], i + 1
    while j < len(lines) and not (
        lines[j].lstrip().startswith(fence)
        and set(lines[j].strip()) == {fence[0]}):
      body.append(lines[j])
      j += 1
    language = words[0] if words else ''
    blocks.append(Block(i + 1, frozenset(words[1:]), language,
                        '\n'.join(body) + '\n'))
    i = j + 1
  return blocks


def python_blocks(path: pathlib.Path) -> list[Block]:
  return [b for b in parse_blocks(path.read_text(encoding='utf-8'))
          if b.language in ('python', 'py', 'python3')]


def prelude() -> list[Block]:
  return [b for b in python_blocks(PRELUDE_PAGE) if 'prelude' in b.options]


class DocsPageError(Exception):
  """A block of a page failed; the message names the page and the line."""


class MarkdownPage(pytest.File):
  """A documentation page: one test that runs its Python blocks in order."""

  def collect(self):
    if any(b.language in ('python', 'py', 'python3')
           for b in parse_blocks(self.path.read_text(encoding='utf-8'))):
      yield MarkdownPageItem.from_parent(self, name='code_blocks')


class MarkdownPageItem(pytest.Item):
  """Runs the page's ``python`` blocks; checks its ``notest`` blocks' reason."""

  def runtest(self):
    blocks = python_blocks(self.path)
    for block in blocks:
      if 'notest' in block.options:
        first = block.code.lstrip('\n').splitlines()[0] if block.code.strip() else ''
        if not first.startswith(NOT_RUN_COMMENT):
          raise DocsPageError(
              f'{self.path.name}:{block.line}: a "python notest" block must '
              f'start with a line "{NOT_RUN_COMMENT} <why>"')
    namespace = {'__name__': f'docs_{self.path.stem}'}
    to_run = [b for b in blocks if 'notest' not in b.options]
    if self.path != PRELUDE_PAGE:
      to_run = [*prelude(), *to_run]
    for block in to_run:
      # Pad with blank lines so tracebacks point at the page's own lines.
      source = '\n' * block.line + block.code
      where = self.path if block in blocks else PRELUDE_PAGE
      try:
        exec(compile(source, str(where), 'exec'), namespace)
      except Exception as error:
        raise DocsPageError(
            f'{where.name}:{block.line}: {type(error).__name__}: {error}'
        ) from error

  def repr_failure(self, excinfo, style=None):
    error = excinfo.value
    if isinstance(error, DocsPageError) and error.__cause__ is not None:
      cause = error.__cause__
      # Drop this file's exec frame: the traceback starts in the page.
      lines = traceback.format_exception(
          type(cause), cause, cause.__traceback__.tb_next)
      return f'{error}\n\n' + ''.join(lines)
    if isinstance(error, DocsPageError):
      return str(error)
    return super().repr_failure(excinfo, style=style)

  def reportinfo(self):
    return self.path, 0, f'{self.path.name}: code blocks'


def pytest_collect_file(file_path, parent):
  if file_path.suffix == '.md' and file_path.parent == DOCS:
    return MarkdownPage.from_parent(parent, path=file_path)
  return None
