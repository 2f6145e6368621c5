"""Exact or refused: the core's edge cases (issue 18) and every documented
composition at every floating dtype."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_problem

import rst_optax
from rst_optax import _norms

RHO = 0.05


def quadratic_grad(p):
  return jax.tree.map(lambda w: 2.0 * (w - 1.0), p)


def sam_point(tx, g, params, grad_fn=quadratic_grad):
  """The updates of one SAM step of ``tx`` and where ``grad_fn`` was called."""
  seen = []
  updates, _ = tx.update(g, tx.init(params), params, take_sam=True,
                         grad_fn=lambda p: seen.append(p) or grad_fn(p))
  return updates, seen[0]


# --- 16-bit parameters under inject_hyperparams; eps ---------------------------

@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_inject_hyperparams_with_16_bit_parameters(dtype):
  params = {'w': jnp.linspace(-1, 1, 6, dtype=dtype).reshape(2, 3),
            'b': jnp.zeros(3, dtype)}
  tx = optax.inject_hyperparams(rst_optax.rst)(optax.sgd(0.1), rho=0.1,
                                               reuse=0.5)
  state = tx.init(params)
  step = jax.jit(lambda s, take: tx.update(
      quadratic_grad(params), s, params, grad_fn=quadratic_grad,
      take_sam=take))
  for take in (True, False):
    updates, state = step(state, jnp.asarray(take))
    for leaf in jax.tree.leaves(updates):
      assert leaf.dtype == dtype and np.isfinite(np.asarray(leaf, np.float32)).all()
  assert int(state.inner_state.sam_steps) == 1


def test_an_eps_rounded_to_zero_by_inject_hyperparams_is_refused_with_a_way_out():
  params = {'w': jnp.ones(3, jnp.float16)}
  tx = optax.inject_hyperparams(rst_optax.rst)(optax.sgd(0.1), eps=1e-12)
  with pytest.raises(ValueError, match=r"rst: `eps`.*hyperparam_dtype=jnp\.float32"):
    tx.init(params)
  fixed = optax.inject_hyperparams(rst_optax.rst,
                                   hyperparam_dtype=jnp.float32)(
                                       optax.sgd(0.1), eps=1e-12)
  fixed.init(params)  # accepted


def test_eps_default_is_1e_12():
  """``eps=None`` is 1e-12: the same step as the number given."""
  params, loss_fn = make_problem()
  g = jax.tree.map(lambda x: 1e-12 * jnp.ones_like(x), params)
  point = {eps: sam_point(rst_optax.rst(optax.identity(), 1.0, RHO, eps=eps),
                         g, params, jax.grad(loss_fn))[1]
           for eps in (None, 1e-12, 1e-6)}
  chex.assert_trees_all_equal(point[None], point[1e-12])
  assert not np.allclose(point[1e-6]['w'], point[None]['w'], rtol=0,
                         atol=1e-4 * RHO)


# --- mask ------------------------------------------------------------------------

def test_a_callable_mask_under_inject_hyperparams_without_static_args_is_refused():
  """inject_hyperparams calls it with the step count: its result has not the
  structure of the parameters, and no SAM step would perturb anything."""
  params, _ = make_problem()
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 0, p)
  tx = optax.inject_hyperparams(rst_optax.rst)(optax.sgd(0.1), mask=mask)
  with pytest.raises(ValueError, match=r"rst: `mask`.*static_args=\('mask',\)"):
    tx.init(params)


@pytest.mark.parametrize('mask', [{'w': False, 'b': False},
                                  lambda p: {'w': False, 'b': False}])
def test_a_mask_that_selects_nothing_is_refused(mask):
  params, _ = make_problem()
  with pytest.raises(ValueError, match=r'rst: `mask` selects no parameter'):
    rst_optax.rst(optax.sgd(0.1), 0.5, mask=mask).init(params)
  # Unless no SAM step can be taken.
  rst_optax.rst(optax.sgd(0.1), 0, mask=mask).init(params)


@pytest.mark.parametrize('mask', [True, False])
def test_a_single_bool_mask_for_several_leaves_is_refused(mask):
  params, _ = make_problem()
  with pytest.raises(ValueError, match=r'rst: `mask` is the single value'):
    rst_optax.rst(optax.sgd(0.1), 0.5, mask=mask).init(params)


def test_a_single_bool_mask_for_a_single_array_is_accepted():
  w = jnp.array([0.5, -1.0, 3.0])
  tx = rst_optax.rst(optax.identity(), 1.0, RHO, mask=True)
  assert not np.allclose(sam_point(tx, quadratic_grad(w), w)[1], w)


@pytest.mark.parametrize('reuse', [None, 0.5])
@pytest.mark.parametrize('mask', [{'w': True, 'b': False},
                                  lambda p: {'w': True, 'b': False}],
                         ids=['pytree', 'callable'])
def test_tree_map_params_maps_a_masked_state(mask, reuse):
  params, _ = make_problem()
  tx = rst_optax.rst(optax.adam(1e-3), 0.5, RHO, mask=mask, reuse=reuse)
  state = tx.init(params)
  mapped = optax.tree_map_params(tx, lambda x: jnp.full_like(x, 7.0), state)
  chex.assert_trees_all_equal(mapped.base_state[0].mu,
                              jax.tree.map(lambda x: jnp.full_like(x, 7.0),
                                           params))
  assert int(mapped.count) == 0  # not a parameter: left alone
  if reuse:
    np.testing.assert_array_equal(mapped.reuse_direction['w'],
                                  np.full(params['w'].shape, 7.0))
    assert isinstance(mapped.reuse_direction['b'], optax.MaskedNode)


# --- parameters: Python floats, zero-size leaves ---------------------------------

def test_a_python_float_parameter_takes_its_sam_step():
  params = {'w': jnp.array([0.5, 2.0]), 'f': 3.0}
  as_array = {'w': params['w'], 'f': jnp.asarray(3.0)}
  tx = rst_optax.rst(optax.sgd(0.1), 1.0, 0.2, reuse=0.5)
  chex.assert_trees_all_equal(
      sam_point(tx, quadratic_grad(as_array), params),
      sam_point(tx, quadratic_grad(as_array), as_array))


@pytest.mark.parametrize('reuse', [None, 0.5])
@pytest.mark.parametrize('take_sam', [True, False, None],
                         ids=['sam', 'base', 'cond'])
def test_a_python_float_in_the_gradient_is_a_0d_array(take_sam, reuse):
  """A Python float leaf in ``updates`` (as optax.sgd takes it), on a SAM
  step, a base step and under the coin's cond."""
  params = {'w': jnp.array([0.5, 2.0]), 'f': jnp.asarray(3.0)}
  g = quadratic_grad(params)
  as_float = {'w': g['w'], 'f': float(g['f'])}
  tx = rst_optax.rst(optax.sgd(0.1), 0.5, 0.2, reuse=reuse)

  def step(g):
    return tx.update(g, tx.init(params), params, take_sam=take_sam,
                     grad_fn=quadratic_grad)

  chex.assert_trees_all_equal(step(as_float), step(g))
  chex.assert_trees_all_equal(jax.jit(step)(as_float), step(g))


