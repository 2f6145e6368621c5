"""`rst(..., reuse=alpha, reuse_window=k)`: reuse only near a SAM step.

A base step at step ``t`` reuses the stored direction only if the last SAM
step ``s`` was at most ``k`` steps before, ``t - s <= k``; otherwise it is
the plain step. The checkpoint and multi-device cases are in
tests/test_checkpoint.py and tests/test_sharding.py (their workers).
"""

import re

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
  reuses,
  run_cond_and_host,
)
from conftest import make_problem

import rst_optax
from rst_optax import schedules

MAX = int(np.iinfo(np.int32).max)


def train(tx, params, loss_fn, steps):
  """``steps`` jitted steps of ``tx`` (the coin in the graph); the final
  parameters and state."""
  grad = jax.grad(loss_fn)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad(params), state, params, grad_fn=grad)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def sgdm(schedule, **kwargs):
  return rst_optax.rst(optax.sgd(LR, momentum=0.9), schedule, RHO,
                       reuse=ALPHA, **kwargs)


@pytest.mark.parametrize('schedule, window, lam', [
    (0.2, 2, 1.0),  # the coin: gaps of up to 12 steps
    (0.2, 2, 2.0),  # G-RST: the mixed direction is reused
    (schedules.periodic(5), 2, 1.0),  # periodic, with a window below k - 1
])
def test_window_is_looksam_by_hand_over_60_steps(problem, schedule, window,
                                                 lam):
  params, loss_fn = problem
  plan = rst_optax.decisions(schedule, 0, 0, 60)
  within = reuses(plan, window)
  # Base steps just inside and just outside the window, and after it.
  since = np.array([t - max(np.flatnonzero(plan[:t]), default=t)
                    for t in range(60)])
  assert (within & (since == window)).any()
  assert (~plan & (since == window + 1)).any()
  assert within.sum() < reuses(plan, None).sum()
  tx = sgdm(schedule, lam=lam, reuse_window=window)
  got, state = train(tx, params, loss_fn, 60)
  want = looksam_by_hand(params, loss_fn, plan, window, lam=lam)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  assert int(state.sam_steps) == plan.sum()
  assert int(state.last_sam_step) == np.flatnonzero(plan)[-1]
  # The window matters: the unbounded reference ends elsewhere.
  unbounded = looksam_by_hand(params, loss_fn, plan, None, lam=lam)
  assert not np.allclose(unbounded['w'], got['w'], rtol=1e-3)


@pytest.mark.parametrize('window', [4, 5, 100, 2**40])
def test_periodic_with_a_window_of_k_minus_1_or_more_is_looksam_exactly(
    problem, window):
  params, loss_fn = problem
  schedule = schedules.periodic(5)
  looksam, _ = train(sgdm(schedule), params, loss_fn, 50)
  got, state = train(sgdm(schedule, reuse_window=window), params, loss_fn, 50)
  chex.assert_trees_all_equal(got, looksam)
  assert state.last_sam_step.dtype == jnp.int32


def test_periodic_with_a_window_of_k_minus_2_is_not_looksam(problem):
  params, loss_fn = problem
  schedule = schedules.periodic(5)
  looksam, _ = train(sgdm(schedule), params, loss_fn, 50)
  got, _ = train(sgdm(schedule, reuse_window=3), params, loss_fn, 50)
  assert not np.allclose(got['w'], looksam['w'], rtol=1e-3)


def step_once(tx, state, params, g, take_sam, grad_fn):
  return jax.jit(lambda s, g: tx.update(g, s, params, grad_fn=grad_fn,
                                        take_sam=take_sam))(state, g)


