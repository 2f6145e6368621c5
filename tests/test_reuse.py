"""`rst(..., reuse=alpha)`: LookSAM's reuse of the SAM direction.

On a SAM step the part of the direction orthogonal to the gradient is kept;
each later base step adds it back, ``g + alpha ||g|| / ||g_v|| g_v``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _looksam import (
  ALPHA,
  LR,
  RHO,
  assert_same_bits,
  looksam_by_hand,
  run_cond_and_host,
)
from conftest import make_problem

import rst_optax
from rst_optax import schedules


def train(tx, params, loss_fn, steps, grad_fn=None, take=None):
  """``steps`` jitted steps of ``tx`` (the coin, or ``take[t]`` if given);
  returns the final parameters, state and every step's state."""
  grad = jax.grad(loss_fn)
  grad_fn = grad if grad_fn is None else grad_fn

  @jax.jit
  def step(params, state, take_sam):
    updates, state = tx.update(grad(params), state, params, grad_fn=grad_fn,
                               take_sam=take_sam)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  states = []
  for t in range(steps):
    params, state = step(params, state,
                         None if take is None else jnp.asarray(take[t]))
    states.append(state)
  return params, state, states


def unit(tree):
  return optax.tree.scale(1 / optax.tree.norm(tree), tree)


@pytest.mark.parametrize('schedule', ['periodic', 'coin'])
def test_reuse_is_looksam_by_hand_over_50_steps(problem, schedule):
  params, loss_fn = problem
  p = schedules.periodic(5) if schedule == 'periodic' else 0.3
  plan = rst_optax.decisions(p, 0, 0, 50)
  assert 5 < plan.sum() < 45 and not plan[0]
  tx = rst_optax.rst(optax.sgd(LR, momentum=0.9), p, RHO, reuse=ALPHA)
  got, state, _ = train(tx, params, loss_fn, 50)
  want = looksam_by_hand(params, loss_fn, plan)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  assert int(state.sam_steps) == plan.sum()
  # And the reuse matters: without it the run ends elsewhere.
  plain, _, _ = train(rst_optax.rst(optax.sgd(LR, momentum=0.9), p, RHO),
                      params, loss_fn, 50)
  assert not np.allclose(plain['w'], got['w'], rtol=1e-3)


def test_reuse_zero_is_the_plain_transformation(problem):
  """``reuse=0``: the state of old, and a base branch that does nothing."""
  params, loss_fn = problem
  for reuse in (0, 0.0):
    tx = rst_optax.rst(optax.sgd(LR), 0.5, RHO, reuse=reuse)
    state = tx.init(params)
    assert type(state) is rst_optax.RSTState
    jaxpr = jax.make_jaxpr(lambda s, tx=tx: tx.update(
        jax.grad(loss_fn)(params), s, params, grad_fn=jax.grad(loss_fn)))(
            state)
    conds = [e for e in jaxpr.eqns if e.primitive.name == 'cond']
    assert len(conds) == 1
    base_branch = conds[0].params['branches'][0]
    assert not base_branch.jaxpr.eqns  # g passes through untouched


def test_state_holds_one_parameter_sized_buffer_in_parameter_dtypes():
  params = {'a': jnp.ones((3, 2), jnp.bfloat16), 'b': jnp.ones(4, jnp.float16),
            'c': jnp.ones((), jnp.float32)}
  tx = rst_optax.rst(optax.sgd(LR), 0.5, RHO, reuse=ALPHA)
  state = tx.init(params)
  assert type(state) is rst_optax.RSTReuseState
  chex.assert_trees_all_equal_shapes_and_dtypes(state.reuse_direction, params)
  chex.assert_trees_all_equal(state.reuse_direction,
                              optax.tree.zeros_like(params))
  base = rst_optax.rst(optax.sgd(LR), 0.5, RHO).init(params)
  # The fields of RSTState, then the buffer.
  assert rst_optax.RSTReuseState._fields[:4] == rst_optax.RSTState._fields
  assert jax.tree.structure(tuple(state[:4])) == jax.tree.structure(
      tuple(base))


