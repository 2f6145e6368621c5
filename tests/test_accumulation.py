"""Gradient accumulation with RST: the recipe with ``optax.microbatch`` and
what ``optax.MultiSteps(rst(...), k)`` does.

Recipe (recommended): accumulate *both* gradients inside the step,
``acc_grad = optax.microbatch(grad, argnums=(1, 2), microbatch_size=m,
accumulator=MEAN)``, ``g = acc_grad(params, x, y)`` and
``grad_fn = lambda p: acc_grad(p, x, y)``: the step is the full-batch RST step,
and the k micro-batch passes of ``grad_fn`` run on SAM steps only.

``optax.MultiSteps(rst(...), k)``: rst's count advances once per outer step,
so one coin per outer step; the perturbation uses the accumulated gradient,
but ``grad_fn`` is the one passed at the last micro-step (its micro-batch
only), and MultiSteps runs the inner update at every micro-step, so
``grad_fn`` runs on all k micro-steps of a SAM outer step (k - 1 of them
discarded) and on none of a base outer step.
"""

import functools

import _dist_problem as prob
import jax
import numpy as np
import optax
import pytest

import rst_optax

K = 4  # micro-batches per step
MICRO = prob.BATCH // K
OUTER_STEPS = 6
SEED = 0  # decisions over 6 steps: [0 1 0 1 1 0]
LR = 0.1


def make_rst(base=None):
  base = optax.sgd(LR, momentum=0.9) if base is None else base
  return rst_optax.rst(base, schedule=0.5, rho=prob.RHO, lam=prob.LAM,
                       seed=SEED)


@functools.cache
def decisions():
  want = rst_optax.decisions(0.5, SEED, 0, OUTER_STEPS)
  assert 0 < want.sum() < OUTER_STEPS
  return want


class CallLog:
  """Records, from inside jitted code, which micro-batch gradients ran."""

  def __init__(self):
    self.calls = []

  def grad(self, params, x, y, tag):
    jax.debug.callback(lambda t: self.calls.append(int(t)), tag)
    return prob.grad(params, x, y)

  def read(self):
    jax.effects_barrier()
    return self.calls


def microbatched_and_full_steps(tx, grad):
  """Two jitted steps of ``tx``: on the mean of ``grad`` over micro-batches
  of ``MICRO`` (``optax.microbatch``, ``grad_fn`` too) and on the full batch."""
  acc_grad = optax.microbatch(
      grad, argnums=(1, 2), microbatch_size=MICRO,
      accumulator=optax.microbatching.AccumulationType.MEAN)

  @jax.jit
  def accumulated_step(params, state, xb, yb):
    g = acc_grad(params, xb, yb)
    updates, state = tx.update(g, state, params,
                               grad_fn=lambda p: acc_grad(p, xb, yb))
    return optax.apply_updates(params, updates), state

  full_step = jax.jit(lambda p, s, xb, yb: prob.global_step(tx, p, s, xb, yb))
  return accumulated_step, full_step


@pytest.mark.skipif(not hasattr(optax, 'microbatch'),
                    reason='optax.microbatch first appeared in Optax 0.2.7')
def test_microbatch_recipe_equals_the_full_batch_step():
  x, y = prob.make_data(OUTER_STEPS)
  tx = make_rst()
  log = CallLog()
  accumulated_step, full_step = microbatched_and_full_steps(
      tx, lambda p, xb, yb: log.grad(p, xb, yb, 0))
  params = full = prob.make_params()
  state = full_state = tx.init(params)
  for t in range(OUTER_STEPS):
    params, state = accumulated_step(params, state, x[t], y[t])
    full, full_state = full_step(full, full_state, x[t], y[t])
  for key in full:
    np.testing.assert_allclose(params[key], full[key], rtol=1e-5, atol=1e-6)
  assert int(state.sam_steps) == decisions().sum()
  # K passes for g every step, K more for g_sam on SAM steps only.
  assert len(log.read()) == K * (OUTER_STEPS + decisions().sum())


