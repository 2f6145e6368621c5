#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel, check their
# metadata with `twine check --strict`, install the wheel alone (no Flax, no
# Equinox) into a fresh virtual environment and run a jitted step there.
# Usage: .ci/wheel_check.sh PYTHON   (PYTHON has `build` and `twine`; `make wheel-check`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
WORK=$(mktemp -d /tmp/rst_optax_wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "== build: the sdist, then the wheel from it, into $WORK/dist"
"$PY" -m build --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log"; exit 1; }
ls "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/*.whl)
SDIST=$(ls "$WORK"/dist/*.tar.gz)

echo "== twine check --strict"
"$PY" -m twine check --strict "$WHEEL" "$SDIST"

echo "== wheel contents"
"$PY" - "$WHEEL" "$SDIST" <<'PY'
import sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
for required in ('rst_optax/__init__.py', 'rst_optax/py.typed'):
  assert required in names, f'{required} missing from the wheel: {names}'
leaked = [n for n in names if n.split('/')[0] in ('tests', 'examples', 'benchmarks', 'docs')]
assert not leaked, f'the wheel holds files outside the package: {leaked}'
members = tarfile.open(sdist).getnames()
assert any(m.endswith('rst_optax/py.typed') for m in members), 'py.typed missing from the sdist'
print(f'wheel: {len(names)} files, py.typed included; sdist: {len(members)} members')
PY

echo "== install the wheel alone into a fresh venv (pins from constraints.txt)"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
"$WORK/venv/bin/python" -m pip install -q -c constraints.txt "$WHEEL"
"$WORK/venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|optax|chex|numpy|flax|equinox|rst.optax) ' || true

echo "== import and run a jitted step, outside the source tree"
cd "$WORK"
"$WORK/venv/bin/python" - <<'PY'
import importlib
import importlib.metadata
import importlib.util

import jax
import jax.numpy as jnp
import optax

import rst_optax

assert importlib.util.find_spec('flax') is None, 'flax is installed: not a test of the core alone'
assert 'site-packages' in rst_optax.__file__, rst_optax.__file__
assert importlib.metadata.version('rst_optax') == rst_optax.__version__

loss = lambda w, x: jnp.sum((w - x) ** 2)
tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0, lam=2.0, seed=0)

@jax.jit
def step(w, state, x):
  updates, state = tx.update(jax.grad(loss)(w, x), state, w,
                             grad_fn=lambda v: jax.grad(loss)(v, x))
  return optax.apply_updates(w, updates), state

w, state = jnp.zeros(3), tx.init(jnp.zeros(3))
for _ in range(3):
  w, state = step(w, state, jnp.ones(3))
assert int(state.count) == 3 and int(state.sam_steps) == 3, state
assert bool(jnp.all(jnp.isfinite(w))) and float(loss(w, jnp.ones(3))) < 3.0

for helper, extra in (('flax_utils', 'flax'), ('equinox_utils', 'equinox')):
  assert importlib.util.find_spec(extra) is None, f'{extra} is installed'
  try:
    importlib.import_module(f'rst_optax.{helper}')
  except ImportError as error:
    assert f'pip install {extra} ' in str(error), str(error)
    assert f'pip install ".[{extra}]"' in str(error), str(error)
    print(f'import rst_optax.{helper} without {extra}: {type(error).__name__}: {error}')
  else:
    raise AssertionError(f'import rst_optax.{helper} succeeded without {extra}')
print(f'rst_optax {rst_optax.__version__} from the wheel: 3 jitted SAM steps, '
      f'loss {float(loss(w, jnp.ones(3))):.4f}')
PY
echo "== wheel check passed"
