"""Numerical faults and edge cases: NaN/Inf, optax.apply_if_finite, extreme
rho, and jax.vmap over the step.

Behaviour under test (documented in ``rst``'s docstring and the README):

- a NaN/Inf in the gradient ``g``: the SAM branch feeds ``g`` itself to the
  base optimizer, so the updates are non-finite exactly where the base
  optimizer's would be; ``grad_fn`` still ran and ``sam_steps`` counts it;
- a NaN/Inf in ``grad_fn``'s output is never masked: it reaches the updates;
- ``rst(optax.apply_if_finite(base, n))`` skips either fault: parameters and
  base state stay as they were, ``count`` and ``sam_steps`` advance;
  ``optax.apply_if_finite(rst(...), n)`` instead rewinds the whole RST state on
  a bad ``g`` and does not see a bad ``grad_fn`` output.
"""

import functools

import _dist_problem as prob
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jaxpr import gradient_conds

import rst_optax

LR = 0.1
LAM = 1.5


def quadratic_grad(params):
  return jax.tree.map(lambda w: 2.0 * (w - 1.0), params)


def small_params():
  return {'w': jnp.linspace(-1.0, 2.0, 5), 'b': jnp.array([0.5, -0.25, 3.0])}


def make_tx(dispatch, base=None, **kwargs):
  """``dispatch='cond'``: the coin in the graph (p = 1 as a schedule, so a
  ``lax.cond`` is traced); ``'host'``: ``take_sam=True`` fixes the branch."""
  base = optax.sgd(LR) if base is None else base
  schedule = optax.constant_schedule(1.0) if dispatch == 'cond' else 0.5
  kwargs = {'rho': 0.05, 'lam': LAM, **kwargs}
  tx = rst_optax.rst(base, schedule=schedule, **kwargs)
  take_sam = None if dispatch == 'cond' else True
  return tx, take_sam


@pytest.mark.parametrize('dispatch', ['cond', 'host'])
@pytest.mark.parametrize('bad', [np.nan, np.inf], ids=['nan', 'inf'])
def test_bad_gradient_is_non_finite_exactly_where_the_base_optimizer_is(
    dispatch, bad):
  params = small_params()
  g = quadratic_grad(params)
  g['w'] = g['w'].at[2].set(bad)
  tx, take_sam = make_tx(dispatch)
  updates, state = jax.jit(lambda g, s: tx.update(
      g, s, params, grad_fn=quadratic_grad, take_sam=take_sam))(
          g, tx.init(params))
  want, _ = optax.sgd(LR).update(g, optax.sgd(LR).init(params))
  for key in want:  # NaN/Inf at the same places, the same finite values
    np.testing.assert_array_equal(updates[key], want[key], err_msg=key)
  assert not np.isfinite(updates['w'][2]) and np.isfinite(updates['b']).all()
  assert int(state.sam_steps) == 1  # grad_fn ran: its pass is counted


@pytest.mark.parametrize('dispatch', ['cond', 'host'])
@pytest.mark.parametrize('lam', [1.0, LAM])
def test_bad_grad_fn_output_reaches_the_updates(dispatch, lam):
  params = small_params()
  g = quadratic_grad(params)

  def bad_grad_fn(p):
    g_sam = quadratic_grad(p)
    return {**g_sam, 'b': g_sam['b'].at[1].set(jnp.nan)}

  tx, take_sam = make_tx(dispatch, lam=lam)
  updates, _ = jax.jit(lambda s: tx.update(
      g, s, params, grad_fn=bad_grad_fn, take_sam=take_sam))(tx.init(params))
  assert np.isnan(updates['b'][1])
  mask = np.ones(3, bool)
  mask[1] = False
  assert np.isfinite(updates['b'][mask]).all()
  assert np.isfinite(updates['w']).all()


FAULT_STEPS = 8


