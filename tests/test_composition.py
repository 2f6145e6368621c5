"""Composing ``rst`` with Optax's wrappers: one test per row of the table in
docs/composing.md.

The rule the table follows: every transformation of the gradient goes
*inside* ``rst`` (in ``base_tx``), where it sees the direction of both
branches; a transformation chained *before* ``rst`` is bypassed on SAM steps,
and ``rst`` inside ``optax.masked``/``optax.multi_transform`` raises.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rst_optax

RHO = 0.05


def make_problem():
  """Parameters and a quadratic loss with large gradients (norm ~ 30)."""
  params = {'w': jnp.array([1.0, -2.0, 3.0]), 'b': jnp.array([0.5, -0.5])}
  target = {'w': jnp.array([-4.0, 9.0, -12.0]), 'b': jnp.array([3.0, 1.0])}
  loss = lambda p: sum(jnp.sum(3.0 * (p[k] - target[k]) ** 2) for k in p)
  return params, loss


def sam_direction(params, grad_fn, rho=RHO):
  """SAM's direction by hand: grad_fn at w + rho g / ||g||."""
  g = grad_fn(params)
  return grad_fn(optax.tree.add_scale(params, rho / optax.tree.norm(g), g))


def step(tx, params, grad_fn, state=None, **extra):
  state = tx.init(params) if state is None else state
  return tx.update(grad_fn(params), state, params, grad_fn=grad_fn, **extra)


# --- clip_by_global_norm and clip: inside base_tx --------------------------------

def test_clip_by_global_norm_inside_clips_both_branches():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  for schedule in (0.0, 1.0):
    tx = rst_optax.rst(optax.chain(optax.clip_by_global_norm(1.0),
                                   optax.sgd(1.0)), schedule=schedule, rho=RHO)
    updates, state = step(tx, params, grad_fn)
    assert int(state.sam_steps) == schedule
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-6)
  # The SAM step is the clipped SAM direction.
  d = sam_direction(params, grad_fn)
  chex.assert_trees_all_close(
      updates, optax.tree.scale(-1.0 / optax.tree.norm(d), d), rtol=1e-6)


def test_clip_by_global_norm_before_rst_is_bypassed_on_sam_steps():
  """The documented pitfall: chained before rst, the clip sees only g; the
  SAM direction comes from grad_fn and is not clipped."""
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  for schedule, clipped in ((0.0, True), (1.0, False)):
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     rst_optax.rst(optax.sgd(1.0), schedule=schedule, rho=RHO))
    updates, _ = step(tx, params, grad_fn)
    norm = float(optax.tree.norm(updates))
    assert (norm == pytest.approx(1.0, rel=1e-6)) == clipped
  assert norm > 10.0  # SAM step: the raw SAM gradient
  chex.assert_trees_all_close(
      updates, optax.tree.scale(-1.0, sam_direction(params, grad_fn)),
      rtol=1e-6)


def test_clip_inside_clips_each_entry_on_sam_steps():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = rst_optax.rst(optax.chain(optax.clip(2.0), optax.sgd(1.0)),
                     schedule=1.0, rho=RHO)
  updates, _ = step(tx, params, grad_fn)
  chex.assert_trees_all_close(
      updates,
      jax.tree.map(lambda d: -jnp.clip(d, -2.0, 2.0),
                   sam_direction(params, grad_fn)), rtol=1e-6)


# --- add_decayed_weights / adamw: inside base_tx ------------------------------------

def test_adamw_inside_decays_on_sam_steps():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  base = optax.adamw(0.1, weight_decay=0.5)
  tx = rst_optax.rst(base, schedule=1.0, rho=RHO)
  updates, _ = step(tx, params, grad_fn)
  want, _ = base.update(sam_direction(params, grad_fn), base.init(params),
                        params)
  chex.assert_trees_all_close(updates, want, rtol=1e-6)


@pytest.mark.parametrize('placement', ['inside', 'before'])
def test_add_decayed_weights_inside_rst_and_lost_before_it(placement):
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  wd = 0.5
  if placement == 'inside':
    tx = rst_optax.rst(optax.chain(optax.add_decayed_weights(wd),
                                   optax.sgd(1.0)), schedule=1.0, rho=RHO)
  else:
    tx = optax.chain(optax.add_decayed_weights(wd),
                     rst_optax.rst(optax.sgd(1.0), schedule=1.0, rho=RHO))
  updates, _ = step(tx, params, grad_fn)
  d = sam_direction(params, grad_fn)
  decayed = jax.tree.map(lambda a, w: -(a + wd * w), d, params)
  if placement == 'inside':
    chex.assert_trees_all_close(updates, decayed, rtol=1e-6)
  else:
    # The pitfall: the decayed gradient only sets the perturbation's
    # direction; the SAM gradient, undecayed, is the update.
    g = jax.tree.map(lambda a, w: a + wd * w, grad_fn(params), params)
    perturbed = optax.tree.add_scale(params, RHO / optax.tree.norm(g), g)
    chex.assert_trees_all_close(
        updates, optax.tree.scale(-1.0, grad_fn(perturbed)), rtol=1e-6)


