"""Flatness measures against quadratics whose Hessian is known."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rst_optax import sharpness

EIGS = np.array([5.0, 2.0, 1.0, 0.5, 0.25, 0.1])


def quadratic(eigs=EIGS, seed=0):
  """L(w) = 0.5 (w - w*)^T A (w - w*) with A = Q diag(eigs) Q^T, w a dict."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(len(eigs), len(eigs))))
  a = (q * eigs) @ q.T
  w_star = rng.normal(size=len(eigs))

  def loss(params):
    w = jnp.concatenate([params['x'], params['y'].ravel()])
    d = w - jnp.asarray(w_star, jnp.float32)
    return 0.5 * d @ jnp.asarray(a, jnp.float32) @ d

  def as_params(w):
    w = jnp.asarray(w, jnp.float32)
    return {'x': w[:2], 'y': w[2:].reshape(2, -1)}

  return loss, a, q, w_star, as_params


def flat(params):
  return np.concatenate([np.ravel(params['x']), np.ravel(params['y'])])


def trust_region_max(a, g, rho):
  """max over ||e|| <= rho of g.e + 0.5 e^T A e (A positive definite), exactly.

  The maximizer is e = (mu I - A)^{-1} g on the sphere, mu > lambda_max;
  bisection on mu.
  """
  lam, q = np.linalg.eigh(a)
  gq = q.T @ g
  norm = lambda mu: np.linalg.norm(gq / (mu - lam))
  lo, hi = lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / rho + 1.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
  e = q @ (gq / (hi - lam))
  return g @ e + 0.5 * e @ a @ e