@functools.cache
def fault_step():
  """rst(apply_if_finite(sgd)) and a jitted step whose grad_fn is scaled."""
  base = optax.apply_if_finite(optax.sgd(LR, momentum=0.9), 3)
  tx = rst_optax.rst(base, schedule=0.5, rho=prob.RHO, lam=LAM, seed=0)

  @jax.jit
  def step(params, state, xb, yb, grad_fn_scale):
    g = prob.grad(params, xb, yb)
    grad_fn = lambda p: jax.tree.map(lambda a: a * grad_fn_scale,
                                     prob.grad(p, xb, yb))
    updates, state = tx.update(g, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return tx, step


def fault_run(faults):
  """Trains prob's MLP with rst(apply_if_finite(sgd)) for FAULT_STEPS steps.

  ``faults`` maps a step to 'g' (a NaN in the batch, hence in g) or 'g_sam'
  (``grad_fn`` returns NaN). Without faults, the reference run instead skips
  those steps by hand: parameters and base state kept, clocks advanced.
  """
  faults = dict(faults)
  x, y = prob.make_data(FAULT_STEPS)
  take = rst_optax.decisions(0.5, 0, 0, FAULT_STEPS)
  tx, step = fault_step()
  params = reference = prob.make_params()
  state = ref_state = tx.init(params)
  for t in range(FAULT_STEPS):
    xb, scale = x[t], 1.0
    if faults.get(t) == 'g':
      xb = xb.copy()
      xb[0, 0] = np.nan
    elif faults.get(t) == 'g_sam':
      scale = np.nan
    params, state = step(params, state, xb, y[t], np.float32(scale))
    if t in faults:  # the reference skips the step by hand
      ref_state = ref_state._replace(
          count=ref_state.count + 1,
          sam_steps=ref_state.sam_steps + int(take[t]))
    else:
      reference, ref_state = step(reference, ref_state, x[t], y[t],
                                  np.float32(1.0))
  return params, state, reference, ref_state, take


@pytest.mark.parametrize('faults', [((1, 'g'),), ((3, 'g_sam'),),
                                    ((1, 'g'), (3, 'g_sam'))],
                         ids=['g', 'g_sam', 'both'])
def test_apply_if_finite_on_the_base_skips_the_step_and_keeps_clocks(faults):
  params, state, reference, ref_state, take = fault_run(faults)
  assert all(take[t] for t, _ in faults)  # the faults hit SAM steps
  for key in reference:
    np.testing.assert_array_equal(params[key], reference[key], err_msg=key)
  np.testing.assert_array_equal(state.count, ref_state.count)
  np.testing.assert_array_equal(state.sam_steps, ref_state.sam_steps)
  assert int(state.count) == FAULT_STEPS and int(state.sam_steps) == take.sum()
  for a, b in zip(jax.tree.leaves(state.base_state.inner_state),
                  jax.tree.leaves(ref_state.base_state.inner_state),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(state.base_state.total_notfinite) == len(faults)


def test_apply_if_finite_around_rst_rewinds_the_coin_but_misses_grad_fn():
  """The other placement: optax.apply_if_finite checks rst's *input*. A bad
  g skips the step with the whole RST state rewound (count does not advance,
  so the same coin is drawn again); a bad g_sam goes through unseen."""
  params = small_params()
  g = quadratic_grad(params)
  tx = optax.apply_if_finite(
      rst_optax.rst(optax.sgd(LR), schedule=optax.constant_schedule(1.0)), 3)
  state = tx.init(params)
  bad_g = {**g, 'w': g['w'].at[0].set(jnp.nan)}
  updates, new = tx.update(bad_g, state, params, grad_fn=quadratic_grad)
  assert not any(np.any(u) for u in jax.tree.leaves(updates))
  assert int(new.inner_state.count) == 0 and int(new.total_notfinite) == 1
  nan_grad_fn = lambda p: jax.tree.map(lambda a: a * jnp.nan, p)
  updates, new = tx.update(g, state, params, grad_fn=nan_grad_fn)
  assert np.isnan(updates['w']).all() and int(new.total_notfinite) == 0


def test_huge_rho_is_exact_until_overflow_then_skipped():
  params = small_params()
  g = quadratic_grad(params)
  rho = 1e30
  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho)
  direction, _ = tx.update(g, tx.init(params), params, grad_fn=quadratic_grad)
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64)))
                     for a in jax.tree.leaves(g)))
  for key in g:
    want = 2.0 * (np.asarray(params[key], np.float64)
                  + rho * np.asarray(g[key], np.float64) / norm - 1.0)
    np.testing.assert_allclose(direction[key], want, rtol=1e-5)
  # With a quartic loss, rho = 1e20 overflows float32 in the perturbed
  # gradient 4 w^3: Inf in the updates, which apply_if_finite on the base
  # optimizer skips, clocks advancing.
  quartic_grad = lambda p: jax.tree.map(lambda w: 4.0 * w ** 3, p)
  g = quartic_grad(params)
  base = optax.apply_if_finite(optax.sgd(LR), 3)
  tx = rst_optax.rst(base, schedule=1.0, rho=1e20)
  updates, state = tx.update(g, tx.init(params), params, grad_fn=quartic_grad)
  assert not any(np.any(u) for u in jax.tree.leaves(updates))
  assert int(state.base_state.total_notfinite) == 1
  assert int(state.count) == 1 and int(state.sam_steps) == 1
  raw_tx = rst_optax.rst(optax.sgd(LR), schedule=1.0, rho=1e20)
  raw, _ = raw_tx.update(g, raw_tx.init(params), params,
                         grad_fn=quartic_grad)
  assert not all(np.isfinite(u).all() for u in jax.tree.leaves(raw))


