"""The arithmetic of `rst(..., reuse=...)`: rounding is never reused, the
reused term never overflows early, gradients through `update` stay finite,
and each path of `_reuse` and `_norms` is pinned.

On CPU `jax.lax.platform_dependent` takes the direct sums where they are
exact; the scaled computations that GPU and TPU always run are reached here
by calling `_reuse._orthogonal_unit(..., fast=False)` and
`_norms.scaled_perturbation` directly, and through inputs that over- or
underflow the direct sums.
"""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rst_optax
from rst_optax import _norms, _reuse, schedules

F32 = np.finfo(np.float32)


def tanh_problem(seed, dtype=jnp.float32):
  """A small tanh regression: params and loss_fn."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k1, (16, 4), dtype)
  y = jax.random.normal(k2, (16,), dtype)
  params = {'w1': jax.random.normal(k3, (4, 8), dtype) * 0.5,
            'w2': jax.random.normal(k4, (8,), dtype) * 0.5}
  loss = lambda p: jnp.mean((jnp.tanh(x @ p['w1']) @ p['w2'] - y) ** 2)
  return params, loss


def run(tx, params, loss, steps):
  """``steps`` jitted steps of ``tx``: the final params and state."""
  grad = jax.grad(loss)

  @jax.jit
  def step(p, s):
    u, s = tx.update(grad(p), s, p, grad_fn=grad)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for _ in range(steps):
    p, s = step(p, s)
  return p, s


def assert_zero(tree):
  for leaf in jax.tree.leaves(tree):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def flat(tree, dtype=np.float64):
  return np.concatenate([np.ravel(np.asarray(x, dtype))
                         for x in jax.tree.leaves(tree)])


# Item 1: rounding noise is never reused.


@pytest.mark.parametrize('seed', range(4))
def test_rho_zero_with_reuse_is_plain_sgd(seed):
  """The issue's case: periodic(2), rho=0, reuse=0.5, sgd(0.05)."""
  params, loss = tanh_problem(seed)
  tx = rst_optax.rst(optax.sgd(0.05), schedules.periodic(2), 0.0, reuse=0.5)
  got, state = run(tx, params, loss, 3)
  sgd, grad = optax.sgd(0.05), jax.grad(loss)

  @jax.jit
  def step(p, s):
    u, s = sgd.update(grad(p), s, p)
    return optax.apply_updates(p, u), s

  want, s = params, sgd.init(params)
  for _ in range(3):
    want, s = step(want, s)
  assert int(state.sam_steps) == 1
  assert_zero(state.reuse_direction)
  chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize('rho_t', [0.0, -0.1])
def test_a_rho_schedule_at_or_below_zero_on_a_sam_step_reuses_nothing(rho_t):
  """A rho warm-up from 0: the SAM steps at rho(t) <= 0 keep u = 0, and the
  run equals the same rst without reuse, bit for bit."""
  params, loss = tanh_problem(1)
  rho = lambda t: jnp.where(t < 4, rho_t, 0.05)
  runs = [run(rst_optax.rst(optax.sgd(0.05), schedules.periodic(2), rho,
                            reuse=reuse), params, loss, 4)
          for reuse in (0.5, None)]
  assert_zero(runs[0][1].reuse_direction)
  chex.assert_trees_all_equal(runs[0][0], runs[1][0])
  # Once rho(t) > 0 the direction is kept.
  later, state = run(rst_optax.rst(optax.sgd(0.05), schedules.periodic(2),
                                   rho, reuse=0.5), params, loss, 6)
  assert float(optax.tree.norm(state.reuse_direction)) == pytest.approx(1.0)


@pytest.mark.parametrize('fast', [True, False])
def test_rho_zero_keeps_nothing_however_grad_fn_rounds(fast):
  """At rho(t) = 0 grad_fn runs at w itself: its difference from g is
  rounding of any size (here a bfloat16 forward pass), and u stays 0."""
  params, loss = tanh_problem(0)
  low = lambda p: loss(jax.tree.map(
      lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), p))
  grad_fn = lambda p: jax.grad(low)(p)
  g = jax.grad(loss)(params)
  tx = rst_optax.rst(optax.identity(), 0.5, 0.0, reuse=0.5)
  d, state = jax.jit(lambda s: tx.update(g, s, params, grad_fn=grad_fn,
                                         take_sam=True))(tx.init(params))
  assert float(optax.tree.norm(optax.tree.sub(d, g))) > 1e-3 * float(
      optax.tree.norm(g))
  assert_zero(state.reuse_direction)
  # The scaled path that GPU and TPU take, called directly.
  leaves = _reuse._orthogonal_unit(jax.tree.leaves(d), jax.tree.leaves(g),
                                   [jnp.float32] * 2, False, fast)
  assert_zero(leaves)
  assert float(optax.tree.norm(_reuse._orthogonal_unit(
      jax.tree.leaves(d), jax.tree.leaves(g), [jnp.float32] * 2, True,
      fast))) == pytest.approx(1.0)