def test_hvp_is_the_hessian_times_the_vector():
  loss, a, _, _, as_params = quadratic()
  rng = np.random.default_rng(1)
  w, v = rng.normal(size=6), rng.normal(size=6)
  got = sharpness.hvp(loss, as_params(w), as_params(v))
  np.testing.assert_allclose(flat(got), a @ v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('at_minimum', [True, False])
def test_top_eigenvalue_and_eigenvector_of_a_quadratic(at_minimum):
  loss, _, q, w_star, as_params = quadratic()
  w = w_star if at_minimum else w_star + 3.0
  lam, vec = sharpness.top_hessian_eigenvalue(loss, as_params(w),
                                              num_iters=500)
  assert float(lam) == pytest.approx(EIGS[0], rel=1e-4)
  assert jax.tree.structure(vec) == jax.tree.structure(as_params(w))
  cosine = abs(flat(vec) @ q[:, 0]) / np.linalg.norm(flat(vec))
  assert cosine == pytest.approx(1.0, abs=1e-4)


def test_top_eigenvalue_respects_num_iters():
  # One iteration from a random start cannot have converged on this spectrum.
  loss, _, _, w_star, as_params = quadratic(np.array([5.0, 4.9, 4.8, 1, 1, 1]))
  lam, _ = sharpness.top_hessian_eigenvalue(loss, as_params(w_star),
                                            num_iters=1)
  assert float(lam) < 4.99


@pytest.mark.parametrize('rho', [0.05, 0.3])
def test_epsilon_sharpness_at_the_minimum(rho):
  loss, _, _, w_star, as_params = quadratic()
  s = sharpness.epsilon_sharpness(loss, as_params(w_star), rho, num_steps=100)
  assert float(s) == pytest.approx(0.5 * EIGS[0] * rho ** 2, rel=1e-3)


@pytest.mark.parametrize('rho', [0.05, 0.5])
def test_epsilon_sharpness_away_from_the_minimum(rho):
  loss, a, _, w_star, as_params = quadratic()
  w = w_star + np.random.default_rng(2).normal(size=6) * 0.3
  g = a @ (w - w_star)
  s = sharpness.epsilon_sharpness(loss, as_params(w), rho, num_steps=100)
  assert float(s) == pytest.approx(trust_region_max(a, g, rho), rel=1e-3)


def test_isotropic_quadratic_has_the_closed_form():
  c, rho = 2.0, 0.2
  loss = lambda w: 0.5 * c * jnp.sum((w - 1.0) ** 2)
  w = jnp.array([0.0, 0.5, 2.0])
  g = c * (np.asarray(w) - 1.0)
  s = sharpness.epsilon_sharpness(loss, w, rho, num_steps=5)
  expected = rho * np.linalg.norm(g) + 0.5 * c * rho ** 2
  assert float(s) == pytest.approx(expected, rel=1e-5)


def test_ascent_stays_within_the_ball():
  # A linear loss rises without bound; within the ball its rise is rho |a|.
  a = jnp.array([3.0, -4.0])
  loss = lambda w: a @ w
  for steps in (0, 20):
    s = sharpness.epsilon_sharpness(loss, jnp.zeros(2), 0.1, num_steps=steps)
    assert float(s) == pytest.approx(0.5, rel=1e-5)


def test_sharpness_is_zero_at_a_maximum():
  # Every point of the ball but its centre is lower: the rise is 0, not < 0.
  loss = lambda w: -jnp.sum(w ** 2)
  for steps in (0, 10):
    s = sharpness.epsilon_sharpness(loss, jnp.zeros(3), 0.5, num_steps=steps)
    assert float(s) == 0.0


def test_tools_run_under_jit():
  loss, _, _, w_star, as_params = quadratic()
  p = as_params(w_star)
  s = jax.jit(lambda p: sharpness.epsilon_sharpness(loss, p, 0.1,
                                                    num_steps=100))(p)
  lam = jax.jit(lambda p: sharpness.top_hessian_eigenvalue(
      loss, p, num_iters=500)[0])(p)
  assert float(s) == pytest.approx(0.5 * EIGS[0] * 0.01, rel=1e-3)
  assert float(lam) == pytest.approx(EIGS[0], rel=1e-4)


def test_has_aux_drops_the_aux():
  loss, _, _, w_star, as_params = quadratic()
  with_aux = lambda p: (loss(p), {'state': jnp.ones(2)})
  p, v = as_params(w_star + 0.3), as_params(np.arange(6.0))
  for fn, args in [
      (sharpness.hvp, (p, v)),
      (sharpness.top_hessian_eigenvalue, (p,)),
      (sharpness.epsilon_sharpness, (p, 0.1)),
  ]:
    chex.assert_trees_all_close(fn(with_aux, *args, has_aux=True),
                                fn(loss, *args), rtol=1e-6)


@pytest.mark.parametrize('loss', [lambda w: 3.0 * jnp.sum(w['a']) - w['b'],
                                  lambda w: 2.0],
                         ids=['linear', 'constant'])
def test_a_zero_hessian_has_eigenvalue_zero(loss):
  params = {'a': jnp.ones(3), 'b': jnp.zeros([])}
  key = jax.random.key(4)
  start = optax.tree.random_like(key, params, jax.random.normal)
  start = np.concatenate([np.ravel(start['a']), np.ravel(start['b'])])
  for run in (sharpness.top_hessian_eigenvalue,
              jax.jit(sharpness.top_hessian_eigenvalue, static_argnums=0)):
    lam, v = run(loss, params, key=key)
    assert float(lam) == 0.0
    # The start vector, normalized: an eigenvector of the zero Hessian.
    v = np.concatenate([np.ravel(v['a']), np.ravel(v['b'])])
    np.testing.assert_allclose(v, start / np.linalg.norm(start), rtol=1e-6)


def test_a_zero_hessian_of_a_float64_model_under_x64():
  """The zero-Hessian branch returns the eigenvalue in the model's dtype, as
  power iteration does: float64 under x64."""
  with jax.enable_x64(True):
    params = {'a': jnp.ones(3, jnp.float64), 'b': jnp.zeros([], jnp.float64)}
    lam, v = sharpness.top_hessian_eigenvalue(
        lambda w: 3.0 * jnp.sum(w['a']) - w['b'], params,
        key=jax.random.key(4))
    assert lam.dtype == jnp.float64 and float(lam) == 0.0
    chex.assert_trees_all_equal_dtypes(v, params)
    lam, _ = sharpness.top_hessian_eigenvalue(
        lambda w: jnp.sum(w['a'] ** 2), params, key=jax.random.key(4))
    assert lam.dtype == jnp.float64
    np.testing.assert_allclose(float(lam), 2.0, rtol=1e-6)


def test_the_key_chooses_the_start_vector():
  loss, _, _, w_star, as_params = quadratic()
  p = as_params(w_star)
  one_step = lambda key: flat(sharpness.top_hessian_eigenvalue(
      loss, p, num_iters=1, error_tolerance=0.0, key=key)[1])
  np.testing.assert_array_equal(one_step(jax.random.key(1)),
                                one_step(jax.random.key(1)))
  np.testing.assert_array_equal(one_step(None), one_step(jax.random.key(0)))
  assert not np.allclose(one_step(jax.random.key(1)),
                         one_step(jax.random.key(2)), atol=1e-3)
  # Raw key data of the default implementation is a key too.
  np.testing.assert_array_equal(one_step(jax.random.PRNGKey(1)),
                                one_step(jax.random.key(1)))


def test_epsilon_sharpness_keeps_the_largest_rise_over_the_iterates():
  """On a loss that is not concave in the ball, the ascent passes its best
  point first and then falls: the estimate keeps the best."""
  loss = lambda w: jnp.sum(jnp.sin(3.0 * w)) + 0.1 * jnp.sum(w ** 2)
  w, rho = jnp.array([0.3, -0.2, 0.1]), 1.0
  unit = lambda x: x / jnp.linalg.norm(x)
  rises, eps = [], rho * unit(jax.grad(loss)(w))
  for _ in range(8):  # the iterates, as the docstring writes them
    rises.append(float(loss(w + eps) - loss(w)))
    eps = rho * unit(eps + rho * unit(jax.grad(loss)(w + eps)))
  assert max(rises) == rises[0] > rises[-1] + 0.1  # best first, then lower
  got = [float(sharpness.epsilon_sharpness(loss, w, rho, num_steps=k))
         for k in range(8)]
  assert got == pytest.approx([rises[0]] * 8, rel=1e-5)


CALLS = {
    'hvp': lambda loss, aux: sharpness.hvp(loss, jnp.ones(2), jnp.ones(2),
                                           has_aux=aux),
    'top_hessian_eigenvalue': lambda loss, aux: (
        sharpness.top_hessian_eigenvalue(loss, jnp.ones(2), has_aux=aux)),
    'epsilon_sharpness': lambda loss, aux: sharpness.epsilon_sharpness(
        loss, jnp.ones(2), 0.1, has_aux=aux),
}


@pytest.mark.parametrize('call, error, words', [
    (lambda: sharpness.epsilon_sharpness(lambda w: w @ w, jnp.ones(2), -0.1),
     ValueError, ['epsilon_sharpness', '`rho`']),
    (lambda: sharpness.epsilon_sharpness(lambda w: w @ w, jnp.ones(2),
                                         float('nan')),
     ValueError, ['epsilon_sharpness', '`rho`']),
    (lambda: sharpness.epsilon_sharpness(lambda w: w @ w, jnp.ones(2), 0.1,
                                         num_steps=-1),
     ValueError, ['epsilon_sharpness', '`num_steps`']),
    (lambda: sharpness.epsilon_sharpness('loss', jnp.ones(2), 0.1),
     TypeError, ['epsilon_sharpness', '`loss_fn`']),
    (lambda: sharpness.top_hessian_eigenvalue(lambda w: w @ w, jnp.ones(2),
                                              num_iters=0),
     ValueError, ['top_hessian_eigenvalue', '`num_iters`']),
    (lambda: sharpness.top_hessian_eigenvalue(lambda w: w @ w, jnp.ones(2),
                                              error_tolerance=-1.0),
     ValueError, ['top_hessian_eigenvalue', '`error_tolerance`']),
    (lambda: sharpness.top_hessian_eigenvalue(lambda w: w @ w,
                                              jnp.ones(2, jnp.int32)),
     TypeError, ['top_hessian_eigenvalue', '`params`']),
    (lambda: sharpness.top_hessian_eigenvalue(lambda w: 0.0, {}),
     ValueError, ['top_hessian_eigenvalue', '`params`']),
    # What loss_fn returns: checked when tracing.
    *[(lambda fn=fn, out=out, aux=aux: CALLS[fn](lambda w: out(w), aux),
       TypeError, [fn, *words])
      for fn in ('hvp', 'top_hessian_eigenvalue', 'epsilon_sharpness')
      for out, aux, words in [
          (lambda w: w ** 2, False, ['`loss_fn`', 'scalar', 'shape (2,)']),
          (lambda w: (w @ w, {'n': 1}), False, ['`has_aux`',
                                                'has_aux=True']),
          (lambda w: w @ w, True, ['`has_aux=True`', 'has_aux=False']),
          (lambda w: (w, 1.0), True, ['(loss, aux)', 'shape (2,)']),
          (lambda w: jnp.sum(w).astype(jnp.int32), False, ['`loss_fn`']),
      ]],
    (lambda: sharpness.hvp(lambda w: w @ w, jnp.ones(2, jnp.int32),
                           jnp.ones(2, jnp.int32)),
     TypeError, ['hvp', '`params`']),
    (lambda: sharpness.hvp(lambda w: w @ w, jnp.ones(2), jnp.ones(3)),
     ValueError, ['hvp', '`vector`', 'shapes', '(3,) for (2,)']),
    (lambda: sharpness.hvp(lambda w: w @ w, jnp.ones(2), {'v': jnp.ones(2)}),
     ValueError, ['hvp', '`vector`', 'tree structure']),
    (lambda: sharpness.hvp(lambda w: w @ w, jnp.ones(2),
                           jnp.ones(2, jnp.float16)),
     TypeError, ['hvp', '`vector`', 'float16 for float32']),
    (lambda: sharpness.top_hessian_eigenvalue(lambda w: w @ w, jnp.ones(2),
                                              key=0),
     TypeError, ['top_hessian_eigenvalue', '`key`']),
    (lambda: sharpness.epsilon_sharpness(lambda w: w @ w, jnp.ones(2), 0.1,
                                         key=np.uint32(3)),
     TypeError, ['epsilon_sharpness', '`key`']),
    (lambda: sharpness.epsilon_sharpness(lambda w: w @ w, jnp.ones(2), 0.1,
                                         has_aux=1),
     TypeError, ['epsilon_sharpness', '`has_aux`']),
])
def test_bad_arguments_are_named(call, error, words):
  with pytest.raises(error) as info:
    call()
  for word in words:
    assert word in str(info.value)