@pytest.mark.parametrize('rho', [0.0, 1e-30])
def test_rho_below_float32_resolution_gives_the_base_direction(rho):
  params = small_params()
  g = quadratic_grad(params)
  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho)
  direction, _ = tx.update(g, tx.init(params), params, grad_fn=quadratic_grad)
  for key in g:
    np.testing.assert_array_equal(direction[key], g[key])


SEEDS = (0, 1, 2, 3)
VMAP_STEPS = 6


def vmap_setup():
  x, y = prob.make_data(VMAP_STEPS)
  tx = rst_optax.rst(optax.sgd(LR, momentum=0.9), schedule=0.5,
                     rho=prob.RHO, lam=LAM)
  params = prob.make_params()
  states = [tx.init(params)._replace(key=jax.random.key_data(
      jax.random.key(seed))) for seed in SEEDS]
  step = lambda p, s, xb, yb: prob.global_step(tx, p, s, xb, yb)
  return x, y, params, states, step


def test_vmap_over_seeds_equals_separate_runs():
  """A batched coin turns lax.cond into a select; the results do not change."""
  x, y, params, states, step = vmap_setup()
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  batched = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None)))
  single = jax.jit(step)
  b_params, b_state = stack([params] * len(SEEDS)), stack(states)
  separate = [(params, state) for state in states]
  for t in range(VMAP_STEPS):
    b_params, b_state = batched(b_params, b_state, x[t], y[t])
    separate = [single(p, s, x[t], y[t]) for p, s in separate]
  for i, seed in enumerate(SEEDS):
    want = rst_optax.decisions(0.5, seed, 0, VMAP_STEPS)
    assert int(b_state.sam_steps[i]) == int(separate[i][1].sam_steps)
    assert int(b_state.sam_steps[i]) == want.sum()
    for key in params:
      np.testing.assert_allclose(b_params[key][i], separate[i][0][key],
                                 rtol=1e-5, atol=1e-6)
  counts = [int(s.sam_steps) for _, s in separate]
  assert len(set(counts)) > 1  # the members took different branches