@pytest.mark.parametrize('schedule', [1.0, 0.5], ids=['sam', 'cond'])
def test_a_float32_grad_fn_for_bfloat16_parameters_keeps_their_dtype(schedule):
  """grad_fn's output is cast to the gradient's dtype: the updates and the
  base optimizer's state stay bfloat16 on SAM steps, and the cond traces."""
  params = jnp.linspace(-1, 1, 4, dtype=jnp.bfloat16)
  g = quadratic_grad(params)
  grad_fn = lambda p: quadratic_grad(p).astype(jnp.float32)
  tx = rst_optax.rst(optax.sgd(0.1, momentum=0.9), schedule, RHO)
  updates, state = jax.jit(lambda s: tx.update(g, s, params, grad_fn=grad_fn,
                                               take_sam=schedule == 1.0 or None)
                           )(tx.init(params))
  assert updates.dtype == jnp.bfloat16
  chex.assert_trees_all_equal_dtypes(state, tx.init(params))


def test_a_zero_size_leaf_is_perturbed_with_the_rest():
  params = {'w': jnp.array([0.5, 2.0, -1.0]), 'z': jnp.zeros((0, 4))}
  without = {'w': params['w']}
  tx = rst_optax.rst(optax.identity(), 1.0, RHO, reuse=0.5)
  step = jax.jit(lambda p: sam_point(tx, quadratic_grad(p), p))
  (d, point), (d_without, point_without) = step(params), step(without)
  np.testing.assert_array_equal(d['w'], d_without['w'])
  np.testing.assert_array_equal(point['w'], point_without['w'])
  assert point['z'].shape == (0, 4)