def test_eps_far_above_the_gradient_norm_reuses_nothing():
  """eps = 1e8: the perturbation rounds away (w + e is w to the last bits),
  so g_v is rounding and nothing is reused."""
  params, loss = tanh_problem(0)
  runs = [run(rst_optax.rst(optax.sgd(0.05), schedules.periodic(2), 0.05,
                            eps=1e8, reuse=reuse), params, loss, 5)
          for reuse in (0.5, None)]
  assert_zero(runs[0][1].reuse_direction)
  chex.assert_trees_all_equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize('x64', [False, True])
def test_a_single_perturbed_scalar_reuses_nothing(x64):
  """One parameter: d is always parallel to g, so u = 0 and each base step
  is g itself (not g (1 +- alpha) with a sign set by rounding)."""
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    loss = lambda w: jnp.sin(3 * w) + 0.3 * w ** 4
    tx = rst_optax.rst(optax.identity(), 0.5, 0.05, reuse=0.5)
    grad = jax.grad(loss)
    for w in np.linspace(-1.3, 1.7, 9):
      w = jnp.asarray(w, dtype)
      _, state = tx.update(grad(w), tx.init(w), w, grad_fn=grad,
                           take_sam=True)
      assert float(state.reuse_direction) == 0.0
      d, _ = tx.update(grad(w), state, w, grad_fn=grad, take_sam=False)
      assert d.dtype == dtype and d == grad(w)


def test_a_mask_selecting_one_scalar_leaf_reuses_nothing():
  params, loss = tanh_problem(0)
  params = params | {'t': jnp.asarray(0.7)}
  full = lambda p: loss(p) * p['t'] + jnp.sin(p['t'])
  mask = {'w1': False, 'w2': False, 't': True}
  tx = rst_optax.rst(optax.identity(), 0.5, 0.05, reuse=0.5, mask=mask)
  grad = jax.grad(full)
  _, state = tx.update(grad(params), tx.init(params), params, grad_fn=grad,
                       take_sam=True)
  assert float(state.reuse_direction['t']) == 0.0
  d, _ = tx.update(grad(params), state, params, grad_fn=grad, take_sam=False)
  chex.assert_trees_all_equal(d, grad(params))


def orthogonal(d, g, fast, dtype=np.float32):
  return _reuse._orthogonal_unit([jnp.asarray(d, dtype)],
                                 [jnp.asarray(g, dtype)], [dtype], True,
                                 fast)[0]


@pytest.mark.parametrize('fast', [True, False])
@pytest.mark.parametrize('x64', [False, True])
def test_the_threshold_is_eight_epsilons_of_d(fast, x64):
  """g_v = k eps ||d|| (exactly orthogonal to g): dropped at k = 4 and for
  a d that is lambda g to rounding, kept at k = 16, in float32 and float64,
  on both paths, at any size."""
  with jax.enable_x64(x64):
    dtype = np.float64 if x64 else np.float32
    eps = np.finfo(dtype).eps
    rng = np.random.default_rng(0)
    for n in (2, 1000, 100_000):
      g = rng.standard_normal(n)
      r = rng.standard_normal(n)
      r -= r @ g / (g @ g) * g
      r /= np.linalg.norm(r)
      for lam in (1.0, 3.3, -0.7):
        d = (lam * g).astype(dtype)
        assert_zero(orthogonal(d, g, fast, dtype))
        for k, kept in ((4, False), (16, True)):
          d = (lam * g + k * eps * abs(lam) * np.linalg.norm(g) * r)
          u = np.asarray(orthogonal(d, g, fast, dtype), np.float64)
          if kept:
            np.testing.assert_allclose(u @ r, 1.0, rtol=0.2)
          else:
            assert not u.any()


# Item 3: gradients through update.


def unroll(tx, loss, take):
  """The loss after a few steps of ``tx`` from ``params``."""
  grad = jax.grad(loss)

  def f(params):
    state = tx.init(params)
    for t in take:
      u, state = tx.update(grad(params), state, params, grad_fn=grad,
                           take_sam=t)
      params = optax.apply_updates(params, u)
    return loss(params)

  return f


