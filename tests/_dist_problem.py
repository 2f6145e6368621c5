"""A small MLP problem shared by the multi-device, multi-process and checkpoint
tests and their worker scripts.

Everything is generated with NumPy on the host, so every process builds the
same arrays whatever its devices. Importing this module has no side effects
beyond importing JAX (the workers set ``XLA_FLAGS`` in their environment).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rst_optax

STEPS = 12
BATCH = 64
DIM, HIDDEN, CLASSES = 16, 32, 4
SEED = 3
SCHEDULE = 0.5
RHO = 0.05
LAM = 1.5


def make_params():
  rng = np.random.default_rng(0)
  return {
      'w1': (rng.standard_normal((DIM, HIDDEN)) / 4).astype(np.float32),
      'b1': np.zeros(HIDDEN, np.float32),
      'w2': (rng.standard_normal((HIDDEN, CLASSES)) / 6).astype(np.float32),
      'b2': np.zeros(CLASSES, np.float32),
  }


def make_data(steps=STEPS):
  """Batches ``x`` of shape (steps, BATCH, DIM), labels ``y`` (steps, BATCH)."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((steps, BATCH, DIM)).astype(np.float32)
  teacher = rng.standard_normal((DIM, CLASSES)).astype(np.float32)
  y = np.argmax(x @ teacher, axis=-1).astype(np.int32)
  return x, y


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  logits = h @ params['w2'] + params['b2']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


grad = jax.grad(loss_fn)


def make_tx(schedule=SCHEDULE, **kwargs):
  return rst_optax.rst(optax.sgd(0.1, momentum=0.9), schedule=schedule,
                       rho=RHO, lam=LAM, seed=SEED, **kwargs)


def global_step(tx, params, state, x, y, take_sam=None):
  """One RST step on the whole batch (for ``jax.jit``, sharded or not)."""
  g = grad(params, x, y)
  updates, state = tx.update(g, state, params, take_sam=take_sam,
                             grad_fn=lambda p: grad(p, x, y))
  return optax.apply_updates(params, updates), state


def took_sam(old_state, new_state):
  """1 if the step from ``old_state`` to ``new_state`` took the SAM branch."""
  return new_state.sam_steps - old_state.sam_steps


@functools.cache
def run_single_device(steps=STEPS, reuse=None, **kwargs):
  """The reference: the jitted step on one device; (params, per-step flags).

  Cached, so the test modules that compare against it share one run.
  ``kwargs`` go to ``make_tx``.
  """
  tx = make_tx(reuse=reuse, **kwargs)
  x, y = make_data(steps)
  params = make_params()
  state = tx.init(params)
  step = jax.jit(lambda p, s, xb, yb: global_step(tx, p, s, xb, yb))
  flags = []
  for t in range(steps):
    params, new_state = step(params, state, x[t], y[t])
    flags.append(int(took_sam(state, new_state)))
    state = new_state
  return jax.tree.map(np.asarray, params), np.array(flags, bool)