def test_base_steps_before_the_first_sam_step_are_plain(problem):
  params, loss_fn = problem
  plan = np.zeros(6, bool)
  with_reuse, state, _ = train(
      rst_optax.rst(optax.adam(LR), 0.5, RHO, reuse=ALPHA), params, loss_fn,
      6, take=plan)
  plain, _, _ = train(rst_optax.rst(optax.adam(LR), 0.5, RHO), params,
                      loss_fn, 6, take=plan)
  chex.assert_trees_all_equal(with_reuse, plain)
  chex.assert_trees_all_equal(state.reuse_direction,
                              optax.tree.zeros_like(params))


def step_once(tx, params, loss_fn, take_sam, state=None, grad_fn=None,
              g=None):
  """One step of ``tx`` with an identity base: returns (direction, state)."""
  grad_fn = jax.grad(loss_fn) if grad_fn is None else grad_fn
  g = jax.grad(loss_fn)(params) if g is None else g
  state = tx.init(params) if state is None else state
  return jax.jit(lambda s, g: tx.update(g, s, params, grad_fn=grad_fn,
                                        take_sam=take_sam))(state, g)


def test_sam_step_keeps_the_unit_orthogonal_part_and_base_step_adds_it(
    problem):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA)
  g = jax.grad(loss_fn)(params)
  d, state = step_once(tx, params, loss_fn, True)
  g_v = optax.tree.add_scale(d, -optax.tree.vdot(d, g) / optax.tree.vdot(g, g),
                             g)
  # g_v is a difference of nearly parallel vectors: round-off of the order
  # of float32's epsilon times ||d|| / ||g_v||.
  chex.assert_trees_all_close(state.reuse_direction, unit(g_v), atol=1e-5)
  assert abs(float(optax.tree.vdot(state.reuse_direction, g))) < 1e-5 * float(
      optax.tree.norm(g))
  # A base step at other parameters: g2 + alpha ||g2|| u.
  other = jax.tree.map(lambda w: w + 0.3, params)
  g2 = jax.grad(loss_fn)(other)
  d2, state2 = jax.jit(lambda s: tx.update(
      g2, s, other, grad_fn=jax.grad(loss_fn), take_sam=False))(state)
  want = optax.tree.add_scale(g2, ALPHA * optax.tree.norm(g2),
                              state.reuse_direction)
  chex.assert_trees_all_close(d2, want, rtol=1e-6)
  chex.assert_trees_all_equal(state2.reuse_direction, state.reuse_direction)


def test_parallel_direction_keeps_nothing():
  """For a loss whose SAM gradient is parallel to the gradient (a centered
  quadratic), g_v is zero: nothing is reused and base steps stay plain."""
  params = {'w': jnp.array([1.0, -2.0, 0.5])}
  loss_fn = lambda p: 0.5 * jnp.sum(p['w'] ** 2)
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA)
  _, state = step_once(tx, params, loss_fn, True)
  np.testing.assert_array_equal(state.reuse_direction['w'], np.zeros(3))
  d, _ = step_once(tx, params, loss_fn, False, state=state)
  chex.assert_trees_all_equal(d, jax.grad(loss_fn)(params))


@pytest.mark.parametrize('fault', ['g', 'g_sam'])
def test_a_non_finite_sam_step_never_reaches_the_buffer(problem, fault):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA)
  _, good = step_once(tx, params, loss_fn, True)
  assert float(optax.tree.norm(good.reuse_direction)) > 0.5
  g = jax.grad(loss_fn)(params)
  grad_fn = jax.grad(loss_fn)
  if fault == 'g':
    g = {'w': g['w'].at[0].set(jnp.nan), 'b': g['b']}
  else:
    grad_fn = lambda p: jax.tree.map(lambda a: a * jnp.nan, jax.grad(loss_fn)(p))
  _, state = step_once(tx, params, loss_fn, True, state=good, g=g,
                       grad_fn=grad_fn)
  for leaf in jax.tree.leaves(state.reuse_direction):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  # The next base step is then the plain step.
  d, _ = step_once(tx, params, loss_fn, False, state=state)
  chex.assert_trees_all_equal(d, jax.grad(loss_fn)(params))