def finite_difference(f, params, h=1e-6):
  x0 = flat(params)
  _, unflat = jax.flatten_util.ravel_pytree(params)
  out = np.zeros_like(x0)
  for i in range(x0.size):
    e = np.zeros_like(x0)
    e[i] = h
    out[i] = (f(unflat(x0 + e)) - f(unflat(x0 - e))) / (2 * h)
  return out


@pytest.mark.parametrize('case', ['no reuse', 'reuse', 'u zero', 'rho zero'])
def test_gradients_through_update_match_finite_differences(case):
  """A SAM step then a base step, differentiated in float64: finite and
  equal to central differences, with and without reuse, and where the SAM
  step keeps u = 0 (a centered quadratic, and rho = 0)."""
  with jax.enable_x64(True):
    params, loss = tanh_problem(0, jnp.float64)
    params = {'w1': params['w1'][:2, :3], 'w2': params['w2'][:3]}
    x = jnp.linspace(-1, 1, 12, dtype=jnp.float64).reshape(6, 2)
    y = jnp.cos(3 * x[:, 0])
    loss = lambda p: jnp.mean((jnp.tanh(x @ p['w1']) @ p['w2'] - y) ** 2)
    rho = 0.0 if case == 'rho zero' else 0.1
    if case == 'u zero':
      loss = lambda p: 0.5 * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(p))
    reuse = None if case == 'no reuse' else 0.5
    tx = rst_optax.rst(optax.sgd(0.3), 0.5, rho, reuse=reuse)
    f = unroll(tx, loss, [True, False])
    got = flat(jax.grad(f)(params))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, finite_difference(jax.jit(f), params),
                               rtol=1e-6, atol=1e-9)


def test_gradients_through_a_vmapped_update_are_finite():
  """Under jax.vmap with a batched coin the conds become selects and every
  branch runs: the branches not taken (the direct sums of a zero vector
  among them) must not poison the gradient."""
  params, loss = tanh_problem(0)
  zero_g = lambda p: 0.0 * loss(p)
  tx = rst_optax.rst(optax.sgd(0.3), 0.5, 0.1, reuse=0.5)

  def f(params, take):
    grad = jax.grad(lambda p: loss(p) + zero_g(p))
    state = tx.init(params)
    for t in take:
      u, state = tx.update(grad(params), state, params, grad_fn=grad,
                           take_sam=t)
      params = optax.apply_updates(params, u)
    return loss(params)

  takes = jnp.asarray([[True, False], [False, False], [True, True]])
  grads = jax.vmap(jax.grad(f), in_axes=(None, 0))(params, takes)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  # And a zero gradient (u, the perturbation and ||g|| all of zero norm).
  zero = lambda p: jnp.sum(p['w1']) * 0.0 + loss(p) * 0.0
  grads = jax.vmap(jax.grad(
      lambda p, t: unroll(tx, zero, t)(p) + loss(p)), in_axes=(None, 0))(
          params, takes)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))


# Item 4: the reused term never overflows early; reuse is a float32 value.


def with_reuse(g, u, alpha):
  return np.asarray(_reuse.with_reuse(
      [jnp.asarray(g, jnp.float32)], [jnp.asarray(u, jnp.float32)],
      jnp.asarray(alpha, jnp.float32))[0])


def test_a_zero_entry_of_u_gives_g_however_large_alpha_times_norm():
  g = np.array([3e30, -3e30, 3e30, -3e30, 3e30, -3e30, 3e30, 5.0],
               np.float32)
  u = np.array([0.6, 0, 0, 0, 0, 0, -0.8, 0], np.float32)
  # alpha ||g|| far beyond float32; at 3e38, so is alpha times the scaled
  # norm (||g|| / 2**102 = 1.6).
  for alpha in (1e9, 3e38):
    out = with_reuse(g, u, alpha)
    np.testing.assert_array_equal(out[1:6], g[1:6])
    np.testing.assert_array_equal(out[7], g[7])
    np.testing.assert_array_equal(out[[0, 6]], [np.inf, -np.inf])


def test_the_result_overflows_only_where_the_sum_does():
  """alpha ||g|| u_0 alone is beyond float32, g_0 brings it back."""
  g = np.array([3e38, 2e38], np.float32)
  u = np.array([-0.9, 0.43588989], np.float32)
  alpha = 1.1
  want = g.astype(np.float64) + alpha * np.linalg.norm(
      g.astype(np.float64)) * u.astype(np.float64)
  assert abs(alpha * np.linalg.norm(g.astype(np.float64)) * u[0]) > F32.max
  out = with_reuse(g, u, alpha)
  np.testing.assert_allclose(out[0], want[0], rtol=1e-6)
  assert out[1] == np.inf and want[1] > F32.max