@pytest.fixture(scope='module')
def multisteps_run():
  """MultiSteps(rst, K) over OUTER_STEPS * K micro-steps; the grad_fn of
  micro-step i logs i when it runs."""
  x, y = prob.make_data(OUTER_STEPS)
  micro_x = jax.device_put(x.reshape(OUTER_STEPS * K, MICRO, prob.DIM))
  micro_y = jax.device_put(y.reshape(OUTER_STEPS * K, MICRO))
  tx = optax.MultiSteps(make_rst(), K)
  log = CallLog()

  @jax.jit
  def micro_step(params, state, i):
    xb, yb = micro_x[i], micro_y[i]
    updates, state = tx.update(
        prob.grad(params, xb, yb), state, params,
        grad_fn=lambda p: log.grad(p, xb, yb, i))
    return optax.apply_updates(params, updates), state, updates

  params = prob.make_params()
  state = tx.init(params)
  history = []
  for i in range(OUTER_STEPS * K):
    before = params
    params, state, updates = micro_step(params, state, i)
    history.append((before, updates))
  return state, history, log.read(), (micro_x, micro_y)


def test_multisteps_draws_one_coin_per_outer_step(multisteps_run):
  state, _, _, _ = multisteps_run
  inner = state.inner_opt_state
  assert int(state.gradient_step) == OUTER_STEPS
  assert int(inner.count) == OUTER_STEPS
  assert int(inner.sam_steps) == decisions().sum()


