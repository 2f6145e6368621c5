"""Behaviour of `rst_optax.rst`: branches, mixing, coin, dtypes, composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
  chex_equal(got, want)
  chex_equal(state.base_state, base_state)
  assert int(state.count) == 50 and int(state.sam_steps) == 0


def chex_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
  for _ in range(10):
    updates, state = tx.update(grad_fn(got_params), state, got_params,
                               grad_fn=grad_fn)
    got_params = optax.apply_updates(got_params, updates)
    g_sam = sam_direction_by_hand(want_params, grad_fn, rho)
    want_params = jax.tree.map(lambda w, g: w - 0.05 * g, want_params, g_sam)
  for x, y in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
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
  for x, y in zip(jax.tree.leaves(ours_p), jax.tree.leaves(theirs_p),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


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
  for x, y in zip(jax.tree.leaves(direction), jax.tree.leaves(want),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


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
  chex_equal(p, full_params)
  chex_equal(state, full_state)
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
  chex_equal(d_base, g)
  chex_equal(d_sam, sam_direction_by_hand(params, grad_fn, 0.1))
  assert int(s_sam.sam_steps) == 1 and int(s_base.sam_steps) == 0
  jaxpr = jax.make_jaxpr(
      lambda p, s: tx.update(g, s, p, grad_fn=grad_fn, take_sam=True))(
          params, state)
  assert 'cond' not in str(jaxpr)
  jaxpr = jax.make_jaxpr(
      lambda p, s: tx.update(g, s, p, grad_fn=grad_fn))(params, state)
  assert 'cond' in str(jaxpr)


def test_take_sam_array_overrides_the_coin(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  tx = rst_optax.rst(optax.identity(), schedule=0.5, rho=0.1)
  state = tx.init(params)
  g = grad_fn(params)
  step = jax.jit(lambda s, take: tx.update(g, s, params, grad_fn=grad_fn,
                                           take_sam=take))
  d, s = step(state, jnp.array(True))
  for x, y in zip(jax.tree.leaves(d),
                  jax.tree.leaves(sam_direction_by_hand(params, grad_fn, 0.1)),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  assert int(s.sam_steps) == 1
  d, s = step(state, jnp.array(False))
  chex_equal(d, g)
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
    for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# --- ASAM, dtypes, zero gradient ----------------------------------------------

def test_adaptive_perturbation_is_asam(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  rho, eps = 0.5, 1e-12
  seen = []

  def recording_grad_fn(p):
    seen.append(p)
    return grad_fn(p)

  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, adaptive=True)
  g = grad_fn(params)
  d, _ = tx.update(g, tx.init(params), params, grad_fn=recording_grad_fn)
  scaled = jax.tree.map(lambda gi, w: jnp.abs(w) * gi, g, params)
  norm = optax.tree.norm(scaled)
  want_perturbed = jax.tree.map(
      lambda w, gi: w + rho * w ** 2 * gi / (norm + eps), params, g)
  for x, y in zip(jax.tree.leaves(seen[0]), jax.tree.leaves(want_perturbed),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  chex_equal(d, grad_fn(seen[0]))
  # The adaptive perturbation differs from the plain one.
  plain = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho)
  d_plain, _ = plain.update(g, plain.init(params), params, grad_fn=grad_fn)
  assert not np.allclose(d_plain['w'], d['w'])


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
  chex_equal(seen[0], params)  # no perturbation along a zero gradient
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
  chex_equal(u, optax.tree.scale(3.0, g))
  # A plain GradientTransformation base accepts (and ignores) extra args.
  tx = rst_optax.rst(optax.sgd(0.1), schedule=0.0)
  u, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn, loss=1.0)
  chex_equal(u, optax.tree.scale(-0.1, g))


def test_inside_optax_chain(problem):
  params, loss_fn = problem
  grad_fn = jax.grad(loss_fn)
  chained = optax.chain(
      rst_optax.rst(optax.identity(), schedule=1.0, rho=0.1),
      optax.scale(-0.5))
  state = chained.init(params)
  u, state = chained.update(grad_fn(params), state, params, grad_fn=grad_fn)
  want = optax.tree.scale(-0.5, sam_direction_by_hand(params, grad_fn, 0.1))
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6)
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
  for x, y in zip(jax.tree.leaves(d),
                  jax.tree.leaves(sam_direction_by_hand(params, grad_fn, 0.1)),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  state.hyperparams['rho'] = jnp.asarray(0.3)
  state.hyperparams['lam'] = jnp.asarray(0.5)
  d, new_state = step(state)
  g_sam = sam_direction_by_hand(params, grad_fn, 0.3)
  want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, g, g_sam)
  for x, y in zip(jax.tree.leaves(d), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5)
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
  chex_equal(rebuilt, state)


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