# --- zero_nans: inside base_tx ----------------------------------------------------

def test_zero_nans_inside_zeroes_a_nan_sam_gradient():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)

  def nan_grad_fn(p):
    g = grad_fn(p)
    return {**g, 'w': g['w'].at[1].set(jnp.nan)}

  tx = rst_optax.rst(optax.chain(optax.zero_nans(), optax.sgd(1.0)),
                     schedule=1.0, rho=RHO)
  updates, state = tx.update(grad_fn(params), tx.init(params), params,
                             grad_fn=nan_grad_fn)
  want = optax.tree.scale(-1.0, sam_direction(params, grad_fn))
  want['w'] = want['w'].at[1].set(0.0)
  chex.assert_trees_all_close(updates, want, rtol=1e-6)
  assert bool(state.base_state[0].found_nan['w'])


# --- apply_if_finite: inside base_tx (skips) or around rst (rewinds) ----------------

def test_apply_if_finite_inside_skips_a_bad_sam_step_and_keeps_clocks():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = rst_optax.rst(optax.apply_if_finite(optax.sgd(1.0), 3), schedule=1.0,
                     rho=RHO)
  nan_grad_fn = lambda p: jax.tree.map(lambda a: a * jnp.nan, p)
  updates, state = tx.update(grad_fn(params), tx.init(params), params,
                             grad_fn=nan_grad_fn)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state.base_state.notfinite_count) == 1
  assert (int(state.count), int(state.sam_steps)) == (1, 1)


def test_apply_if_finite_around_rst_rewinds_its_state_on_a_bad_gradient():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = optax.apply_if_finite(
      rst_optax.rst(optax.sgd(1.0), schedule=optax.constant_schedule(1.0)), 3)
  bad = jax.tree.map(lambda a: a * jnp.nan, grad_fn(params))
  updates, state = tx.update(bad, tx.init(params), params, grad_fn=grad_fn)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state.inner_state.count) == 0  # the coin is drawn again


# --- MultiSteps: around rst ---------------------------------------------------------

def test_multisteps_around_rst_steps_rst_once_per_outer_step():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  k = 3
  tx = optax.MultiSteps(rst_optax.rst(optax.sgd(0.1), schedule=1.0, rho=RHO),
                        k)
  state = tx.init(params)
  update = jax.jit(lambda s: tx.update(grad_fn(params), s, params,
                                       grad_fn=grad_fn))
  for _ in range(2 * k):
    updates, state = update(state)
  inner = state.inner_opt_state
  assert (int(inner.count), int(inner.sam_steps)) == (2, 2)
  # The same gradient at every micro-step: the accumulated step is SAM's.
  chex.assert_trees_all_close(
      updates, optax.tree.scale(-0.1, sam_direction(params, grad_fn)),
      rtol=1e-6)


# --- inject_hyperparams: around rst, or inside base_tx ------------------------------

def test_inject_hyperparams_around_rst_sets_rho_and_lam():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = optax.inject_hyperparams(rst_optax.rst)(optax.identity(), schedule=1.0,
                                               rho=RHO, lam=1.0)
  state = tx.init(params)
  state.hyperparams['rho'] = jnp.asarray(0.2)
  state.hyperparams['lam'] = jnp.asarray(0.5)
  d, state = jax.jit(lambda s: tx.update(grad_fn(params), s, params,
                                         grad_fn=grad_fn))(state)
  g = grad_fn(params)
  want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, g,
                      sam_direction(params, grad_fn, 0.2))
  chex.assert_trees_all_close(d, want, rtol=1e-5)
  assert int(state.inner_state.sam_steps) == 1


def test_inject_hyperparams_around_rst_with_a_callable_mask_as_static_arg():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  mask = lambda p: {'w': True, 'b': False}
  tx = optax.inject_hyperparams(rst_optax.rst, static_args=('mask',))(
      optax.identity(), schedule=1.0, rho=RHO, mask=mask)
  seen = []
  tx.update(grad_fn(params), tx.init(params), params, take_sam=True,
            grad_fn=lambda p: seen.append(p) or grad_fn(p))
  chex.assert_trees_all_equal(seen[0]['b'], params['b'])
  assert not np.allclose(seen[0]['w'], params['w'])


def test_inject_hyperparams_inside_sets_the_base_learning_rate():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = rst_optax.rst(optax.inject_hyperparams(optax.sgd)(learning_rate=1.0),
                     schedule=1.0, rho=RHO)
  state = tx.init(params)
  state.base_state.hyperparams['learning_rate'] = jnp.asarray(0.25)
  updates, _ = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  chex.assert_trees_all_close(
      updates, optax.tree.scale(-0.25, sam_direction(params, grad_fn)),
      rtol=1e-6)


# --- masked and multi_transform: inside base_tx; around rst raises ----------------

def test_masked_inside_updates_only_the_masked_parameters():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = rst_optax.rst(optax.masked(optax.sgd(1.0), {'w': True, 'b': False}),
                     schedule=1.0, rho=RHO)
  updates, _ = step(tx, params, grad_fn)
  d = sam_direction(params, grad_fn)
  # optax.masked passes the unmasked leaves through unchanged.
  chex.assert_trees_all_close(updates, {'w': -d['w'], 'b': d['b']}, rtol=1e-6)