@pytest.mark.parametrize('static', [True, False])
def test_outside_the_window_the_base_step_is_g_itself(problem, static):
  """Step by step, with an identity base: the window counts from the last
  SAM step; outside it the direction is g bit for bit (negative zeros too),
  and the buffer is kept for the next SAM step's window."""
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA, reuse_window=2)
  state = tx.init(params)
  assert int(state.last_sam_step) == -1
  g = jax.tree.map(lambda x: jnp.where(
      jnp.arange(x.size).reshape(x.shape) % 2, -0.0, 0.25).astype(x.dtype),
                   params)  # negative zeros, which g + 0 u would lose
  plan = [False, True, False, False, False, False, True, False]
  for t, take in enumerate(plan):
    d, new = step_once(tx, state, params, g, take if static else
                       jnp.asarray(take), grad_fn)
    if take:
      assert int(new.last_sam_step) == t
    else:
      assert int(new.last_sam_step) == int(state.last_sam_step)
      chex.assert_trees_all_equal(new.reuse_direction, state.reuse_direction)
      if t in (2, 3, 7):  # 1, 2 and 1 steps after a SAM step
        want = optax.tree.add_scale(g, ALPHA * optax.tree.norm(g),
                                    state.reuse_direction)
        chex.assert_trees_all_close(d, want, rtol=1e-6)
        assert not np.allclose(d['w'], g['w'])
      else:  # before the first SAM step, or 3 and 4 steps after one
        assert_same_bits(d, g)
    state = new


def test_the_window_survives_the_int32_limit_of_the_step_count(problem):
  """``count`` stops at the int32 maximum: ``t - last_sam_step`` must not
  wrap around (a state with no SAM step yet stays outside the window)."""
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  g = grad_fn(params)
  for window in (2, 2**40):
    tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA,
                       reuse_window=window)
    _, after_sam = step_once(tx, tx.init(params), params, g, True, grad_fn)
    u = after_sam.reuse_direction
    never = after_sam._replace(count=jnp.int32(MAX),
                               last_sam_step=jnp.int32(-1))
    d, _ = step_once(tx, never, params, g, False, grad_fn)
    assert_same_bits(d, g)
    recent = never._replace(last_sam_step=jnp.int32(MAX - 2))
    d, _ = step_once(tx, recent, params, g, False, grad_fn)
    chex.assert_trees_all_close(
        d, optax.tree.add_scale(g, ALPHA * optax.tree.norm(g), u), rtol=1e-6)
    old = never._replace(last_sam_step=jnp.int32(0))
    d, _ = step_once(tx, old, params, g, False, grad_fn)
    if window == 2:
      assert_same_bits(d, g)
    else:  # a window beyond the last step bounds nothing
      assert not np.allclose(d['w'], g['w'])
    # A SAM step at the limit stores the limit.
    _, state = step_once(tx, never, params, g, True, grad_fn)
    assert int(state.count) == int(state.last_sam_step) == MAX


def test_host_dispatch_and_cond_take_the_same_decisions_and_bits():
  params, loss_fn = make_problem()
  tx = sgdm(0.25, seed=2, reuse_window=2)
  plan = rst_optax.decisions(0.25, 2, 0, 40)
  cond, host, lasts = run_cond_and_host(tx, params, loss_fn, steps=40)
  chex.assert_trees_all_equal(cond, host)
  want = [max(np.flatnonzero(plan[:t + 1]), default=-1) for t in range(40)]
  np.testing.assert_array_equal(lasts, np.stack([want, want], 1))
  # The window bounds something here, and it changes the run.
  assert reuses(plan, 2).sum() < reuses(plan, None).sum()
  unbounded, _, _ = run_cond_and_host(sgdm(0.25, seed=2), params, loss_fn,
                                     steps=40)
  assert not np.allclose(unbounded[0]['w'], cond[0]['w'], rtol=1e-3)


def test_mask_reuses_on_the_selected_leaves_within_the_window_only():
  params, loss_fn = make_problem()
  params = params | {'v': jnp.array([0.4, -0.2])}
  full_loss = lambda p: loss_fn({'w': p['w'], 'b': p['b']}) + jnp.sum(
      jnp.sin(p['v'] * p['w'][:2]))
  grad_fn = jax.grad(full_loss)
  tx = rst_optax.rst(optax.identity(), 0.5, RHO, reuse=ALPHA, reuse_window=1,
                     mask={'w': True, 'b': False, 'v': True})
  g = grad_fn(params)
  _, state = step_once(tx, tx.init(params), params, g, True, grad_fn)
  assert isinstance(state.reuse_direction['b'], optax.MaskedNode)
  sel = lambda t: {'w': t['w'], 'v': t['v']}
  d, state = step_once(tx, state, params, g, False, grad_fn)  # 1 step after
  want = optax.tree.add_scale(sel(g), ALPHA * optax.tree.norm(sel(g)),
                              sel(state.reuse_direction))
  chex.assert_trees_all_close(sel(d), want, rtol=1e-6)
  chex.assert_trees_all_equal(d['b'], g['b'])
  d, _ = step_once(tx, state, params, g, False, grad_fn)  # 2 steps after
  assert_same_bits(d, g)