# --- base optimizers that cannot work under rst ----------------------------------

@pytest.mark.parametrize('make', [
    lambda: optax.contrib.dpsgd(0.1, 1.0, 0.1, 0),
    lambda: optax.chain(optax.contrib.differentially_private_aggregate(
        1.0, 0.1, 0), optax.sgd(0.1)),
], ids=['dpsgd', 'dp_aggregate_in_a_chain'])
def test_differentially_private_base_optimizers_are_refused(make):
  params, _ = make_problem()
  with pytest.raises(TypeError, match=r'rst: `base_tx` holds a differentially'):
    rst_optax.rst(make()).init(params)


# --- the norm: the fast path's floor, its compiled form, eps, dtypes -------------

def reference_perturbation(g, rho, eps, w=None, eta=None):
  """rho s^2 g / (||s g|| + eps), in float64 NumPy."""
  g = [np.asarray(x, np.float64) for x in g]
  s = ([np.abs(np.asarray(x, np.float64)) + eta for x in w]
       if eta is not None else [np.ones_like(x) for x in g])
  norm = np.sqrt(sum(np.sum((a * b) ** 2) for a, b in zip(s, g, strict=True)))
  return [rho * a * a * b / (norm + eps) for a, b in zip(s, g, strict=True)]


def test_flushed_squares_do_not_take_the_fast_path():
  """Entries near 1e-19 have squares below float32's smallest normal number,
  which the CPU flushes to 0: their sum is then far too small, and the
  direct norm would give a perturbation several times too large."""
  g = [jnp.full((1000,), 9e-20, jnp.float32), jnp.array([1e-18], jnp.float32)]
  w = [jnp.zeros_like(x) for x in g]
  assert float(jnp.sum(jnp.square(g[0]))) == 0.0  # flushed on CPU
  eps = 2e-38
  e, finite = jax.jit(lambda g, w: _norms.perturbation(
      g, w, RHO, eps, None))(g, w)
  assert bool(finite)
  for got, want in zip(e, reference_perturbation(g, RHO, eps), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_the_cpu_program_holds_the_fast_path_conditional():
  """On CPU, ``platform_dependent`` picks the direct norm behind a ``cond``
  (StableHLO holds a ``case`` on every platform; only the compiled CPU
  program shows the choice). A SAM step fixed when tracing has no other."""
  params, loss_fn = make_problem()
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.sgd(0.1), 0.5, RHO)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn,
                                        take_sam=True))
  text = step.lower(params, tx.init(params)).compile().as_text()
  assert jax.default_backend() == 'cpu'
  assert text.count(' conditional(') == 1, text


@pytest.mark.parametrize('eta, w_scale', [(None, 1.0), (0.01, 1e3)],
                         ids=['sam', 'asam-large-w'])
def test_the_scaled_path_keeps_eps(eta, w_scale):
  """With ||s g|| near eps, eps counts as much as the norm: the scaled path
  must add it at the same scale as its scaled norm."""
  rng = np.random.default_rng(0)
  g = [jnp.asarray(rng.standard_normal(s), jnp.float32)
       for s in ((4, 3), (5,))]
  w = [jnp.asarray(rng.standard_normal(x.shape) * w_scale, jnp.float32)
       for x in g]
  eps = 1e-12
  s = [np.abs(np.asarray(b, np.float64)) + eta if eta is not None else 1.0
       for b in w]
  s_norm = np.sqrt(sum(np.sum((a * np.asarray(x, np.float64)) ** 2)
                       for a, x in zip(s, g, strict=True)))
  g = [x * (eps / s_norm) for x in g]  # ||s g|| = eps
  e, _ = jax.jit(lambda g, w: _norms.scaled_perturbation(
      g, w, RHO, eps, eta))(g, w)
  want = reference_perturbation(g, RHO, eps, w, eta)
  for got, ref in zip(e, want, strict=True):
    np.testing.assert_allclose(got, ref, rtol=2e-5)
  # And it is eps that matters here: half the perturbation without it.
  np.testing.assert_allclose(np.asarray(e[0]) * 2,
                             reference_perturbation(g, RHO, 0.0, w, eta)[0],
                             rtol=2e-5)


