"""Sphinx configuration for the rst_optax documentation (`make docs`).

The build is offline (no intersphinx) and runs with warnings as errors.
"""

import os
import sys

sys.path.insert(0, os.path.abspath('..'))

import rst_optax  # noqa: E402

project = 'rst_optax'
author = 'The rst_optax authors'
copyright = 'The rst_optax authors'
release = rst_optax.__version__
version = release

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
]

source_suffix = {'.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build', 'conftest.py', 'Thumbs.db', '.DS_Store']

# Markdown pages.
myst_enable_extensions = ['colon_fence', 'dollarmath']
myst_heading_anchors = 3

# API reference from the Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # 'Attributes:' as a field list, no duplicate entries
napoleon_attr_annotations = False  # the docstrings say the types in words
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
autodoc_default_options = {'show-inheritance': False}
autosummary_generate = False

html_theme = 'furo'
html_title = f'rst_optax {release}'
html_static_path = []


# Type aliases are plain unions at run time, so autodoc would print them
# expanded (a schedule is a long Callable[[...], ...]); print their names.
def _alias_names():
  import optax
  from sphinx.util import typing as sphinx_typing

  from rst_optax import _types

  aliases = {
      f'optax.{name}': getattr(optax, name)
      for name in ('Schedule', 'ScalarOrSchedule', 'Params')
  }
  try:
    from flax.nnx import filterlib
    aliases['nnx.filterlib.Filter'] = filterlib.Filter
  except ImportError:
    pass
  aliases.update(
      {name: value for name, value in vars(_types).items()
       if name[0].isupper() and not isinstance(value, int)})
  names = {}
  for name, value in aliases.items():
    for mode in ('smart', 'fully-qualified-except-typing'):
      text = sphinx_typing.stringify_annotation(value, mode)
      if text not in ('Any', '~typing.Any') and len(text) > len(name):
        names.setdefault(text, name)
  return sorted(names.items(), key=lambda item: -len(item[0]))


def _shorten(app, what, name, obj, options, signature, return_annotation):
  del app, what, obj, options
  if name.startswith('rst_optax.flax_utils.TrainState'):
    return signature, return_annotation  # Flax's own annotations, as they are
  for long, short in _ALIASES:
    if signature:
      signature = signature.replace(long, short)
    if return_annotation:
      return_annotation = return_annotation.replace(long, short)
  return signature, return_annotation


_ALIASES = _alias_names()


def setup(app):
  app.connect('autodoc-process-signature', _shorten)