def test_inject_hyperparams_injects_reuse_with_a_static_window(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = optax.inject_hyperparams(rst_optax.rst, static_args=('reuse_window',))(
      optax.identity(), schedule=0.5, rho=RHO, reuse=ALPHA, reuse_window=1)
  state = tx.init(params)
  assert int(state.inner_state.last_sam_step) == -1
  g = grad_fn(params)
  update = jax.jit(lambda s, take: tx.update(g, s, params, grad_fn=grad_fn,
                                             take_sam=take))
  _, state = update(state, jnp.asarray(True))
  state.hyperparams['reuse'] = jnp.asarray(1.5)
  d, state = update(state, jnp.asarray(False))
  want = optax.tree.add_scale(g, 1.5 * optax.tree.norm(g),
                              state.inner_state.reuse_direction)
  chex.assert_trees_all_close(d, want, rtol=1e-6)
  d, _ = update(state, jnp.asarray(False))
  assert_same_bits(d, g)


def test_inject_hyperparams_without_static_window_is_refused_with_the_fix():
  with pytest.raises(TypeError, match=r"static_args=\('reuse_window',\)"):
    optax.inject_hyperparams(rst_optax.rst)(
        optax.identity(), schedule=0.5, rho=RHO, reuse=ALPHA,
        reuse_window=2).init({'w': jnp.zeros(3)})


def test_the_state_is_a_plain_namedtuple_with_a_window_and_without(problem):
  """Without a window, ``RSTReuseState`` of five fields, the state that
  checkpoints of before hold; with one, ``RSTWindowState``: the same fields
  and ``last_sam_step``, one int32 leaf more (-1: no SAM step yet)."""
  params, _ = problem
  state = sgdm(0.5).init(params)
  assert type(state) is rst_optax.RSTReuseState
  assert rst_optax.RSTReuseState._fields == (
      *rst_optax.RSTState._fields, 'reuse_direction')
  windowed = sgdm(0.5, reuse_window=3).init(params)
  assert type(windowed) is rst_optax.RSTWindowState
  assert rst_optax.RSTWindowState._fields == (
      *rst_optax.RSTReuseState._fields, 'last_sam_step')
  chex.assert_trees_all_equal(tuple(windowed[:5]), tuple(state))
  assert windowed.last_sam_step.dtype == jnp.int32
  assert windowed.last_sam_step.shape == () and int(windowed.last_sam_step) == -1
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(windowed)[0]]
  assert paths[-1] == (jax.tree_util.GetAttrKey('last_sam_step'),)
  assert len(paths) == len(jax.tree.leaves(state)) + 1


@pytest.mark.parametrize('window', [None, 3])
def test_a_tree_of_nones_mapped_from_the_state_matches_it(problem, window):
  """``jax.tree.map(lambda x: None, state)`` (Orbax builds its save
  arguments so) keeps the state's type and structure, ``last_sam_step``
  included, and serves as a second tree of a map over the state."""
  params, _ = problem
  state = sgdm(0.5, reuse_window=window).init(params)
  nones = jax.tree.map(lambda x: None, state)
  assert type(nones) is type(state)
  pairs = jax.tree.map(lambda x, n: (x, n), state, nones)
  if window is not None:
    assert nones.last_sam_step is None
    assert pairs.last_sam_step == (state.last_sam_step, None)
  assert jax.tree.structure(nones, is_leaf=lambda x: x is None) == (
      jax.tree.structure(state))