def test_an_infinite_alpha_is_taken_as_no_reuse():
  g = np.array([1.0, -2.0], np.float32)
  np.testing.assert_array_equal(with_reuse(g, [0.6, 0.8], np.inf), g)


@pytest.mark.parametrize('reuse', [1e39, -1e39])
def test_reuse_beyond_float32_is_refused(reuse):
  with pytest.raises(ValueError, match=r'rst: `reuse` must be a number in '
                     r'\[0, 3.40282e\+38\]'):
    rst_optax.rst(optax.sgd(0.1), 0.5, 0.05, reuse=reuse)
  rst_optax.rst(optax.sgd(0.1), 0.5, 0.05, reuse=float(F32.max))


def test_rho_beyond_float32_is_refused():
  # A SAM step at rho = 1e39 would perturb to -inf.
  with pytest.raises(ValueError, match=r'rst: `rho` must be a number in '
                     r'\[0, 3.40282e\+38\]'):
    rst_optax.rst(optax.sgd(0.1), 0.5, rho=1e39)
  rst_optax.rst(optax.sgd(0.1), 0.5, rho=float(F32.max))


# The unpinned behaviours of _norms and _reuse.


def reference(g, u, alpha):
  g64 = np.asarray(g, np.float64)
  return g64 + alpha * np.linalg.norm(g64) * np.asarray(u, np.float64)


@pytest.mark.parametrize('scale', [2e30, 4e-30, 2.0 ** 127 * 1.5, 6e37])
def test_the_reused_term_at_odd_exponents_and_past_2_to_127(scale):
  """max|g| at odd binary exponents, and at >= 1.7e38 (2**128 is inf)."""
  g = np.array([1.0, -0.25, 0.6, 0.0], np.float32) * np.float32(scale)
  assert np.isfinite(g).all()
  u = np.array([0.0, 0.6, 0.0, -0.8], np.float32)
  want = reference(g, u, 0.7)
  np.testing.assert_allclose(with_reuse(g, u, 0.7), want, rtol=1e-6)
  _, k = _norms.global_norm([jnp.asarray(g)], jnp.float32)
  assert abs(int(k)) % 2 == 1 or scale > 1e37


@pytest.mark.parametrize('scale', [2e30, 4e-30])
def test_the_perturbation_at_odd_exponents(scale):
  g = [jnp.asarray(np.array([1.0, -0.25, 0.6], np.float32) * np.float32(
      scale))]
  w = [jnp.zeros(3)]
  for fn in (_norms.perturbation, _norms.scaled_perturbation):
    e, finite = fn(g, w, 0.1, 1e-38, None)
    g64 = np.asarray(g[0], np.float64)
    np.testing.assert_allclose(e[0], 0.1 * g64 / np.linalg.norm(g64),
                               rtol=1e-6)
    assert bool(finite)


def test_the_norm_counts_squares_that_flush_to_zero():
  """1000 entries of 1e-20 (squares flushed) and one of 1.1e-19: their sum
  of squares is above finfo.tiny, but the direct sum would miss 90% of it."""
  g = np.full(1001, 1e-20, np.float32)
  g[0] = 1.1e-19
  norm = np.linalg.norm(g.astype(np.float64))
  n, k = _norms.global_norm([jnp.asarray(g)], jnp.float32)
  np.testing.assert_allclose(float(n) * 2.0 ** int(k), norm, rtol=1e-6)
  u = np.zeros(1001, np.float32)
  u[1] = 1
  np.testing.assert_allclose(with_reuse(g, u, 1.0)[1], g[1] + norm,
                             rtol=1e-6)
  for fn in (_norms.perturbation, _norms.scaled_perturbation):
    e, _ = fn([jnp.asarray(g)], [jnp.zeros(1001)], 1.0, 1e-38, None)
    np.testing.assert_allclose(e[0][0], g[0] / norm, rtol=1e-6)


@pytest.mark.parametrize('fast', [True, False])
@pytest.mark.parametrize('scale_d, scale_g', [
    (1e-25, 1e-25), (1e-22, 1.0), (1.0, 1e-30), (1e30, 1e-30), (1e-30, 1e30)])