def test_vmap_batched_coin_becomes_select_shared_coin_stays_cond():
  """Documented cost: with one state per member (batched coin) both branches
  run every step (no cond left); with a shared state the cond remains."""
  x, y, params, states, step = vmap_setup()
  batched_coin = jax.make_jaxpr(jax.vmap(step, in_axes=(0, 0, None, None)))(
      jax.tree.map(lambda a: jnp.stack([a, a]), params),
      jax.tree.map(lambda a: jnp.stack([a, a]), states[0]), x[0], y[0])
  shared_coin = jax.make_jaxpr(jax.vmap(step, in_axes=(None, None, 0, 0)))(
      params, states[0], x[:2], y[:2])
  assert gradient_conds(batched_coin) == 0 and 'select_n' in str(batched_coin)
  assert gradient_conds(shared_coin) == 1


# --- precision -----------------------------------------------------------------

@pytest.mark.parametrize('lam', [1.0, 0.3, 1.7, -0.45])
@pytest.mark.parametrize('rho', [0.0, optax.constant_schedule(0.0)],
                         ids=['python', 'schedule'])
def test_rho_zero_gives_exactly_the_base_direction_at_any_lam(rho, lam):
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for k, shape in (('w', (64,)), ('b', (3, 5)))}
  g = quadratic_grad(params)
  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, lam=lam)
  direction, _ = jax.jit(lambda s: tx.update(g, s, params,
                                             grad_fn=quadratic_grad))(
      tx.init(params))
  chex.assert_trees_all_equal(direction, g)


def test_float64_parameters_are_perturbed_in_float64():
  """Under jax_enable_x64, float64 parameters, rho and lam stay float64:
  the step matches a float64 hand computation to float64 rounding, and
  rho = 0 gives the base direction bit for bit."""
  rho, lam = 0.1 + 1e-12, 1.5 + 1e-11  # not representable in float32
  with jax.enable_x64(True):
    params = {'w': jnp.linspace(-1.0, 2.0, 5, dtype=jnp.float64),
              'b': jnp.asarray([0.5, -0.25], jnp.float64)}
    g = {k: np.asarray(quadratic_grad(params)[k]) + 1e-9 for k in params}
    seen = []

    def grad_fn(p):
      seen.append(p)
      return quadratic_grad(p)

    tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, lam=lam)
    d, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
    zero = rst_optax.rst(optax.identity(), schedule=1.0, rho=0.0, lam=lam)
    g_exact = quadratic_grad(params)
    d_zero, _ = zero.update(g_exact, zero.init(params), params,
                            grad_fn=quadratic_grad)
  w64 = {k: np.asarray(v) for k, v in params.items()}
  norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in g))
  perturbed = {k: w64[k] + rho * g[k] / norm for k in w64}
  want = {k: g[k] + lam * (2.0 * (perturbed[k] - 1.0) - g[k]) for k in g}
  for k in params:
    assert seen[0][k].dtype == d[k].dtype == d_zero[k].dtype == np.float64
  chex.assert_trees_all_close(seen[0], perturbed, rtol=1e-13, atol=1e-14)
  chex.assert_trees_all_close(d, want, rtol=1e-13, atol=1e-15)
  chex.assert_trees_all_equal(d_zero, g_exact)


# --- the gradient norm never overflows ------------------------------------------