def test_mixed_float32_float64_trees_perturb_the_float64_leaf_in_float64():
  rho = 0.1 + 1e-12
  with jax.enable_x64(True):
    params = {'a': jnp.linspace(-1.0, 2.0, 7, dtype=jnp.float64),
              'b': jnp.linspace(0.5, -3.0, 9, dtype=jnp.float32)}
    g = {'a': jnp.asarray(np.linspace(0.3, 1.1, 7) * (1 + 1e-9)),
         'b': jnp.linspace(-1.0, 1.0, 9, dtype=jnp.float32) / 3}
    tx = rst_optax.rst(optax.identity(), 1.0, rho)
    seen = []
    tx.update(g, tx.init(params), params,
              grad_fn=lambda p: seen.append(p) or p)
    norm = np.sqrt(np.sum(np.asarray(g['a']) ** 2)
                   + np.sum(np.asarray(g['b'], np.float64) ** 2))
    want = np.asarray(params['a']) + rho * np.asarray(g['a']) / (norm + 1e-12)
    assert seen[0]['a'].dtype == np.float64
    np.testing.assert_allclose(seen[0]['a'], want, rtol=1e-15, atol=1e-16)


def test_subnormal_gradients_are_not_perturbed_on_cpu():
  """Documented: XLA:CPU flushes subnormal numbers to zero, so a gradient
  whose every entry is subnormal is zero there: the SAM step evaluates
  grad_fn at w itself, finite."""
  tiny = np.float32(np.finfo(np.float32).tiny)
  g = {'w': jnp.array([tiny / 4, -tiny / 8, tiny / 2], jnp.float32)}
  params = {'w': jnp.array([0.5, -1.0, 2.0], jnp.float32)}
  tx = rst_optax.rst(optax.identity(), 1.0, RHO)
  seen = []
  d, _ = jax.jit(lambda s: tx.update(
      g, s, params, grad_fn=lambda p: seen.append(p) or quadratic_grad(p)))(
          tx.init(params))
  chex.assert_trees_all_equal(d, quadratic_grad(params))


def test_grst_mixes_16_bit_leaves_in_float32():
  """``g + lam (g_sam - g)`` of bfloat16 leaves is computed in float32 and
  rounded once: not in bfloat16, where each operation rounds."""
  g = jnp.asarray([0.1259765625, -0.1318359375, 0.640625, 1.3046875],
                  jnp.bfloat16)
  g_sam = jnp.asarray([0.1376953125, -0.123046875, 0.65625, 1.328125],
                      jnp.bfloat16)
  lam = 2.7
  tx = rst_optax.rst(optax.identity(), 1.0, 0.0, lam=lam)
  d, _ = jax.jit(lambda s: tx.update(g, s, jnp.zeros(4, jnp.bfloat16),
                                     grad_fn=lambda p: g_sam))(
                                         tx.init(jnp.zeros(4, jnp.bfloat16)))
  g32, s32 = g.astype(jnp.float32), g_sam.astype(jnp.float32)
  want = (g32 + jnp.float32(lam) * (s32 - g32)).astype(jnp.bfloat16)
  in_bf16 = g + jnp.bfloat16(lam) * (g_sam - g)
  assert d.dtype == jnp.bfloat16
  np.testing.assert_array_equal(d, want)
  assert not np.array_equal(np.asarray(in_bf16), np.asarray(want))


def test_a_negative_eta_is_refused():
  with pytest.raises(ValueError, match=r'rst: `eta` must be a finite number >= 0'):
    rst_optax.rst(optax.sgd(0.1), adaptive=True, eta=-0.01)


def test_an_unbound_axis_name_is_refused_by_name():
  """``rst(..., axis_name=...)`` under a plain ``jax.jit``, outside any
  shard_map or pmap, is refused by ``rst`` itself, with a message that names
  ``rst`` and ``axis_name``, not by a NameError from inside ``pmean``."""
  params = {'w': jnp.array([0.5, -1.0, 2.0])}
  tx = rst_optax.rst(optax.sgd(0.1), 0.5, 0.05, axis_name='data')
  state = tx.init(params)
  step = lambda p, s: tx.update(quadratic_grad(p), s, p,
                                grad_fn=quadratic_grad)
  with pytest.raises(ValueError, match=r"^rst: `axis_name`='data' is not a "
                     r'bound axis here: `axis_name` needs the update to run '
                     r'inside jax\.shard_map or jax\.pmap'):
    jax.jit(step)(params, state)


