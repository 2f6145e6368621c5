"""LookSAM written out by hand, and checks shared by the reuse tests.

The reference for ``rst(..., reuse=alpha, reuse_window=k)``
(tests/test_reuse.py, tests/test_reuse_window.py): SAM on the planned steps,
and on a base step ``g + alpha ||g|| / ||g_v|| g_v`` with ``g_v`` the part of
the last SAM direction orthogonal to its gradient.
"""

import jax
import numpy as np
import optax

import rst_optax

RHO, ALPHA, LR = 0.1, 0.7, 0.05


def reuses(plan, window=None):
  """Which steps of ``plan`` reuse: base steps at most ``window`` steps after
  the last SAM step (all base steps after the first SAM step for None)."""
  out, last = [], None
  for t, take in enumerate(plan):
    out.append(not take and last is not None
               and (window is None or t - last <= window))
    if take:
      last = t
  return np.array(out)


def looksam_by_hand(params, loss_fn, plan, window=None, *, rho=RHO,
                    alpha=ALPHA, lam=1.0, base=None):
  """LookSAM written out (SGD with momentum unless ``base``): SAM on the
  steps of ``plan``, and reuse on the base steps that ``reuses`` selects."""
  base = base or optax.sgd(LR, momentum=0.9)
  grad = jax.grad(loss_fn)
  state, g_v = base.init(params), None
  for take, reuse in zip(plan, reuses(plan, window), strict=True):
    g = grad(params)
    if take:
      e = optax.tree.scale(rho / (optax.tree.norm(g) + 1e-12), g)
      g_s = grad(optax.tree.add(params, e))
      d = optax.tree.add_scale(g, lam, optax.tree.sub(g_s, g))
      g_v = optax.tree.add_scale(
          d, -optax.tree.vdot(d, g) / optax.tree.vdot(g, g), g)
    elif reuse:
      d = optax.tree.add_scale(
          g, alpha * optax.tree.norm(g) / optax.tree.norm(g_v), g_v)
    else:
      d = g
    updates, state = base.update(d, state, params)
    params = optax.apply_updates(params, updates)
  return params


def assert_same_bits(a, b):
  """The trees hold the same bits (``-0.0`` differs from ``0.0``)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))


def run_cond_and_host(tx, params, loss_fn, steps=30):
  """``steps`` steps of ``tx`` jitted (in-graph cond) and under host
  dispatch, from the same start: the two final (params, state), and each
  step's ``last_sam_step`` of both (None without a window)."""
  grad = jax.grad(loss_fn)

  def train_step(params, state, take_sam=None):
    updates, state = tx.update(grad(params), state, params, grad_fn=grad,
                               take_sam=take_sam)
    return optax.apply_updates(params, updates), state

  cond_step, host_step = jax.jit(train_step), rst_optax.HostDispatch(
      train_step, tx, check_every=5)
  cond = host = (params, tx.init(params))
  lasts = []
  for _ in range(steps):
    cond = cond_step(*cond)
    host = host_step(*host)
    lasts.append([getattr(s, 'last_sam_step', None)
                  for s in (cond[1], host[1])])
  return cond, host, np.array(lasts)
