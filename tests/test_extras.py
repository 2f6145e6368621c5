"""The optional helpers: each names the extra to install when its library is
missing, and the core imports without it."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize('library, module, extra', [
    ('flax', 'rst_optax.flax_utils', 'flax'),
    ('equinox', 'rst_optax.equinox_utils', 'equinox'),
])
def test_a_helper_without_its_library_says_how_to_install_it(library, module,
                                                              extra):
  code = ('import sys\n'
          f"sys.modules[{library!r}] = None\n"
          'import rst_optax\n'  # The core needs neither library.
          'try:\n'
          f'  import {module}\n'
          'except ImportError as e:\n'
          '  print(e)\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, timeout=120, check=True).stdout
  # What works before the package is on the index: the library itself, or
  # the extra from a clone.
  assert f'pip install {library} ' in out
  assert f'pip install ".[{extra}]"' in out