def test_multisteps_runs_grad_fn_only_in_sam_outer_steps(multisteps_run):
  _, _, calls, _ = multisteps_run
  want = [i for i in range(OUTER_STEPS * K) if decisions()[i // K]]
  assert sorted(calls) == want  # every micro-step of a SAM step, no other


def test_multisteps_update_uses_accumulated_g_and_last_micro_batch_g_sam(
    multisteps_run):
  """At the last micro-step: d = (1 - lam) mean(g_i) + lam g_sam, where the
  perturbation follows mean(g_i) but g_sam is the last micro-batch's only."""
  _, history, _, (micro_x, micro_y) = multisteps_run

  @jax.jit
  def directions(params, xs, ys):
    """(base, SAM) directions by hand from the K micro-batches xs, ys."""
    g = jax.tree.map(lambda a: a.mean(0),
                     jax.vmap(prob.grad, in_axes=(None, 0, 0))(params, xs, ys))
    scale = prob.RHO / optax.tree.norm(g)
    g_sam = prob.grad(optax.tree.add_scale(params, scale, g), xs[-1], ys[-1])
    return g, jax.tree.map(lambda a, b: (1 - prob.LAM) * a + prob.LAM * b,
                           g, g_sam)

  momentum = None
  for outer, take in enumerate(decisions()):
    first, last = outer * K, outer * K + K - 1
    for i in range(first, last):  # no update before the last micro-step
      for leaf in jax.tree.leaves(history[i][1]):
        assert not np.any(leaf)
    base, sam = directions(history[first][0], micro_x[first:last + 1],
                           micro_y[first:last + 1])
    direction = sam if take else base
    momentum = direction if momentum is None else jax.tree.map(
        lambda d, m: d + 0.9 * m, direction, momentum)
    got = history[last][1]
    for key in got:
      np.testing.assert_allclose(got[key], -LR * momentum[key], rtol=1e-4,
                                 atol=1e-6, err_msg=f'step {outer}, {key}')


@pytest.mark.parametrize('schedule', [0.0, 1.0], ids=['base', 'sam'])
def test_multisteps_differs_from_the_full_batch_step_on_sam_steps(schedule):
  """Why the README recommends the microbatch recipe: the accumulated base
  step is the full-batch step, the accumulated SAM step is not (its g_sam
  sees one micro-batch)."""
  x, y = prob.make_data(1)
  micro_x = x[0].reshape(K, MICRO, prob.DIM)
  micro_y = y[0].reshape(K, MICRO)
  params = prob.make_params()
  make = lambda: rst_optax.rst(optax.sgd(LR), schedule=schedule, rho=prob.RHO,
                               lam=prob.LAM)

  @jax.jit
  def accumulate_then_full(params):
    multi = optax.MultiSteps(make(), K)
    state = multi.init(params)
    for xi, yi in zip(micro_x, micro_y, strict=True):
      updates, state = multi.update(
          prob.grad(params, xi, yi), state, params,
          grad_fn=lambda p, xi=xi, yi=yi: prob.grad(p, xi, yi))
    tx = make()
    full, _ = tx.update(prob.grad(params, x[0], y[0]), tx.init(params),
                        params, grad_fn=lambda p: prob.grad(p, x[0], y[0]))
    return updates, full

  updates, full = accumulate_then_full(params)
  same = np.allclose(updates['w1'], full['w1'], rtol=1e-4, atol=1e-7)
  assert same == (schedule == 0.0)


# --- With reuse (LookSAM) -------------------------------------------------------

ALPHA = 0.5
REUSE_STEPS = 4  # periodic(2): base, SAM, base, SAM


def make_reuse_rst():
  return rst_optax.rst(optax.sgd(LR), schedule=rst_optax.schedules.periodic(2),
                       rho=prob.RHO, lam=prob.LAM, reuse=ALPHA)


def _unit_orthogonal(d, g):
  """u = g_v / ||g_v||, g_v = d - (<d, g> / ||g||^2) g, by hand."""
  coef = optax.tree.vdot(d, g) / optax.tree.vdot(g, g)
  g_v = jax.tree.map(lambda a, b: a - coef * b, d, g)
  return optax.tree.scale(1 / optax.tree.norm(g_v), g_v)


def _sam_direction(params, g, xb, yb):
  """(1 - lam) g + lam g_sam, g_sam on (xb, yb) at the perturbation along g."""
  g_sam = prob.grad(
      optax.tree.add_scale(params, prob.RHO / optax.tree.norm(g), g), xb, yb)
  return jax.tree.map(lambda a, b: (1 - prob.LAM) * a + prob.LAM * b, g, g_sam)


@pytest.mark.skipif(not hasattr(optax, 'microbatch'),
                    reason='optax.microbatch first appeared in Optax 0.2.7')
def test_microbatch_recipe_with_reuse_equals_the_full_batch_step():
  """The recipe keeps the full-batch u, and its base steps reuse it."""
  x, y = prob.make_data(REUSE_STEPS)
  tx = make_reuse_rst()
  accumulated_step, full_step = microbatched_and_full_steps(tx, prob.grad)
  params = full = prob.make_params()
  state = full_state = tx.init(params)
  for t in range(REUSE_STEPS):
    params, state = accumulated_step(params, state, x[t], y[t])
    full, full_state = full_step(full, full_state, x[t], y[t])
    assert optax.tree.norm(full_state.reuse_direction) > 0.5 or t == 0
    for key in full:
      np.testing.assert_allclose(params[key], full[key], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(state.reuse_direction[key],
                                 full_state.reuse_direction[key], atol=1e-5)
  assert int(state.sam_steps) == REUSE_STEPS // 2


def test_multisteps_with_reuse_keeps_u_of_the_last_micro_batch():
  """What numerics.md documents: under MultiSteps the kept u is that of
  (1 - lam) mean(g_i) + lam g_sam against mean(g_i), g_sam the last
  micro-batch's; the next base step is mean(g_i) + alpha ||mean(g_i)|| u.
  That u is not the full-batch u."""
  x, y = prob.make_data(REUSE_STEPS)
  micro_x = x.reshape(REUSE_STEPS, K, MICRO, prob.DIM)
  micro_y = y.reshape(REUSE_STEPS, K, MICRO)
  multi = optax.MultiSteps(make_reuse_rst(), K)

  @jax.jit
  def micro_step(params, state, xb, yb):
    updates, state = multi.update(prob.grad(params, xb, yb), state, params,
                                  grad_fn=lambda p: prob.grad(p, xb, yb))
    return optax.apply_updates(params, updates), state, updates

  mean_grad = jax.jit(lambda p, xs, ys: jax.tree.map(
      lambda a: a.mean(0), jax.vmap(prob.grad, in_axes=(None, 0, 0))(p, xs,
                                                                      ys)))
  params = prob.make_params()
  state = multi.init(params)
  for t in range(3):  # base, SAM, base
    start = params
    for i in range(K):
      params, state, updates = micro_step(params, state, micro_x[t, i],
                                          micro_y[t, i])
    g = mean_grad(start, micro_x[t], micro_y[t])
    if t == 1:
      d = _sam_direction(start, g, micro_x[t, -1], micro_y[t, -1])
      u = _unit_orthogonal(d, g)
      got = state.inner_opt_state.reuse_direction
      for key in u:
        np.testing.assert_allclose(got[key], u[key], atol=2e-5)
      full_g = prob.grad(start, x[t], y[t])
      u_full = _unit_orthogonal(
          _sam_direction(start, full_g, x[t], y[t]), full_g)
      assert float(optax.tree.vdot(u, u_full)) < 0.9  # mostly noise
    if t == 2:
      want = optax.tree.scale(
          -LR, optax.tree.add_scale(g, ALPHA * optax.tree.norm(g), u))
      for key in want:
        np.testing.assert_allclose(updates[key], want[key], rtol=1e-4,
                                   atol=1e-7)