@pytest.mark.parametrize('big', [1e20, 1e30, 3e38])
@pytest.mark.parametrize('dispatch', ['cond', 'host'])
def test_huge_finite_gradient_takes_its_sam_step(big, dispatch):
  """Entries whose float32 squares overflow: the scaled norm still gives
  the exact perturbation, and the SAM gradient reaches the updates."""
  params = small_params()
  g = {'w': jnp.asarray([big, -big, 0.0, big / 2, 1.0], jnp.float32),
       'b': jnp.asarray([-big, 3.0, big / 4], jnp.float32)}
  assert not np.isfinite(np.sum(np.square(g['w'])))  # the float32 trap
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.tree.map(lambda w: w - 1.0, p)

  rho = 0.3
  tx, take_sam = make_tx(dispatch, optax.identity(), rho=rho, lam=1.0)
  d, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn,
                       take_sam=take_sam)
  g64 = {k: np.asarray(v, np.float64) for k, v in g.items()}
  norm = np.sqrt(sum(np.sum(a ** 2) for a in g64.values()))
  want = {k: np.asarray(params[k], np.float64) + rho * g64[k] / norm
          for k in g64}
  if dispatch == 'host':  # seen holds concrete arrays only here
    chex.assert_trees_all_close(seen[0], want, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(d, {k: want[k] - 1.0 for k in want}, rtol=1e-6,
                              atol=1e-6)
  assert int(state.sam_steps) == 1


def test_huge_asam_product_takes_its_sam_step():
  """|w| g overflows float32 (1e20 * 1e20); the ASAM step is still exact."""
  params = {'w': jnp.asarray([1e20, -2e20, 0.0, 1.0], jnp.float32)}
  g = {'w': jnp.asarray([1e20, 1e19, 5.0, -1e20], jnp.float32)}
  assert not np.isfinite(np.float32(1e20) * np.float32(1e20))
  seen = []

  def grad_fn(p):
    seen.append(p)
    return p

  rho, eta = 1e-3, 0.01
  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, adaptive=True,
                     eta=eta)
  d, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  w64, g64 = (np.asarray(t['w'], np.float64) for t in (params, g))
  s = np.abs(w64) + eta
  want = w64 + rho * s ** 2 * g64 / np.sqrt(np.sum((s * g64) ** 2))
  chex.assert_trees_all_close(seen[0]['w'], want, rtol=1e-6, atol=1e-30)
  assert np.isfinite(d['w']).all()


# --- values from schedules that construction cannot check ------------------------

@pytest.mark.parametrize('rho', [lambda t: -0.5, lambda t: jnp.nan,
                                 lambda t: -jnp.inf],
                         ids=['negative', 'nan', '-inf'])
@pytest.mark.parametrize('dispatch', ['cond', 'host'])
def test_negative_or_nan_rho_from_a_schedule_is_taken_as_zero(rho, dispatch):
  params = small_params()
  g = quadratic_grad(params)
  calls = []

  def grad_fn(p):
    jax.debug.callback(lambda *leaves: calls.append(leaves),
                       *jax.tree.leaves(p))
    return quadratic_grad(p)

  tx, take_sam = make_tx(dispatch, optax.identity(), rho=rho)
  d, state = jax.jit(lambda s: tx.update(g, s, params, grad_fn=grad_fn,
                                         take_sam=take_sam))(tx.init(params))
  jax.effects_barrier()
  chex.assert_trees_all_equal(list(calls[0]), jax.tree.leaves(params))
  chex.assert_trees_all_equal(d, g)  # g_sam = g, and g + lam (g - g) = g
  assert int(state.sam_steps) == 1


@pytest.mark.parametrize('eta', [None, 0.01], ids=['sam', 'asam'])
@pytest.mark.parametrize('scale', [1e-3, 1.0, 1e6])
def test_direct_and_scaled_perturbations_agree(eta, scale):
  """On CPU an ordinary gradient takes the direct norm; GPU and TPU always
  take the scaled one (``jax.lax.platform_dependent``). Both are the same
  perturbation, to float32 rounding, so the scaled path is checked here."""
  from rst_optax import _norms

  rng = np.random.default_rng(0)
  g = [jnp.asarray(rng.standard_normal(s) * scale, jnp.float32)
       for s in ((7, 3), (5,), ())]
  w = [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in g]
  direct, finite = jax.jit(
      lambda g, w: _norms.perturbation(g, w, 0.05, 1e-12, eta))(g, w)
  scaled, scaled_finite = jax.jit(
      lambda g, w: _norms.scaled_perturbation(g, w, 0.05, 1e-12, eta))(g, w)
  assert bool(finite) and bool(scaled_finite)
  chex.assert_trees_all_close(direct, scaled, rtol=1e-5, atol=1e-12)