def test_a_non_finite_base_gradient_stays_non_finite_only_where_it_is(problem):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA)
  _, state = step_once(tx, params, loss_fn, True)
  g = jax.grad(loss_fn)(params)
  g = {'w': g['w'].at[1].set(jnp.inf), 'b': g['b']}
  d, _ = step_once(tx, params, loss_fn, False, state=state, g=g)
  chex.assert_trees_all_equal(d, g)  # no NaN spread over the other entries
  g = {'w': g['w'].at[0].set(-0.0), 'b': jnp.array(-0.0, jnp.float32)}
  d, _ = step_once(tx, params, loss_fn, False, state=state, g=g)
  assert_same_bits(d, g)  # g itself, negative zeros included


@pytest.mark.parametrize('alpha', [-1.0, float('nan'), 0.0])
def test_a_schedule_value_at_or_below_zero_or_nan_reuses_nothing(problem,
                                                                 alpha):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.identity(), 0.5, RHO,
                     reuse=lambda t: jnp.where(t == 0, ALPHA, alpha))
  _, state = step_once(tx, params, loss_fn, True)
  d, _ = step_once(tx, params, loss_fn, False, state=state)
  chex.assert_trees_all_equal(d, jax.grad(loss_fn)(params))
  # g itself, bit for bit: negative zeros stay negative
  g = jax.tree.map(lambda x: jnp.full_like(x, -0.0), params)
  d, _ = step_once(tx, params, loss_fn, False, state=state, g=g)
  assert_same_bits(d, g)
  assert any(bool(jnp.any(u > 0)) for u in jax.tree.leaves(
      state.reuse_direction))  # adding 0 * u would give +0.0 there


def test_reuse_schedule_is_evaluated_at_the_step(problem):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.identity(), 0.5, RHO,
                     reuse=optax.linear_schedule(0.0, 2.0, 2))
  _, state = step_once(tx, params, loss_fn, True)  # step 0
  d, _ = step_once(tx, params, loss_fn, False, state=state)  # step 1: 1.0
  g = jax.grad(loss_fn)(params)
  want = optax.tree.add_scale(g, 1.0 * optax.tree.norm(g),
                              state.reuse_direction)
  chex.assert_trees_all_close(d, want, rtol=1e-6)


def test_grst_keeps_the_direction_it_takes(problem):
  """With lam, the kept vector is the unit orthogonal part of the mixed
  direction. For lam > 0 it is the same unit vector as g_sam's (the mixed
  part is lam times it), for lam < 0 its opposite."""
  params, loss_fn = problem
  kept = {}
  for lam in (1.0, 2.0, 0.5, -1.0):
    tx = rst_optax.rst(optax.identity(), 0.5, RHO, lam=lam, reuse=ALPHA)
    _, state = step_once(tx, params, loss_fn, True)
    kept[lam] = state.reuse_direction
  for lam in (2.0, 0.5):
    chex.assert_trees_all_close(kept[lam], kept[1.0], rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(kept[-1.0], optax.tree.scale(-1.0, kept[1.0]),
                              rtol=1e-4, atol=1e-6)


def test_grst_reuse_is_looksam_by_hand(problem):
  params, loss_fn = problem
  plan = rst_optax.decisions(schedules.periodic(4), 0, 0, 30)
  tx = rst_optax.rst(optax.sgd(LR, momentum=0.9), schedules.periodic(4), RHO,
                     lam=2.0, reuse=ALPHA)
  got, _, _ = train(tx, params, loss_fn, 30)
  want = looksam_by_hand(params, loss_fn, plan, lam=2.0)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_mask_reuses_on_the_selected_leaves_with_their_norms():
  params, loss_fn = make_problem()
  params = params | {'v': jnp.array([0.4, -0.2])}
  full_loss = lambda p: loss_fn({'w': p['w'], 'b': p['b']}) + jnp.sum(
      jnp.sin(p['v'] * p['w'][:2]))
  mask = {'w': True, 'b': False, 'v': True}
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA, mask=mask)
  g = jax.grad(full_loss)(params)
  d, state = step_once(tx, params, full_loss, True)
  assert isinstance(state.reuse_direction['b'], optax.MaskedNode)
  sel = lambda t: {'w': t['w'], 'v': t['v']}
  g_v = optax.tree.add_scale(
      sel(d), -optax.tree.vdot(sel(d), sel(g)) / optax.tree.vdot(sel(g),
                                                                sel(g)),
      sel(g))
  chex.assert_trees_all_close(sel(state.reuse_direction), unit(g_v),
                              rtol=1e-5, atol=1e-7)
  d2, _ = step_once(tx, params, full_loss, False, state=state)
  want = optax.tree.add_scale(sel(g), ALPHA * optax.tree.norm(sel(g)),
                              sel(state.reuse_direction))
  chex.assert_trees_all_close(sel(d2), want, rtol=1e-6)
  chex.assert_trees_all_equal(d2['b'], g['b'])  # left out: plain