def test_multi_transform_inside_gives_each_group_its_optimizer():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = rst_optax.rst(
      optax.multi_transform({'fast': optax.sgd(1.0), 'slow': optax.sgd(0.1)},
                            {'w': 'fast', 'b': 'slow'}),
      schedule=1.0, rho=RHO)
  updates, _ = step(tx, params, grad_fn)
  d = sam_direction(params, grad_fn)
  chex.assert_trees_all_close(updates, {'w': -d['w'], 'b': -0.1 * d['b']},
                              rtol=1e-6)


@pytest.mark.parametrize('wrapper', ['masked', 'multi_transform'])
def test_rst_inside_masked_or_multi_transform_raises(wrapper):
  params, _ = make_problem()
  inner = rst_optax.rst(optax.sgd(1.0))
  tx = (optax.masked(inner, {'w': True, 'b': False}) if wrapper == 'masked'
        else optax.multi_transform({'a': inner, 'b': optax.sgd(1.0)},
                                   {'w': 'a', 'b': 'b'}))
  with pytest.raises(ValueError, match=r'rst\(optax\.multi_transform'):
    tx.init(params)


def test_rst_mask_is_sam_on_a_subset():
  """The supported way to perturb a subset: rst(..., mask=...)."""
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  seen = []
  tx = rst_optax.rst(optax.sgd(1.0), schedule=1.0, rho=RHO,
                     mask={'w': True, 'b': False})
  tx.update(grad_fn(params), tx.init(params), params,
            grad_fn=lambda p: seen.append(p) or grad_fn(p))
  g = grad_fn(params)
  chex.assert_trees_all_close(
      seen[0], {'w': params['w'] + RHO * g['w'] / jnp.linalg.norm(g['w']),
                'b': params['b']}, rtol=1e-6)


# --- lookahead: unsupported -----------------------------------------------------------

def test_lookahead_around_rst_cannot_pass_grad_fn():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = optax.lookahead(rst_optax.rst(optax.sgd(1.0)), 2, 0.5)
  lookahead_params = optax.LookaheadParams.init_synced(params)
  state = tx.init(lookahead_params)
  with pytest.raises(TypeError, match='grad_fn'):
    tx.update(grad_fn(params), state, lookahead_params, grad_fn=grad_fn)


def test_lookahead_inside_rst_is_refused_by_structure():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = rst_optax.rst(optax.lookahead(optax.sgd(1.0), 2, 0.5))
  lookahead_params = optax.LookaheadParams.init_synced(params)
  state = tx.init(lookahead_params)
  with pytest.raises(ValueError, match='rst: `updates` must have the tree'):
    tx.update(grad_fn(params), state, lookahead_params, grad_fn=grad_fn)


# --- contrib.reduce_on_plateau: inside base_tx ------------------------------------

def test_reduce_on_plateau_inside_scales_both_branches():
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  tx = rst_optax.rst(
      optax.chain(optax.sgd(1.0),
                  optax.contrib.reduce_on_plateau(factor=0.5, patience=1)),
      schedule=0.5, rho=RHO, seed=0)
  state = tx.init(params)
  g = grad_fn(params)
  took = rst_optax.decisions(0.5, 0, 0, 4)
  assert 0 < took.sum() < 4
  scales = []
  update = jax.jit(lambda s: tx.update(g, s, params, grad_fn=grad_fn,
                                       value=1.0))
  for t in range(4):  # the loss never improves: the scale halves
    updates, state = update(state)
    d = sam_direction(params, grad_fn) if took[t] else g
    scale = float(state.base_state[1].scale)
    chex.assert_trees_all_close(updates, optax.tree.scale(-scale, d),
                                rtol=1e-6)
    scales.append(scale)
  assert scales[-1] < scales[0]


# --- optimizers that read the loss: value/grad are passed through as given ---

def test_polyak_sgd_inside_sees_the_callers_value_on_sam_steps():
  """composing.md: on a SAM step ``rst`` hands the base optimizer the SAM
  direction and forwards the caller's ``value`` (the loss at the unperturbed
  point) untouched; on a base step, the gradient and the same ``value``."""
  params, loss = make_problem()
  grad_fn = jax.grad(loss)
  base = optax.polyak_sgd(max_learning_rate=10.0)
  value = loss(params)
  sam = sam_direction(params, grad_fn)
  for schedule, direction in ((0.0, grad_fn(params)), (1.0, sam)):
    tx = rst_optax.rst(base, schedule=schedule, rho=RHO)
    updates, _ = step(tx, params, grad_fn, value=value)
    want, _ = base.update(direction, base.init(params), params, value=value)
    chex.assert_trees_all_close(updates, want, rtol=1e-6)
  # Not the loss at the perturbed point, which gives another step size.
  g = grad_fn(params)
  perturbed = optax.tree.add_scale(params, RHO / optax.tree.norm(g), g)
  other, _ = base.update(sam, base.init(params), params,
                         value=loss(perturbed))
  assert not np.allclose(other['w'], updates['w'], rtol=1e-3)