# --- every documented composition at every floating dtype ------------------------

COMPOSITIONS = {
    'plain': lambda: rst_optax.rst(optax.sgd(0.1, momentum=0.9), 0.5, RHO),
    # Adam's eps at 1e-3: optax's default 1e-8 is 0 in float16, where Adam
    # alone then gives NaN (0 / 0) on this problem.
    'grst_adaptive': lambda: rst_optax.rst(optax.adam(1e-2, eps=1e-3), 0.5,
                                           RHO, lam=2.0, adaptive=True),
    'mask_reuse': lambda: rst_optax.rst(optax.sgd(0.1), 0.5, RHO, reuse=0.7,
                                        mask={'w': True, 'b': False}),
    'clip_and_decay_inside': lambda: rst_optax.rst(optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3)), 0.5,
        RHO),
    'apply_if_finite_inside': lambda: rst_optax.rst(
        optax.apply_if_finite(optax.sgd(0.1), 3), 0.5, RHO, reuse=0.5),
    'multisteps_around': lambda: optax.MultiSteps(
        rst_optax.rst(optax.sgd(0.1), 0.5, RHO), 2),
    'inject_hyperparams_around': lambda: optax.inject_hyperparams(
        rst_optax.rst)(optax.sgd(0.1), schedule=0.5, rho=RHO, reuse=0.5),
    'masked_inside': lambda: rst_optax.rst(
        optax.masked(optax.sgd(0.1), {'w': True, 'b': False}), 0.5, RHO),
    'multi_transform_inside': lambda: rst_optax.rst(optax.multi_transform(
        {'a': optax.sgd(0.1), 'b': optax.adam(1e-2, eps=1e-3)},
        {'w': 'a', 'b': 'b'}),
        0.5, RHO),
    'reduce_on_plateau_inside': lambda: rst_optax.rst(optax.chain(
        optax.sgd(0.1), optax.contrib.reduce_on_plateau()), 0.5, RHO),
    # The other wrappers of docs/composing.md, each where it says they go.
    'clip_inside': lambda: rst_optax.rst(optax.chain(
        optax.clip(1.0), optax.sgd(0.1)), 0.5, RHO),
    'zero_nans_inside': lambda: rst_optax.rst(optax.chain(
        optax.zero_nans(), optax.sgd(0.1)), 0.5, RHO),
    'add_decayed_weights_inside': lambda: rst_optax.rst(optax.chain(
        optax.add_decayed_weights(1e-2), optax.sgd(0.1)), 0.5, RHO),
    # Around rst (documented: it then checks only the incoming g, and a
    # skipped step rewinds the whole RST state); every step here is finite.
    'apply_if_finite_around': lambda: optax.apply_if_finite(
        rst_optax.rst(optax.sgd(0.1), 0.5, RHO), 3),
}
DTYPES = ['bfloat16', 'float16', 'float32', 'float64']


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('name', COMPOSITIONS)
def test_every_documented_composition_at_every_dtype(name, dtype):
  with jax.enable_x64(dtype == 'float64'):
    dtype = jnp.dtype(dtype)
    params = {'w': jnp.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(3, 2),
              'b': jnp.asarray([0.5, -0.25], dtype)}
    loss_fn = lambda p: jnp.sum((p['w'] - 0.3) ** 4) + jnp.sum(
        jnp.sin(p['b'])).astype(p['w'].dtype)
    grad_fn = jax.grad(loss_fn)
    tx = COMPOSITIONS[name]()
    extra = {'value': jnp.asarray(1.0)} if 'plateau' in name else {}

    @jax.jit
    def step(params, state, take_sam):
      updates, state = tx.update(grad_fn(params), state, params,
                                 grad_fn=grad_fn, take_sam=take_sam, **extra)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    start = params
    plan = (True, False, True, True)
    for take in plan:
      params, state = step(params, state, jnp.asarray(take))
    for leaf in jax.tree.leaves(params):
      assert leaf.dtype == dtype
      assert np.isfinite(np.asarray(leaf, np.float64)).all()
    assert not np.array_equal(np.asarray(params['w'], np.float64),
                              np.asarray(start['w'], np.float64))
    # MultiSteps runs rst on every 2nd call, with that call's take_sam.
    taken = plan[1::2] if name == 'multisteps_around' else plan
    assert int(optax.tree.get(state, 'sam_steps')) == sum(taken)