def test_adaptive_reuses_the_asam_direction(problem):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA, adaptive=True)
  asam = rst_optax.rst(optax.identity(), 1.0, RHO, adaptive=True)
  g = jax.grad(loss_fn)(params)
  d_asam, _ = step_once(asam, params, loss_fn, True)
  _, state = step_once(tx, params, loss_fn, True)
  g_v = optax.tree.add_scale(
      d_asam, -optax.tree.vdot(d_asam, g) / optax.tree.vdot(g, g), g)
  chex.assert_trees_all_close(state.reuse_direction, unit(g_v), rtol=1e-5,
                              atol=1e-7)


@pytest.mark.parametrize('scale', [1e-30, 1e30, 2e-30, 2e30])
def test_reuse_is_overflow_and_underflow_safe(scale):
  """Gradients whose squares over- or underflow float32 still reuse (the
  largest entries 6e30 and 6e-30 have odd binary exponents, 3e30 and 3e-30
  even ones)."""
  g = {'w': jnp.array([3.0, -1.0, 2.0]) * scale}
  g_sam = {'w': jnp.array([2.0, 1.0, 2.5]) * scale}
  params = {'w': jnp.zeros(3)}
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA)
  _, state = jax.jit(lambda s: tx.update(
      g, s, params, grad_fn=lambda p: g_sam, take_sam=True))(tx.init(params))
  g64, s64 = (np.asarray(t['w'], np.float64) / scale for t in (g, g_sam))
  v = s64 - s64 @ g64 / (g64 @ g64) * g64
  np.testing.assert_allclose(state.reuse_direction['w'],
                             v / np.linalg.norm(v), rtol=1e-5)
  d, _ = jax.jit(lambda s: tx.update(
      g, s, params, grad_fn=lambda p: g_sam, take_sam=False))(state)
  want = (g64 + ALPHA * np.linalg.norm(g64) * v / np.linalg.norm(v)) * scale
  np.testing.assert_allclose(d['w'], want, rtol=1e-5)


def test_host_dispatch_and_cond_are_identical_with_reuse():
  params, loss_fn = make_problem()
  tx = rst_optax.rst(optax.sgd(LR, momentum=0.9), 0.3, RHO, reuse=ALPHA,
                     seed=2)
  cond, host, _ = run_cond_and_host(tx, params, loss_fn)
  chex.assert_trees_all_equal(cond, host)
  assert 3 < int(host[1].sam_steps) < 27
  assert float(optax.tree.norm(host[1].reuse_direction)) > 0.5


