"""Behaviour of `rst_optax.rst`: branches, mixing, coin, dtypes, composition."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _jaxpr import gradient_conds

import rst_optax
from rst_optax import schedules


def sam_direction_by_hand(params, grad_fn, rho, eps=1e-12):
  g = grad_fn(params)
  norm = jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2)
                      for x in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, gi: w + rho * gi / (norm + eps), params, g)
  return grad_fn(perturbed)


def nan_grad_fn(params):
  return jax.tree.map(lambda w: jnp.full_like(w, jnp.nan), params)


def run(tx, params, loss_fn, steps, grad_fn=None, state=None):
  """Trains `steps` jitted steps; returns final params, state and updates."""
  grad = jax.grad(loss_fn)
  grad_fn = grad if grad_fn is None else grad_fn

  def step(params, state):
    updates, state = tx.update(grad(params), state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, updates

  step = jax.jit(step)
  state = tx.init(params) if state is None else state
  history = []
  for _ in range(steps):
    params, state, updates = step(params, state)
    history.append(updates)
  return params, state, history


# --- p = 0 and p = 1 -------------------------------------------------------

@pytest.mark.parametrize('schedule', [0.0, optax.constant_schedule(0.0)],
                         ids=['python-zero', 'schedule-zero'])
def test_p0_is_base_optimizer_bit_for_bit_and_never_calls_grad_fn(
    problem, schedule):
  params, loss_fn = problem
  base = optax.adam(1e-2)
  tx = rst_optax.rst(base, schedule=schedule, rho=0.05)
  got, state, _ = run(tx, params, loss_fn, 50, grad_fn=nan_grad_fn)

  # The same jitted loop with the base optimizer alone.
  want, base_state, _ = run(optax.with_extra_args_support(base), params,
                            loss_fn, 50)
  chex.assert_trees_all_equal(got, want)
  chex.assert_trees_all_equal(state.base_state, base_state)
  assert int(state.count) == 50 and int(state.sam_steps) == 0


@pytest.mark.parametrize('schedule', [1.0, optax.constant_schedule(1.0)],
                         ids=['python-one', 'schedule-one'])
def test_p1_lam1_is_sam_by_hand(problem, schedule):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  rho = 0.1
  tx = rst_optax.rst(optax.sgd(0.05), schedule=schedule, rho=rho)
  state = tx.init(params)
  want_params = params
  got_params = params
  update = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  for _ in range(10):
    updates, state = update(got_params, state)
    got_params = optax.apply_updates(got_params, updates)
    g_sam = sam_direction_by_hand(want_params, grad_fn, rho)
    want_params = jax.tree.map(lambda w, g: w - 0.05 * g, want_params, g_sam)
  chex.assert_trees_all_close(got_params, want_params, rtol=1e-6, atol=1e-7)
  assert int(state.sam_steps) == 10


def test_p1_matches_optax_contrib_sam_opaque(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  rho, lr = 0.05, 0.1
  ours = rst_optax.rst(optax.sgd(lr, momentum=0.9), schedule=1.0, rho=rho)
  theirs = optax.contrib.sam(
      optax.sgd(lr, momentum=0.9),
      optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      opaque_mode=True)
  ours_p, theirs_p = params, params
  ours_s, theirs_s = ours.init(params), theirs.init(params)
  for _ in range(20):
    u, ours_s = ours.update(grad_fn(ours_p), ours_s, ours_p, grad_fn=grad_fn)
    ours_p = optax.apply_updates(ours_p, u)
    u, theirs_s = theirs.update(grad_fn(theirs_p), theirs_s, theirs_p,
                                grad_fn=lambda p, _: grad_fn(p))
    theirs_p = optax.apply_updates(theirs_p, u)
  chex.assert_trees_all_close(ours_p, theirs_p, rtol=1e-5, atol=1e-6)


# --- G-RST ----------------------------------------------------------------

@pytest.mark.parametrize('lam', [0.0, 0.3, 2.0, -0.5])
def test_grst_direction_is_the_exact_mix(problem, lam):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  rho = 0.2
  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, lam=lam)
  direction, _ = tx.update(grad_fn(params), tx.init(params), params,
                           grad_fn=grad_fn)
  g = grad_fn(params)
  g_sam = sam_direction_by_hand(params, grad_fn, rho)
  want = jax.tree.map(lambda a, b: (1.0 - lam) * a + lam * b, g, g_sam)
  chex.assert_trees_all_close(direction, want, rtol=1e-6, atol=1e-7)


def test_grst_expected_direction_over_the_coin(problem):
  """E[d | w] = (1 - p lam) g + p lam g_sam, checked over 4000 coin draws."""
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  p, lam, rho, steps = 0.3, 2.0, 0.2, 4000
  tx = rst_optax.rst(optax.identity(), schedule=p, rho=rho, lam=lam, seed=7)
  g = grad_fn(params)

  def body(state, _):
    d, state = tx.update(g, state, params, grad_fn=grad_fn)
    return state, d

  state, directions = jax.lax.scan(body, tx.init(params), None, length=steps)
  mean_d = jax.tree.map(lambda x: x.mean(axis=0), directions)
  g_sam = sam_direction_by_hand(params, grad_fn, rho)
  frac = int(state.sam_steps) / steps
  # The sample mean is exactly g + frac * lam * (g_sam - g) ...
  sample = jax.tree.map(lambda a, b: a + frac * lam * (b - a), g, g_sam)
  # ... and frac concentrates at p: 5 standard deviations.
  assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / steps)
  expected = jax.tree.map(lambda a, b: (1 - p * lam) * a + p * lam * b, g, g_sam)
  bound = 5 * np.sqrt(p * (1 - p) / steps) * lam
  for x, y, e, a, b in zip(*map(jax.tree.leaves,
                                (mean_d, sample, expected, g, g_sam)),
                           strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(np.asarray(x - e)) <= bound * np.abs(b - a) + 1e-5)


# --- the coin ---------------------------------------------------------------

def in_graph_decisions(schedule, seed, steps):
  """Runs `steps` jitted updates; returns which ones took the SAM branch."""
  params = jnp.zeros(3)
  tx = rst_optax.rst(optax.identity(), schedule=schedule, rho=1.0, seed=seed)
  g = jnp.ones(3)

  def body(state, _):
    before = state.sam_steps
    _, state = tx.update(g, state, params, grad_fn=lambda p: -jnp.ones(3))
    return state, state.sam_steps > before

  state, took = jax.lax.scan(body, tx.init(params), None, length=steps)
  return np.asarray(took), state


@pytest.mark.parametrize('schedule', [
    0.3,
    schedules.linear(0.1, 0.9, 3000),
    schedules.trigonometric(1.0, 0.0, 3000),
    schedules.piecewise(0.2, 0.7, 1000),
], ids=['constant', 'linear', 'trigonometric', 'piecewise'])
def test_sam_fraction_and_decisions_match_the_schedule(schedule):
  steps = 3000
  took, state = in_graph_decisions(schedule, 3, steps)
  # sam_steps counts exactly the branches taken.
  assert int(state.sam_steps) == took.sum()
  assert int(state.count) == steps
  # The host-side decisions are the in-graph ones, step by step.
  np.testing.assert_array_equal(took, rst_optax.decisions(schedule, 3, 0, steps))
  # The fraction matches mean p within 5 standard deviations of the sum of
  # independent Bernoulli(p_t) draws.
  fn = schedule if callable(schedule) else (lambda t: schedule)
  probs = np.array([float(fn(t)) for t in range(steps)])
  sigma = np.sqrt(np.sum(probs * (1 - probs))) / steps
  assert abs(took.mean() - probs.mean()) < 5 * sigma
  assert probs.mean() == pytest.approx(
      schedules.mean_probability(schedule, steps), abs=1e-6)


def test_decisions_depend_only_on_seed_and_step():
  whole = rst_optax.decisions(0.5, 11, 0, 500)
  np.testing.assert_array_equal(whole[200:350],
                                rst_optax.decisions(0.5, 11, 200, 350))
  # An int seed and the key made from it agree, typed or raw.
  np.testing.assert_array_equal(
      whole, rst_optax.decisions(0.5, jax.random.key(11), 0, 500))
  np.testing.assert_array_equal(
      whole, rst_optax.decisions(0.5, jax.random.PRNGKey(11), 0, 500))
  assert not np.array_equal(whole, rst_optax.decisions(0.5, 12, 0, 500))


def test_schedule_values_are_clipped_to_unit_interval():
  above = rst_optax.decisions(lambda t: 1.7, 0, 0, 200)
  below = rst_optax.decisions(lambda t: -0.4, 0, 0, 200)
  assert above.all() and not below.any()


def test_decisions_rejects_bad_ranges():
  with pytest.raises(ValueError, match='`stop` must be an int >= 5'):
    rst_optax.decisions(0.5, 0, 5, 2)
  with pytest.raises(ValueError, match='`start`'):
    rst_optax.decisions(0.5, 0, -1, 2)
  with pytest.raises(ValueError, match='`schedule`'):
    rst_optax.decisions(1.5, 0, 0, 2)
  with pytest.raises(TypeError, match='`seed`'):
    rst_optax.decisions(0.5, 'zero', 0, 2)


def test_resume_from_count_continues_the_same_run(problem):
  """A fresh state given only the saved (count, sam_steps, base_state)
  continues bit for bit: nothing else about the coin is carried in state."""
  params, loss_fn = problem
  tx = rst_optax.rst(optax.sgd(0.01, momentum=0.9), schedule=0.5, seed=5)
  full_params, full_state, _ = run(tx, params, loss_fn, 40)
  mid_params, mid_state, _ = run(tx, params, loss_fn, 25)

  again = rst_optax.rst(optax.sgd(0.01, momentum=0.9), schedule=0.5, seed=5)
  state = again.init(mid_params)._replace(
      count=mid_state.count, sam_steps=mid_state.sam_steps,
      base_state=mid_state.base_state)
  p, state, _ = run(again, mid_params, loss_fn, 15, state=state)
  chex.assert_trees_all_equal(p, full_params)
  chex.assert_trees_all_equal(state, full_state)
  assert (int(full_state.sam_steps) - int(mid_state.sam_steps)
          == rst_optax.decisions(0.5, 5, 25, 40).sum())


# --- compilation and branches ----------------------------------------------

def test_one_compilation_for_a_run_with_both_branches(problem):
  params, loss_fn = problem
  grad = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.sgd(0.01), schedule=0.5, seed=1)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(grad(params), state, params, grad_fn=grad)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(30):
    params, state = step(params, state)
  assert 0 < int(state.sam_steps) < 30  # both branches ran
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_take_sam_python_bool_fixes_the_branch_without_cond(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.identity(), schedule=0.5, rho=0.1)
  state = tx.init(params)
  g = grad_fn(params)
  d_sam, s_sam = tx.update(g, state, params, grad_fn=grad_fn, take_sam=True)
  d_base, s_base = tx.update(g, state, params, grad_fn=nan_grad_fn,
                             take_sam=False)
  chex.assert_trees_all_equal(d_base, g)
  chex.assert_trees_all_close(d_sam, sam_direction_by_hand(params, grad_fn, 0.1),
                              rtol=1e-6)
  assert int(s_sam.sam_steps) == 1 and int(s_base.sam_steps) == 0
  jaxpr = jax.make_jaxpr(
      lambda p, s: tx.update(g, s, p, grad_fn=grad_fn,
                             take_sam=True))(params, state)
  assert gradient_conds(jaxpr) == 0
  jaxpr = jax.make_jaxpr(
      lambda p, s: tx.update(g, s, p, grad_fn=grad_fn))(params, state)
  assert gradient_conds(jaxpr) == 1


def test_take_sam_array_overrides_the_coin(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.identity(), schedule=0.5, rho=0.1)
  state = tx.init(params)
  g = grad_fn(params)
  step = jax.jit(lambda s, take: tx.update(g, s, params, grad_fn=grad_fn,
                                           take_sam=take))
  d, s = step(state, jnp.array(True))
  chex.assert_trees_all_close(d, sam_direction_by_hand(params, grad_fn, 0.1),
                              rtol=1e-6)
  assert int(s.sam_steps) == 1
  d, s = step(state, jnp.array(False))
  chex.assert_trees_all_equal(d, g)
  assert int(s.sam_steps) == 0


def test_rho_and_lam_schedules_are_read_at_the_step_count(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.identity(), schedule=1.0,
                     rho=lambda t: 0.01 * (t + 1), lam=lambda t: 0.5 * t)
  state = tx.init(params)
  g = grad_fn(params)
  for t in range(3):
    d, state = tx.update(g, state, params, grad_fn=grad_fn)
    g_sam = sam_direction_by_hand(params, grad_fn, 0.01 * (t + 1))
    lam = 0.5 * t
    want = jax.tree.map(lambda a, b, lam=lam: (1 - lam) * a + lam * b, g, g_sam)
    chex.assert_trees_all_close(d, want, rtol=1e-6, atol=1e-7)


# --- ASAM, dtypes, zero gradient ----------------------------------------------

@pytest.mark.parametrize('eta', [0.0, 0.01, 0.5])
def test_adaptive_perturbation_is_asam_with_eta(eta):
  """e = rho (|w| + eta)^2 g / ||(|w| + eta) g||, by hand; with eta > 0 a
  parameter at zero is perturbed too."""
  params = {'w': jnp.array([0.0, -2.0, 0.5]), 'b': jnp.array(1.5)}
  g = {'w': jnp.array([1.0, 0.25, -3.0]), 'b': jnp.array(-0.5)}
  rho, seen = 0.5, []

  def recording_grad_fn(p):
    seen.append(p)
    return jax.tree.map(lambda w: 2.0 * w, p)

  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, adaptive=True,
                     eta=eta)
  d, _ = tx.update(g, tx.init(params), params, grad_fn=recording_grad_fn)
  w64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
  g64 = {k: np.asarray(v, np.float64) for k, v in g.items()}
  s = {k: np.abs(w64[k]) + eta for k in w64}
  norm = np.sqrt(sum(np.sum((s[k] * g64[k]) ** 2) for k in w64))
  want = {k: w64[k] + rho * s[k] ** 2 * g64[k] / norm for k in w64}
  chex.assert_trees_all_close(seen[0], want, rtol=1e-6)
  assert (seen[0]['w'][0] != 0.0) == (eta > 0)  # w = 0 moves iff eta > 0
  chex.assert_trees_all_equal(d, recording_grad_fn(seen[0]))
  # The default eta is 0.01.
  default = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho,
                          adaptive=True)
  d_default, _ = default.update(g, default.init(params), params,
                                grad_fn=recording_grad_fn)
  if eta == 0.01:
    chex.assert_trees_all_equal(d_default, d)
  # eta only acts with adaptive=True.
  plain = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, eta=eta)
  d_plain, _ = plain.update(g, plain.init(params), params,
                            grad_fn=recording_grad_fn)
  norm = np.sqrt(sum(np.sum(g64[k] ** 2) for k in g64))
  chex.assert_trees_all_close(
      d_plain, {k: 2.0 * (w64[k] + rho * g64[k] / norm) for k in w64},
      rtol=1e-6)


@pytest.mark.parametrize('dtype, big', [(jnp.bfloat16, 1e18),
                                        (jnp.float16, 300.0)])
def test_low_precision_params_norm_in_float32(dtype, big):
  """Large gradients in low precision: the f32 norm keeps the step exact."""
  params = {'a': jnp.ones(4, dtype), 'b': jnp.ones((2, 2), dtype)}
  g = {'a': jnp.full(4, big, dtype), 'b': jnp.full((2, 2), big, dtype)}
  if dtype == jnp.float16:
    assert not jnp.isfinite(jnp.sum(g['a'] ** 2))  # the float16 trap is real
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.tree.map(jnp.ones_like, p)

  rho = 0.25
  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho)
  d, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  # All 8 entries equal: the unit direction is 1/sqrt(8) in each entry.
  want = (1.0 + rho / np.sqrt(8.0))
  for leaf in jax.tree.leaves(seen[0]):
    assert leaf.dtype == dtype
    np.testing.assert_allclose(np.asarray(leaf, np.float32),
                               np.asarray(jnp.asarray(want, dtype), np.float32))
  for leaf in jax.tree.leaves(d):
    assert leaf.dtype == dtype and jnp.all(jnp.isfinite(leaf))


@pytest.mark.parametrize('adaptive', [False, True])
def test_zero_gradient_gives_finite_output(adaptive):
  params = {'w': jnp.ones(3), 'b': jnp.zeros(2)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return zeros

  tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0, adaptive=adaptive)
  u, _ = tx.update(zeros, tx.init(params), params, grad_fn=grad_fn)
  for leaf in jax.tree.leaves((u, seen[0])):
    assert jnp.all(jnp.isfinite(leaf))
  # No perturbation along a zero gradient.
  chex.assert_trees_all_equal(seen[0], params)
  # optax.contrib.normalize divides by a zero norm.
  nan_u, _ = optax.contrib.normalize().update(zeros, None)
  assert not jnp.all(jnp.isfinite(nan_u['w']))


# --- composition with Optax ------------------------------------------------------

def test_extra_args_are_forwarded_to_the_base_optimizer(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  received = {}

  def update(updates, state, params=None, **extra):
    received.update(extra)
    return optax.tree.scale(extra['scale'], updates), state

  base = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                               update)
  tx = rst_optax.rst(base, schedule=0.0)
  g = grad_fn(params)
  u, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn, scale=3.0,
                   loss=1.25)
  assert received == {'scale': 3.0, 'loss': 1.25}  # grad_fn is not forwarded
  chex.assert_trees_all_equal(u, optax.tree.scale(3.0, g))
  # A plain GradientTransformation base accepts (and ignores) extra args.
  tx = rst_optax.rst(optax.sgd(0.1), schedule=0.0)
  u, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn, loss=1.0)
  chex.assert_trees_all_equal(u, optax.tree.scale(-0.1, g))


def test_inside_optax_chain(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  chained = optax.chain(
      rst_optax.rst(optax.identity(), schedule=1.0, rho=0.1),
      optax.scale(-0.5))
  state = chained.init(params)
  u, state = chained.update(grad_fn(params), state, params, grad_fn=grad_fn)
  want = optax.tree.scale(-0.5, sam_direction_by_hand(params, grad_fn, 0.1))
  chex.assert_trees_all_close(u, want, rtol=1e-6)
  assert int(state[0].sam_steps) == 1


def test_inject_hyperparams_over_rho_and_lam(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = optax.inject_hyperparams(rst_optax.rst, static_args=('seed',))(
      optax.identity(), schedule=1.0, rho=0.1, lam=1.0)
  state = tx.init(params)
  g = grad_fn(params)
  step = jax.jit(lambda s: tx.update(g, s, params, grad_fn=grad_fn))
  d, _ = step(state)
  chex.assert_trees_all_close(d, sam_direction_by_hand(params, grad_fn, 0.1),
                              rtol=1e-6)
  state.hyperparams['rho'] = jnp.asarray(0.3)
  state.hyperparams['lam'] = jnp.asarray(0.5)
  d, new_state = step(state)
  g_sam = sam_direction_by_hand(params, grad_fn, 0.3)
  want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, g, g_sam)
  chex.assert_trees_all_close(d, want, rtol=1e-5)
  assert int(new_state.inner_state.sam_steps) == 1


def test_state_is_a_plain_pytree(problem):
  params, _ = problem
  state = rst_optax.rst(optax.adam(1e-3)).init(params)
  assert isinstance(state, rst_optax.RSTState)
  assert state.count.dtype == jnp.int32 and state.sam_steps.dtype == jnp.int32
  assert state.key.dtype == jnp.uint32
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  assert int(optax.tree.get(state, 'sam_steps')) == 0
  # Round trip through flatten/unflatten and host arrays.
  leaves, treedef = jax.tree.flatten(state)
  rebuilt = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
  chex.assert_trees_all_equal(rebuilt, state)


# --- bad input -------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, name', [
    ({'rho': -0.1}, 'rho'),
    ({'rho': float('nan')}, 'rho'),
    ({'rho': float('inf')}, 'rho'),
    ({'rho': 'big'}, 'rho'),
    ({'schedule': 1.5}, 'schedule'),
    ({'schedule': -0.1}, 'schedule'),
    ({'schedule': float('nan')}, 'schedule'),
    ({'schedule': '0.5'}, 'schedule'),
    ({'schedule': [0.5]}, 'schedule'),
    ({'lam': float('inf')}, 'lam'),
    ({'lam': float('nan')}, 'lam'),
    ({'eps': 0.0}, 'eps'),
    ({'eps': -1e-9}, 'eps'),
    ({'seed': 1.5}, 'seed'),
    ({'seed': 'abc'}, 'seed'),
    ({'seed': None}, 'seed'),
    ({'adaptive': 'yes'}, 'adaptive'),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
  with pytest.raises((ValueError, TypeError), match=f'`{name}`'):
    rst_optax.rst(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize('base_tx', [None, optax.sgd, 'sgd', (1, 2)])
def test_bad_base_tx_raises(base_tx):
  with pytest.raises(TypeError, match='`base_tx`'):
    rst_optax.rst(base_tx)


def test_update_without_grad_fn_says_how_to_pass_it(problem):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.sgd(0.1))
  with pytest.raises(ValueError, match=r'grad_fn=jax\.grad'):
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params)


@pytest.mark.parametrize('name', ['rho', 'lam', 'schedule', 'eps', 'eta'])
@pytest.mark.parametrize('value', [True, False, np.bool_(True),
                                   np.array(True), jnp.array(False)],
                         ids=['True', 'False', 'np.bool_', 'np-0d', 'jnp-0d'])
def test_bools_are_not_numbers(name, value):
  with pytest.raises(TypeError, match=f'rst: `{name}` must be'):
    rst_optax.rst(optax.sgd(0.1), **{name: value})


@pytest.mark.parametrize('name', ['rho', 'lam', 'schedule', 'eps', 'eta'])
@pytest.mark.parametrize('value', [np.str_('0.5'), np.array('0.5'),
                                   np.complex64(0.5), np.array([0.5])],
                         ids=['np.str_', 'np-0d-str', 'complex', 'vector'])
def test_strings_complex_and_arrays_are_not_numbers(name, value):
  with pytest.raises(TypeError, match=f'rst: `{name}` must be'):
    rst_optax.rst(optax.sgd(0.1), **{name: value})


def test_numpy_and_jax_scalars_are_numbers():
  tx = rst_optax.rst(optax.sgd(0.1), schedule=np.float32(0.5),
                     rho=jnp.asarray(0.1), lam=np.int64(2), eps=np.float64(1e-9),
                     eta=np.array(0.02))
  params = jnp.ones(2)
  tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


def test_eps_must_stay_positive_in_float32():
  tiny = float(np.finfo(np.float32).tiny)
  with pytest.raises(ValueError, match='`eps`'):
    rst_optax.rst(optax.sgd(0.1), eps=1e-50)  # rounds to 0 in float32
  with pytest.raises(ValueError, match='`eps`'):
    rst_optax.rst(optax.sgd(0.1), eps=tiny / 2)
  # At the smallest normal, a zero gradient still gives finite updates.
  tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0, eps=tiny)
  zeros = jnp.zeros(3)
  u, _ = tx.update(zeros, tx.init(zeros), zeros, grad_fn=lambda p: p)
  assert jnp.all(jnp.isfinite(u))


@pytest.mark.parametrize('seed, error', [
    (2**70, ValueError), (2**63, ValueError), (-(2**63) - 1, ValueError),
    (np.uint64(2**64 - 1), ValueError),
    (np.zeros(3, np.uint32), ValueError), (np.zeros(4, np.uint32), ValueError),
    (jax.random.split(jax.random.key(0), 2), TypeError),
    (np.bool_(True), TypeError), (True, TypeError),
])
def test_bad_seeds_are_refused_by_name(seed, error):
  with pytest.raises(error, match='`seed`'):
    rst_optax.rst(optax.sgd(0.1), seed=seed)


@pytest.mark.parametrize('seed', [2**63 - 1, -(2**63), np.int64(5),
                                  jax.random.key(1, impl='rbg'),
                                  jax.random.PRNGKey(3)])
def test_seeds_in_range_are_accepted(seed):
  tx = rst_optax.rst(optax.sgd(0.1), seed=seed)
  tx.init(jnp.ones(2))


@pytest.mark.parametrize('take_sam', ['False', 0.7, 1, 0, np.float32(1.0),
                                      jnp.array(1.0), jnp.array([True])])
def test_take_sam_must_be_a_bool(problem, take_sam):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.sgd(0.1))
  with pytest.raises(TypeError, match='rst: `take_sam` must be'):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn,
              take_sam=take_sam)


@pytest.mark.parametrize('name', ['schedule', 'rho', 'lam'])
@pytest.mark.parametrize('output', [lambda t: jnp.full(2, 0.5),
                                    lambda t: t > 3, lambda t: 'half'],
                         ids=['vector', 'bool', 'str'])
def test_schedules_must_return_scalars_checked_when_tracing(
    problem, name, output):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.sgd(0.1), **{name: output})
  if name != 'schedule':  # rho and lam are read on the SAM branch
    tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0, **{name: output})
  state = tx.init(params)
  with pytest.raises(TypeError, match=f'rst: the `{name}` schedule must '
                     'return a real scalar'):
    jax.jit(lambda s: tx.update(grad_fn(params), s, params,
                                grad_fn=grad_fn))(state)


def test_grad_fn_passed_positionally_says_by_keyword(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.sgd(0.1))
  with pytest.raises(TypeError, match='`grad_fn`.*by keyword'):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn)


def bad_grad_fns(loss_fn):
  """grad_fn outputs that are not gradients, and the message they get."""
  grad = jax.grad(loss_fn)
  return {
      'wrong-shape': (lambda p: {**grad(p), 'b': jnp.zeros((3, 1))},
                      r'shapes of `params`; at \[\'b\'\] got \(3, 1\)'),
      'the-loss': (loss_fn, 'looks like the loss itself'),
      'value-and-grad': (lambda p: jax.value_and_grad(loss_fn)(p),
                         r'jax\.value_and_grad'),
      'has-aux': (lambda p: (grad(p), {'aux': 1.0}), 'has_aux'),
      'int-dtype': (lambda p: jax.tree.map(lambda a: jnp.zeros(a.shape, int),
                                           p), 'real floating dtype'),
      'complex': (lambda p: jax.tree.map(lambda a: a + 0j, p), 'complex'),
      'missing-leaf': (lambda p: {'w': grad(p)['w']}, 'tree structure'),
  }


@pytest.mark.parametrize('case', ['wrong-shape', 'the-loss', 'value-and-grad',
                                  'has-aux', 'int-dtype', 'complex',
                                  'missing-leaf'])
@pytest.mark.parametrize('dispatch', ['cond', 'static'])
def test_grad_fn_output_is_checked_when_tracing(problem, case, dispatch):
  params, loss_fn = problem
  bad, message = bad_grad_fns(loss_fn)[case]
  tx = rst_optax.rst(optax.sgd(0.1))
  take_sam = True if dispatch == 'static' else None
  g = jax.grad(loss_fn)(params)
  with pytest.raises((TypeError, ValueError), match='grad_fn') as info:
    jax.make_jaxpr(lambda s: tx.update(g, s, params, grad_fn=bad,
                                       take_sam=take_sam))(tx.init(params))
  assert info.match(message)


def test_complex_parameters_are_refused(problem):
  params = {'w': jnp.ones(3, jnp.complex64), 'b': jnp.zeros(2)}
  tx = rst_optax.rst(optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"rst: .*`params`.*\['w'\] is complex"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


def test_updates_must_match_params(problem):
  params, loss_fn = problem
  tx = rst_optax.rst(optax.sgd(0.1))
  g = jax.grad(loss_fn)(params)
  with pytest.raises(ValueError, match='rst: `updates` must have the tree'):
    tx.update({'w': g['w']}, tx.init(params), params, grad_fn=jax.grad(loss_fn))


@pytest.mark.parametrize('wrapper', ['masked', 'multi_transform'])
def test_inside_masked_or_multi_transform_raises_with_the_supported_form(
    problem, wrapper):
  params, loss_fn = problem
  inner = rst_optax.rst(optax.sgd(0.1))
  if wrapper == 'masked':
    tx = optax.masked(inner, {'w': True, 'b': False})
  else:
    tx = optax.multi_transform({'sam': inner, 'plain': optax.sgd(0.1)},
                               {'w': 'sam', 'b': 'plain'})
  with pytest.raises(ValueError, match=r'rst: .*MaskedNode.*'
                     r'rst\(optax\.multi_transform\(\.\.\.\)'):
    tx.init(params)


# --- SAM on a subset of the parameters (mask) ---------------------------------

def subset_by_hand(params, g, rho, selected, adaptive=False, eta=0.0):
  """The perturbed params when only ``selected`` keys are perturbed, the norm
  taken over them alone (float64)."""
  w64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
  g64 = {k: np.asarray(v, np.float64) for k, v in g.items()}
  s = {k: np.abs(w64[k]) + eta if adaptive else 1.0 for k in w64}
  norm = np.sqrt(sum(np.sum((s[k] * g64[k]) ** 2) for k in selected))
  return {k: w64[k] + rho * s[k] ** 2 * g64[k] / norm if k in selected
          else w64[k] for k in w64}


def three_leaves():
  params = {'w': jnp.array([1.0, -2.0, 0.5]), 'b': jnp.array([0.3, 0.0]),
            'scale': jnp.array(2.0)}
  g = {'w': jnp.array([0.5, 0.25, -1.0]), 'b': jnp.array([4.0, -3.0]),
       'scale': jnp.array(10.0)}
  return params, g


@pytest.mark.parametrize('mask', [
    {'w': True, 'b': True, 'scale': False},
    lambda p: {k: k != 'scale' for k in p},
], ids=['tree', 'callable'])
@pytest.mark.parametrize('adaptive', [False, True])
def test_mask_perturbs_the_subset_with_its_own_norm(mask, adaptive):
  params, g = three_leaves()
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jax.tree.map(lambda w: 3.0 * w, p)

  rho, lam = 0.4, 1.5
  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, lam=lam,
                     mask=mask, adaptive=adaptive, eta=0.1)
  d, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  want = subset_by_hand(params, g, rho, ('w', 'b'), adaptive, 0.1)
  chex.assert_trees_all_close(seen[0], want, rtol=1e-6)
  # The SAM gradient and the mix still cover every leaf.
  want_d = {k: (1 - lam) * np.asarray(g[k]) + lam * 3.0 * want[k]
            for k in want}
  chex.assert_trees_all_close(d, want_d, rtol=1e-6, atol=1e-6)


def test_mask_prefix_and_all_false_refused():
  params = {'enc': {'w': jnp.ones(2), 'b': jnp.ones(1)}, 'head': jnp.ones(3)}
  g = jax.tree.map(lambda a: 2.0 * a, params)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return p

  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=0.5,
                     mask={'enc': False, 'head': True})
  tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  chex.assert_trees_all_equal(seen[0]['enc'], params['enc'])
  chex.assert_trees_all_close(seen[0]['head'], 1.0 + 0.5 / np.sqrt(3.0) *
                              np.ones(3), rtol=1e-6)
  # A mask that selects nothing would make every SAM step a plain step that
  # still pays for grad_fn: refused (tests/test_exact_or_refused.py).
  none = rst_optax.rst(optax.identity(), schedule=1.0, rho=0.5,
                       mask={'enc': False, 'head': False})
  with pytest.raises(ValueError, match='selects no parameter'):
    none.init(params)


def test_mask_keeps_a_bad_gradient_visible():
  """A NaN in an unperturbed leaf of g still hands g to the base optimizer."""
  params, g = three_leaves()
  g = {**g, 'scale': jnp.array(jnp.nan)}
  tx = rst_optax.rst(optax.identity(), schedule=1.0, mask={
      'w': True, 'b': True, 'scale': False})
  d, _ = tx.update(g, tx.init(params), params, grad_fn=lambda p: p)
  chex.assert_trees_all_equal(d, g)


@pytest.mark.parametrize('mask', [
    {'w': True},
    {'w': 1, 'b': 1, 'scale': 0},
    {'w': jnp.array(True), 'b': True, 'scale': True},
    lambda p: 'all',
], ids=['missing-key', 'ints', 'array', 'callable-str'])
def test_bad_masks_are_refused_at_init(mask):
  params, _ = three_leaves()
  tx = rst_optax.rst(optax.sgd(0.1), mask=mask)
  with pytest.raises((TypeError, ValueError), match='rst: `mask` must be'):
    tx.init(params)


# --- the step count at its int32 limit, and the traced branches -------------

INT32_MAX = 2**31 - 1


@pytest.mark.parametrize('schedule', [optax.constant_schedule(1.0), 0.5])
def test_count_saturates_at_int32_max_and_the_coin_still_draws(schedule):
  params = jnp.ones(3)
  tx = rst_optax.rst(optax.identity(), schedule=schedule, rho=0.1, seed=4)
  start = INT32_MAX - 2
  state = tx.init(params)._replace(count=jnp.asarray(start, jnp.int32),
                                   sam_steps=jnp.asarray(start, jnp.int32))
  key = jax.random.key(4)
  step = jax.jit(lambda s: tx.update(params, s, params,
                                     grad_fn=lambda p: p + 100.0))
  sam_steps = start
  for t in (start, start + 1, INT32_MAX, INT32_MAX, INT32_MAX):
    d, new_state = step(state)
    took = bool(rst_optax.coin(key, t, schedule))
    assert bool(jnp.all(d > 50.0)) == took  # the branch is coin(key, t)'s
    sam_steps = min(sam_steps + took, INT32_MAX)
    assert int(new_state.count) == min(t + 1, INT32_MAX)
    assert int(new_state.sam_steps) == sam_steps
    state = new_state
  assert int(state.count) == INT32_MAX


@pytest.mark.parametrize('schedule, traced_cond', [
    (0, False), (1, False), (0.0, False), (1.0, False), (0.5, True),
    (optax.constant_schedule(1.0), True), (jnp.asarray(1.0), True)])
def test_python_zero_or_one_schedule_traces_no_cond(problem, schedule,
                                                    traced_cond):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.sgd(0.1), schedule=schedule)
  jaxpr = jax.make_jaxpr(lambda p, s: tx.update(grad_fn(p), s, p,
                                                grad_fn=grad_fn))(
      params, tx.init(params))
  assert gradient_conds(jaxpr) == traced_cond


def test_nan_probability_takes_no_sam_step(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.identity(), schedule=lambda t: jnp.where(
      t % 2 == 0, jnp.nan, 1.0), rho=0.1)
  _, state, history = run(tx, params, loss_fn, 6)
  assert int(state.sam_steps) == 3  # the odd steps only
  # The plain gradient (jitted there, eager here: equal to rounding).
  chex.assert_trees_all_close(history[0], grad_fn(params), rtol=1e-6)
