"""Sphinx configuration for the rst_optax documentation (`make docs`).

The build is offline (no intersphinx) and runs with warnings as errors; the
site it makes loads nothing from outside (MathJax ships with it, from the
sphinx-mathjax-offline package), which tests/test_docs_site.py checks.
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
    'sphinx-mathjax-offline',  # MathJax 3 in _static/mathjax, no CDN
    'sphinx.ext.viewcode',  # [source] links
    'sphinx_copybutton',
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
autodoc_default_options: dict[str, object] = {}  # no 'Bases: object' lines
autosummary_generate = False
# Type aliases print as their short names (``Seed``), linked to their entries.
python_use_unqualified_type_names = True

# Copy buttons leave out the prompts of the docstrings' examples.
copybutton_prompt_text = r'>>> |\.\.\. '
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = False

html_theme = 'furo'
html_title = f'rst_optax {release}'
html_static_path = ['_static']
html_css_files = ['custom.css']  # layout fixes: display math, wide tables


# Type aliases are plain unions at run time, so autodoc would print them
# expanded (a schedule is a long Callable[[...], ...]); print their names.
# Ours (rst_optax.ScalarOrSchedule, ...) are documented on the API page and
# come first, so that they win over Optax's names for the same union.
OUR_ALIASES = ('ScalarOrSchedule', 'Seed', 'GradFn')
# Short unions that other annotations share (Flax's ``step: int | Array`` is
# no seed; Optax's one pytree alias serves params, updates and states): these
# are named only as the annotation of the parameters listed.
_BY_PARAMETER = {
    'seed': 'rst_optax.Seed',
    'opt_state': 'optax.OptState', 'base_state': 'optax.OptState',
    'grads': 'optax.Updates', 'updates': 'optax.Updates',
}


def _texts(value):
  """The ways autodoc may print the annotation ``value``."""
  from sphinx.util import typing as sphinx_typing

  return {sphinx_typing.stringify_annotation(value, mode)
          for mode in ('smart', 'fully-qualified-except-typing')}


def _value(name):
  import optax

  import rst_optax

  module, attribute = name.split('.')
  return getattr({'optax': optax, 'rst_optax': rst_optax}[module], attribute)


def _alias_names():
  aliases = [f'rst_optax.{name}' for name in OUR_ALIASES if name != 'Seed']
  aliases += ['optax.Schedule', 'optax.ScalarOrSchedule', 'optax.Params']
  values = {name: _value(name) for name in aliases}
  try:
    from flax.nnx import filterlib
    values['nnx.filterlib.Filter'] = filterlib.Filter
  except ImportError:
    pass
  names = {}
  for name, value in values.items():
    for text in _texts(value):
      if text not in ('Any', '~typing.Any') and len(text) > len(name):
        names.setdefault(text, name)
  return sorted(names.items(), key=lambda item: -len(item[0]))


def _shorten(app, what, name, obj, options, signature, return_annotation):
  del app, what, name, obj, options
  for parameter, (alias, texts) in _PARAMETER_ALIASES.items():
    for long in texts:
      if signature:
        signature = signature.replace(f'{parameter}: {long}',
                                      f'{parameter}: {alias}')
  for long, short in _ALIASES:
    if signature:
      signature = signature.replace(long, short)
    if return_annotation:
      return_annotation = return_annotation.replace(long, short)
  return signature, return_annotation


def _link_aliases(app, env, node, contnode):
  """Links a type alias in a signature to its ``py:type`` entry.

  Annotations are class references, which Sphinx does not resolve to a
  ``py:type`` entry by itself.
  """
  target = node.get('reftarget', '')
  if node.get('refdomain') != 'py' or target.removeprefix(
      'rst_optax.') not in OUR_ALIASES:
    return None
  return env.domains['py'].resolve_xref(
      env, node['refdoc'], app.builder, 'type', target, node, contnode)


_ALIASES = _alias_names()
_PARAMETER_ALIASES = {parameter: (alias, _texts(_value(alias)))
                      for parameter, alias in _BY_PARAMETER.items()}


def _full_size_links(app, doctree):
  """Fits every figure to the page width and links it to its full size.

  Sphinx links an image to its file when a width is set
  (``html_scaled_image_link``); the Markdown images of the included pages
  have none, so they get the page width here.
  """
  del app
  from docutils import nodes

  for image in doctree.findall(nodes.image):
    if not any(key in image for key in ('width', 'height', 'scale')):
      image['width'] = '100%'


def setup(app):
  app.connect('doctree-read', _full_size_links)
  app.connect('autodoc-process-signature', _shorten)
  app.connect('missing-reference', _link_aliases)