def test_host_dispatch_and_cond_agree_to_rounding_with_adam_and_reuse():
  # Two compiled programs: with Adam XLA rounds a few operations
  # differently, and reuse magnifies the last bits (docs/dispatch.md).
  params, loss_fn = make_problem(key=2, d=40)
  tx = rst_optax.rst(optax.adam(1e-2), 0.3, RHO, reuse=0.7, seed=2)
  cond, host, _ = run_cond_and_host(tx, params, loss_fn)
  assert int(cond[1].sam_steps) == int(host[1].sam_steps) > 3
  chex.assert_trees_all_close(cond[0], host[0], rtol=1e-3, atol=1e-4)
  chex.assert_trees_all_close(cond[1].reuse_direction,
                              host[1].reuse_direction, rtol=1e-3, atol=1e-3)
  moved = optax.tree.norm(optax.tree.sub(cond[0], params))
  gap = optax.tree.norm(optax.tree.sub(cond[0], host[0]))
  assert gap < 1e-3 * moved


def test_apply_if_finite_inside_skips_a_faulty_step_with_reuse(problem):
  params, loss_fn = problem
  base = optax.apply_if_finite(optax.sgd(LR), 3)
  tx = rst_optax.rst(base, 0.5, RHO, reuse=ALPHA)
  _, state = step_once(tx, params, loss_fn, True)
  g = jax.grad(loss_fn)(params)
  bad = {'w': g['w'].at[0].set(jnp.nan), 'b': g['b']}
  updates, after = step_once(tx, params, loss_fn, False, state=state, g=bad)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))  # skipped
  assert int(after.base_state.notfinite_count) == 1
  chex.assert_trees_all_equal(after.reuse_direction, state.reuse_direction)


def test_inject_hyperparams_sets_reuse(problem):
  params, loss_fn = problem
  tx = optax.inject_hyperparams(rst_optax.rst)(
      optax.identity(), schedule=0.5, rho=RHO, reuse=ALPHA)
  state = tx.init(params)
  assert type(state.inner_state) is rst_optax.RSTReuseState
  grad_fn = jax.grad(loss_fn)
  g = grad_fn(params)
  update = jax.jit(lambda s, take: tx.update(g, s, params, grad_fn=grad_fn,
                                             take_sam=take))
  _, state = update(state, jnp.asarray(True))
  state.hyperparams['reuse'] = jnp.asarray(1.5)
  d, _ = update(state, jnp.asarray(False))
  want = optax.tree.add_scale(g, 1.5 * optax.tree.norm(g),
                              state.inner_state.reuse_direction)
  chex.assert_trees_all_close(d, want, rtol=1e-6)


def test_a_state_of_the_other_kind_is_refused(problem):
  params, loss_fn = problem
  with_reuse = rst_optax.rst(optax.sgd(LR), 0.5, RHO, reuse=ALPHA)
  without = rst_optax.rst(optax.sgd(LR), 0.5, RHO)
  g = jax.grad(loss_fn)(params)
  for tx, other in ((with_reuse, without), (without, with_reuse)):
    with pytest.raises(TypeError, match=r'rst: `state` is a RST\w*State'):
      tx.update(g, other.init(params), params, grad_fn=jax.grad(loss_fn))


@pytest.mark.parametrize('reuse, error, match', [
    (-0.5, ValueError, r'rst: `reuse` must be a number in \[0, '),
    (float('inf'), ValueError, r'`reuse`'),
    ('0.7', TypeError, r'rst: `reuse` must be'),
    (True, TypeError, r'`reuse`'),
    (jnp.ones(2), TypeError, r'`reuse`'),
])
def test_bad_reuse_is_refused(reuse, error, match):
  with pytest.raises(error, match=match):
    rst_optax.rst(optax.sgd(LR), 0.5, RHO, reuse=reuse)


def test_a_reuse_schedule_returning_a_vector_is_refused_when_tracing(problem):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.sgd(LR), 0.5, RHO, reuse=lambda t: jnp.ones(2))
  with pytest.raises(TypeError, match=r'the `reuse` schedule must return'):
    step_once(tx, params, loss_fn, False)
