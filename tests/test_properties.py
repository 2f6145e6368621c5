"""Property-based tests (Hypothesis) of RST's core identities over random
parameter trees (shapes, float32/bfloat16/float16), p, rho and lam.

Examples are derandomized so that CI runs the same cases every time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import rst_optax

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
PROPERTY = settings(max_examples=15, deadline=None, derandomize=True)


@st.composite
def problems(draw):
  """(params, g, c, dtype): a tree of 1-3 leaves of random shapes, the
  gradient ``g`` at ``params`` and the curvature ``c`` of the quadratic loss
  ``sum(c * w**2) / 2`` that ``grad_fn`` differentiates."""
  # Few distinct shapes, so JAX's per-shape compilations are reused.
  shapes = draw(st.lists(st.sampled_from([(), (3,), (2, 3)]), min_size=1,
                         max_size=3))
  dtype = draw(st.sampled_from(DTYPES))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  leaf = lambda s, scale=1.0: jnp.asarray(scale * rng.standard_normal(s), dtype)
  params = {f'p{i}': leaf(s) for i, s in enumerate(shapes)}
  g = {k: leaf(v.shape) for k, v in params.items()}
  c = {k: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), dtype)
       for k, v in params.items()}
  return params, g, c, dtype


def as64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def quadratic_grad_fn(c):
  return lambda p: jax.tree.map(lambda ci, w: ci * w, c, p)


@PROPERTY
@given(problem=problems(), rho=st.floats(1e-3, 10.0), lam=st.floats(-1.0, 3.0),
       adaptive=st.booleans(), eta=st.sampled_from([0.0, 0.01, 0.5]))
def test_sam_branch_is_the_g_rst_formula(problem, rho, lam, adaptive, eta):
  r"""d = (1 - lam) g + lam * grad_fn(w + e), e = rho g / ||g|| (ASAM:
  rho s^2 g / ||s g||, s = |w| + eta), against float64 to the dtype's
  rounding."""
  params, g, c, dtype = problem
  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=rho, lam=lam,
                     adaptive=adaptive, eta=eta)
  d, state = tx.update(g, tx.init(params), params,
                       grad_fn=quadratic_grad_fn(c))
  w64, g64, c64 = as64(params), as64(g), as64(c)
  scale = {k: np.abs(w64[k]) + eta if adaptive else 1.0 for k in w64}
  norm = np.sqrt(sum(np.sum((scale[k] * g64[k]) ** 2) for k in g64))
  eps = float(jnp.finfo(dtype).eps)
  for k in params:
    e = rho * scale[k] ** 2 * g64[k] / norm
    g_sam = c64[k] * (w64[k] + e)
    want = (1 - lam) * g64[k] + lam * g_sam
    # Rounding: the perturbed params and g_sam, each to the dtype, then the
    # mix g + lam (g_sam - g) in float32 and its rounding to the dtype.
    bound = (4 * eps * (np.abs(want) + abs(lam) * c64[k]
                        * (np.abs(w64[k]) + np.abs(e)))
             + 4 * float(jnp.finfo(jnp.float32).eps)
             * (1 + 2 * abs(lam)) * (np.abs(g64[k]) + np.abs(g_sam)))
    got = np.asarray(d[k], np.float64)
    assert d[k].dtype == dtype
    assert np.all(np.abs(got - want) <= bound + 1e-30), (k, got, want)
  assert int(state.sam_steps) == 1


@PROPERTY
@given(problem=problems(), factor=st.floats(1e-3, 1e3))
def test_perturbation_depends_only_on_the_gradient_direction(problem, factor):
  params, g, _, dtype = problem
  seen = []

  def grad_fn(p):
    seen.append(p)
    return p

  tx = rst_optax.rst(optax.identity(), schedule=1.0, rho=0.1)
  scaled = jax.tree.map(lambda a: (a.astype(jnp.float32) * factor).astype(dtype),
                        g)
  tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  tx.update(scaled, tx.init(params), params, grad_fn=grad_fn)
  # scaled differs from factor * g by one rounding of each entry.
  eps = float(jnp.finfo(dtype).eps)
  for k in params:
    a, b = (np.asarray(s[k], np.float64) for s in seen)
    tol = 4 * eps * (np.abs(np.asarray(params[k], np.float64)) + 0.1)
    assert np.all(np.abs(a - b) <= tol), k


@PROPERTY
@given(problem=problems(), lam=st.floats(-1.0, 3.0))
def test_base_branch_is_the_base_optimizer_bit_for_bit(problem, lam):
  params, g, _, _ = problem
  base = optax.adam(1e-2)

  def grad_fn(p):
    raise AssertionError('grad_fn must not run on a base step')

  tx = rst_optax.rst(base, schedule=0.5, rho=0.05, lam=lam)
  updates, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn,
                             take_sam=False)
  want, want_state = base.update(g, base.init(params), params)
  for a, b in zip(jax.tree.leaves((updates, state.base_state)),
                  jax.tree.leaves((want, want_state)), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float64),
                                  np.asarray(b, np.float64))
  assert (int(state.count), int(state.sam_steps)) == (1, 0)


STEPS = 8


@jax.jit
def coin_run(p, key_data, start):
  """STEPS updates from step ``start`` with p(t) = p; whether each took the
  SAM branch (read off the direction: g_sam = w + 100, g = 2 w)."""
  w = jnp.linspace(-1.0, 1.0, 3)
  tx = rst_optax.rst(optax.identity(), schedule=lambda t: p, rho=0.1)
  state = tx.init(w)._replace(key=key_data, count=start)

  def body(state, _):
    d, state = tx.update(2.0 * w, state, w, grad_fn=lambda v: v + 100.0)
    return state, jnp.all(d > 50.0)

  return jax.lax.scan(body, state, length=STEPS)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(p=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       start=st.integers(0, 10**6))
def test_updates_follow_decisions_at_any_p_seed_and_start(p, seed, start):
  """The in-graph coin, from any step count, takes the branches that
  ``decisions`` lists: g_sam exactly on SAM steps, g on the others."""
  key_data = jax.random.key_data(jax.random.key(seed))
  state, took = coin_run(p, key_data, jnp.asarray(start, jnp.int32))
  want = rst_optax.decisions(p, seed, start, start + STEPS)
  np.testing.assert_array_equal(np.asarray(took), want)
  assert int(state.sam_steps) == want.sum()
  assert int(state.count) == start + STEPS