def test_a_state_with_or_without_a_window_is_refused_by_the_other(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  g = grad_fn(params)
  windowed, plain = sgdm(0.5, reuse_window=2), sgdm(0.5)
  messages = {}
  for tx, other, name in ((windowed, plain, 'RSTReuseState'),
                          (plain, windowed, 'RSTWindowState')):
    with pytest.raises(TypeError, match=r'rst: `state` was made by an rst '
                       rf'with(out)? `reuse_window` \(it is an {name}\)') as e:
      tx.update(g, other.init(params), params, grad_fn=grad_fn)
    messages[name] = str(e.value)
  # The conversions the messages give: into a state of the other kind, the
  # state that kind's init makes (before any step), which it then takes.
  for name, tx, other in (('RSTReuseState', windowed, plain),
                          ('RSTWindowState', plain, windowed)):
    fix = re.search(r'pass (rst_optax\.\w+\(.*?\))(?::|\)\.)',
                    messages[name]).group(1)
    state = eval(fix, {'rst_optax': rst_optax, 'jnp': jnp,
                       'state': other.init(params)})
    assert type(state) is type(tx.init(params))
    chex.assert_trees_all_equal(state, tx.init(params))
    tx.update(g, state, params, grad_fn=grad_fn)
  assert ('rst_optax.RSTWindowState(*state, last_sam_step=jnp.int32(-1))'
          in messages['RSTReuseState'])


@pytest.mark.parametrize('reusing', [True, False])
@pytest.mark.parametrize('window', [None, 2])
def test_a_state_with_or_without_reuse_is_refused_by_name(problem, reusing,
                                                          window):
  """Every pair of kinds that differ in ``reuse``: the message names the
  state's type."""
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  if reusing:
    tx, other = sgdm(0.5, reuse_window=window), rst_optax.rst(
        optax.sgd(LR), 0.5, RHO)
  else:
    tx, other = rst_optax.rst(optax.sgd(LR), 0.5, RHO), sgdm(
        0.5, reuse_window=window)
  name = type(other.init(params)).__name__
  with pytest.raises(TypeError, match=rf'rst: `state` is a {name}, made by an '
                     rf'rst with(out)? `reuse`, but this rst (has|has no) '
                     r'`reuse`'):
    tx.update(grad_fn(params), other.init(params), params, grad_fn=grad_fn)


@pytest.mark.parametrize('window', [1, 3, np.int32(2), np.int64(7)])
def test_python_and_numpy_ints_are_accepted(window):
  rst_optax.rst(optax.sgd(LR), 0.5, RHO, reuse=ALPHA, reuse_window=window)


@pytest.mark.parametrize('window, error, match', [
    pytest.param(0, ValueError, r'rst: `reuse_window` must be None .*or a '
                 r'Python int >= 1.*; got 0\.', id='zero'),
    pytest.param(-3, ValueError, r'rst: `reuse_window` must be .*; got -3\.',
                 id='negative'),
    pytest.param(2.0, TypeError, r'rst: `reuse_window` must be None \(no '
                 r'bound\) or a Python int >= 1', id='float'),
    pytest.param(True, TypeError, r'rst: `reuse_window` must be .*; got '
                 r'True\.', id='bool'),
    pytest.param(np.bool_(True), TypeError, r'rst: `reuse_window`',
                 id='numpy-bool'),
    pytest.param('3', TypeError, r'rst: `reuse_window`', id='str'),
    pytest.param(jnp.asarray(3), TypeError, r"`reuse_window`.*static_args",
                 id='array'),
])
def test_bad_reuse_window_is_refused(window, error, match):
  with pytest.raises(error, match=match):
    rst_optax.rst(optax.sgd(LR), 0.5, RHO, reuse=ALPHA, reuse_window=window)


@pytest.mark.parametrize('reuse', [None, 0, 0.0])
def test_a_window_without_reuse_is_refused(reuse):
  with pytest.raises(ValueError, match=r'rst: `reuse_window` bounds the reuse '
                     r'of `reuse`, which is None or 0 here'):
    rst_optax.rst(optax.sgd(LR), 0.5, RHO, reuse=reuse, reuse_window=2)


def test_tree_map_params_maps_the_buffer_and_leaves_the_last_sam_step():
  params, _ = make_problem()
  tx = rst_optax.rst(optax.adam(1e-3), 0.5, RHO, reuse=ALPHA, reuse_window=2,
                     mask={'w': True, 'b': False})
  state = tx.init(params)
  mapped = optax.tree_map_params(tx, lambda x: jnp.full_like(x, 7.0), state)
  np.testing.assert_array_equal(mapped.reuse_direction['w'],
                                np.full(params['w'].shape, 7.0))
  assert isinstance(mapped.reuse_direction['b'], optax.MaskedNode)
  assert int(mapped.last_sam_step) == -1 and int(mapped.count) == 0
