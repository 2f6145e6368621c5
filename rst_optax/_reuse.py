r"""LookSAM's reuse of the SAM direction between SAM steps, leaf by leaf.

On a SAM step with gradient :math:`g` and SAM-branch direction :math:`d`,
:func:`orthogonal_unit` keeps the unit vector of the part of :math:`d` that
:math:`g` does not have, :math:`u = g_v / \|g_v\|` with
:math:`g_v = d - (\langle d, g\rangle / \|g\|^2)\, g`. On a later base step,
:func:`with_reuse` adds it back at the current gradient's scale,
:math:`g + \alpha \|g\|\, u`, which is LookSAM's
:math:`g + \alpha (\|g\| / \|g_v\|)\, g_v`. Everything is computed in at least
float32 and can neither overflow nor underflow: on CPU with plain sums where
they are exact (chosen by a ``jax.lax.cond`` on scalars, as
:func:`rst_optax._norms.perturbation` does), else after scaling each vector
by a power of two near its largest entry.
"""

import jax
import jax.numpy as jnp

from rst_optax import _norms


def orthogonal_unit(d: list[jax.Array], g: list[jax.Array],
                    dtypes: list) -> list[jax.Array]:
  r"""The unit vector of :math:`d - (\langle d, g\rangle / \|g\|^2)\, g`.

  Where that part is zero (``d`` parallel to ``g``, or both zero) or not
  finite (a NaN or Inf in ``d`` or ``g``), the result is zero: nothing is
  reused.

  On CPU the sums are first taken directly, in the compute dtype, and the
  scaled computation runs only where they could overflow or lose bits to
  underflow (a ``jax.lax.cond`` on scalars); elsewhere it always runs.

  Args:
    d: the SAM-branch direction, a list of leaves.
    g: the gradient, leaves of the same shapes.
    dtypes: the dtype in which to return each leaf (the buffer's).

  Returns:
    The unit vector, or zeros, as leaves of ``dtypes``.
  """
  return jax.lax.platform_dependent(
      d, g, default=lambda d, g: _orthogonal_unit(d, g, dtypes, fast=False),
      cpu=lambda d, g: _orthogonal_unit(d, g, dtypes, fast=True))


def _orthogonal_unit(d, g, dtypes, fast: bool) -> list[jax.Array]:
  """:func:`orthogonal_unit`, with the plain sums first if ``fast``."""
  compute = [_norms.compute_dtype(a.dtype, b.dtype)
             for a, b in zip(d, g, strict=True)]
  wide = _norms.compute_dtype(*compute)
  d = [a.astype(c) for a, c in zip(d, compute, strict=True)]
  g = [b.astype(c) for b, c in zip(g, compute, strict=True)]
  if fast:
    gg = _norms.sum_of_squares(g, wide)
    dd = _norms.sum_of_squares(d, wide)
    dg = _inner(d, g, wide)
    exact = (jnp.isfinite(gg) & jnp.isfinite(dd)
             & (gg >= _norms.direct_floor(g, wide)))
    v = jax.lax.cond(exact, lambda d, g: _minus_along(d, g, dg / gg),
                     lambda d, g: _orthogonal_scaled(d, g, wide), d, g)
  else:
    v = _orthogonal_scaled(d, g, wide)
  return [x.astype(t) for x, t in zip(_unit(v, wide, fast), dtypes,
                                      strict=True)]


def _inner(a: list[jax.Array], b: list[jax.Array], dtype) -> jax.Array:
  """The inner product of two lists of leaves, summed in ``dtype``."""
  return sum((jnp.sum(x.astype(dtype) * y.astype(dtype))
              for x, y in zip(a, b, strict=True)), jnp.zeros([], dtype))


def _minus_along(d, g, coef) -> list[jax.Array]:
  """``d - coef g``, leaf by leaf."""
  return [a - coef.astype(a.dtype) * b for a, b in zip(d, g, strict=True)]


def _scaled(leaves: list[jax.Array], dtype) -> list[jax.Array]:
  """``leaves`` divided by the power of two just above their largest entry."""
  _, exponent = jnp.frexp(_norms.max_abs(leaves, dtype))
  return _norms.times_power_of_two(leaves, -exponent, dtype)


def _orthogonal_scaled(d, g, wide) -> list[jax.Array]:
  """The part of ``d`` orthogonal to ``g``, up to a positive factor, from
  ``d`` and ``g`` each scaled into [0.5, 1) first (all of ``d`` if ``g`` is
  zero)."""
  d, g = _scaled(d, wide), _scaled(g, wide)
  gg = _norms.sum_of_squares(g, wide)
  coef = jnp.where(gg > 0, _inner(d, g, wide) / jnp.where(gg > 0, gg, 1), 0)
  return _minus_along(d, g, coef)


def _unit(v: list[jax.Array], wide, fast: bool) -> list[jax.Array]:
  """``v / ||v||``, or zeros where ``v`` is zero or not finite."""

  def scaled(v):
    v = _scaled(v, wide)
    norm = jnp.sqrt(_norms.sum_of_squares(v, wide))
    keep = jnp.isfinite(norm) & (norm > 0)
    inverse = 1 / jnp.where(keep, norm, 1)
    return [jnp.where(keep, x * inverse.astype(x.dtype), 0) for x in v]

  if not fast:
    return scaled(v)
  squares = _norms.sum_of_squares(v, wide)
  exact = jnp.isfinite(squares) & (squares >= _norms.direct_floor(v, wide))
  inverse = 1 / jnp.sqrt(jnp.where(exact, squares, 1))
  return jax.lax.cond(
      exact, lambda v: [x * inverse.astype(x.dtype) for x in v], scaled, v)


def with_reuse(g: list[jax.Array], u: list[jax.Array], alpha: jax.Array
               ) -> list[jax.Array]:
  r""":math:`g + \alpha \|g\|\, u` leaf by leaf, each leaf in ``g``'s dtype.

  Computed in at least float32, with :math:`\|g\| = n \cdot 2^k` from
  :func:`rst_optax._norms.global_norm`, as :math:`g + (\alpha n u) 2^k`
  (:math:`2^k` applied as two scalar powers of two), so that it overflows
  only where the result does. Where :math:`\alpha \le 0`, :math:`\alpha` is
  NaN, or :math:`\|g\|` is not finite (a NaN or Inf in :math:`g`), the result
  is :math:`g` itself; where :math:`u` is zero (no SAM step yet) it equals
  :math:`g`.

  Args:
    g: the gradient, a list of leaves.
    u: the unit direction kept by :func:`orthogonal_unit`, same shapes.
    alpha: the reuse weight, a scalar.

  Returns:
    The direction for the base optimizer, leaves of ``g``'s dtypes.
  """
  compute = [_norms.compute_dtype(a.dtype, b.dtype)
             for a, b in zip(g, u, strict=True)]
  wide = _norms.compute_dtype(*compute)
  n, k = _norms.global_norm(
      [a.astype(c) for a, c in zip(g, compute, strict=True)], wide)
  alpha = jnp.asarray(alpha, wide)
  use = (alpha > 0) & jnp.isfinite(n)
  scale = jnp.where(use, alpha * n, 0)
  terms = _norms.times_power_of_two(
      [scale.astype(c) * b.astype(c) for b, c in zip(u, compute, strict=True)],
      k, wide)
  return [jnp.where(use, (a.astype(c) + t).astype(a.dtype), a)
          for a, t, c in zip(g, terms, compute, strict=True)]