def test_the_unit_vector_at_any_scale(fast, scale_d, scale_g):
  """Orthogonal parts whose squares flush (entries below 1e-19) or
  overflow are still normalized exactly, on both paths."""
  rng = np.random.default_rng(1)
  g = rng.standard_normal(50)
  d = g + 0.3 * rng.standard_normal(50)
  d32, g32 = (d * scale_d).astype(np.float32), (g * scale_g).astype(
      np.float32)
  d64, g64 = d32.astype(np.float64), g32.astype(np.float64)
  v = d64 - d64 @ g64 / (g64 @ g64) * g64
  np.testing.assert_allclose(orthogonal(d32, g32, fast), v / np.linalg.norm(v),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('fast', [True, False])
def test_a_zero_or_non_finite_input_keeps_nothing(fast):
  g = np.array([1.0, 2.0, -1.0], np.float32)
  d = np.array([0.5, 2.0, 1.0], np.float32)
  assert np.asarray(orthogonal(d, g, fast)).any()
  assert_zero(orthogonal(np.zeros(3), g, fast))
  # d with g = 0: all of d is orthogonal to it.
  np.testing.assert_allclose(orthogonal(d, np.zeros(3), fast),
                             d / np.linalg.norm(d), rtol=1e-6)
  for bad in (np.nan, np.inf):
    assert_zero(orthogonal(d, np.array([bad, 2, -1]), fast))
    assert_zero(orthogonal(np.array([bad, 2, -1]), g, fast))
  assert_zero(_reuse._orthogonal_unit([jnp.asarray(d)], [jnp.asarray(g)],
                                      [jnp.float32], False, fast)[0])


def test_the_fast_and_scaled_paths_agree():
  rng = np.random.default_rng(2)
  d = [jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
       jnp.asarray(rng.standard_normal(5), jnp.bfloat16)]
  g = [jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
       jnp.asarray(rng.standard_normal(5), jnp.bfloat16)]
  dtypes = [jnp.float32, jnp.bfloat16]
  fast = _reuse._orthogonal_unit(d, g, dtypes, True, True)
  scaled = _reuse._orthogonal_unit(d, g, dtypes, True, False)
  for a, b in zip(fast, scaled, strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=1e-2,
                               atol=1e-5)
  e_direct, _ = _norms.perturbation(g, d, 0.1, 1e-12, 0.01)
  e_scaled, _ = _norms.scaled_perturbation(g, d, 0.1, 1e-12, 0.01)
  chex.assert_trees_all_close(e_direct, e_scaled, rtol=1e-5, atol=1e-8)


def test_bfloat16_base_directions_are_rounded_once():
  """g + alpha ||g|| u in float32, rounded to bfloat16 once."""
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.standard_normal(4000), jnp.bfloat16)
  u = rng.standard_normal(4000)
  u = jnp.asarray(u / np.linalg.norm(u), jnp.bfloat16)
  got = _reuse.with_reuse([g], [u], jnp.asarray(0.7))[0]
  assert got.dtype == jnp.bfloat16
  g32, u32 = g.astype(jnp.float32), u.astype(jnp.float32)
  want = (g32 + 0.7 * jnp.sqrt(jnp.sum(g32 * g32)) * u32).astype(
      jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))


def test_safe_sqrt_has_a_zero_derivative_at_zero():
  assert float(jax.grad(_norms.safe_sqrt)(0.0)) == 0.0
  assert float(jax.grad(_norms.safe_sqrt)(4.0)) == 0.25
  assert np.isnan(_norms.safe_sqrt(jnp.nan))
  assert _norms.safe_sqrt(jnp.inf) == np.inf


@pytest.mark.parametrize('take', [(True, False), (False, False)],
                         ids=['sam then base', 'base'])
def test_gradients_with_a_batched_zero_gradient_are_finite(take):
  """A member of a jax.vmap whose gradient is zero takes the scaled norms
  (a SAM step's perturbation, a base step's ||g|| with reuse): their square
  roots of 0 must not poison the gradient (``_norms.safe_sqrt``). The direct
  sums' square roots need no such care for this: JAX's batched cond feeds
  the branch not taken stop_gradient'ed inputs."""
  params, loss = tanh_problem(0)
  tx = rst_optax.rst(optax.sgd(0.3), 0.5, 0.1, reuse=0.5)

  def f(params, scale):
    grad = jax.grad(lambda p: scale * loss(p))
    state = tx.init(params)
    for t in take:
      u, state = tx.update(grad(params), state, params, grad_fn=grad,
                           take_sam=t)
      params = optax.apply_updates(params, u)
    return loss(params)

  grads = jax.vmap(jax.grad(f), in_axes=(None, 0))(
      params, jnp.asarray([0.0, 1.0]))
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
