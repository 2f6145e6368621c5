r"""LookSAM's reuse of the SAM direction between SAM steps, leaf by leaf.

On a SAM step with gradient :math:`g` and SAM-branch direction :math:`d`,
:func:`orthogonal_unit` keeps the unit vector of the part of :math:`d` that
:math:`g` does not have, :math:`u = g_v / \|g_v\|` with
:math:`g_v = d - (\langle d, g\rangle / \|g\|^2)\, g`. On a later base step,
:func:`with_reuse` adds it back at the current gradient's scale,
:math:`g + \alpha \|g\|\, u`, which is LookSAM's
:math:`g + \alpha (\|g\| / \|g_v\|)\, g_v`. A :math:`g_v` at the level of
rounding (:math:`\|g_v\| \le 8 \epsilon \|d\|`) is zero, never a
direction. Everything is computed in at least float32 and can neither
overflow nor underflow: on CPU with plain sums where they are exact (chosen
by a ``jax.lax.cond`` on scalars, as :func:`rst_optax._norms.perturbation`
does), else after scaling each vector by a power of two near its largest
entry. No square root or division is taken of a value that a ``jnp.where``
then discards, so gradients through them stay finite.
"""

import jax
import jax.numpy as jnp

from rst_optax import _norms

# A g_v at most this many epsilons of d's coarsest dtype times ||d|| is
# rounding, not a direction. d carries the rounding of its own dtype (at most
# half an epsilon per entry for each rounding, so a few epsilons of ||d||
# when g_sam is g evaluated twice: 1 to 1.4 measured on a tanh network), and
# computing g_v from a d exactly parallel to g leaves at most
# (|theta| + eps/2) ||d||, where theta is the relative error of
# <d, g> / ||g||^2: 3 roundings for a single entry (2 epsilons in all), and
# at most 1.8 epsilons measured for 1 to 3e6 entries (XLA's sums; their error
# lies along g and does not grow like the size). Neither grows with the
# number of entries, so the threshold does not either; 8 leaves a factor of
# 4 over both. In float32 it is 9.5e-7 ||d||, in float64 1.8e-15 ||d||.
ROUNDING = 8


def orthogonal_unit(d: list[jax.Array], g: list[jax.Array], dtypes: list,
                    perturbed: jax.Array | bool = True) -> list[jax.Array]:
  r"""The unit vector of :math:`g_v = d - (\langle d, g\rangle / \|g\|^2)\,
  g`.

  Where :math:`\|g_v\| \le 8 \epsilon \|d\|`, with :math:`\epsilon` that of
  the coarsest dtype of ``d`` and ``g`` (rounding: ``d`` parallel to ``g``
  up to its last bits, as after a SAM step with :math:`\rho = 0`, or a
  single entry), or where it is not finite (a NaN or Inf in ``d`` or
  ``g``), or where ``perturbed`` is False, the result is zero: nothing is
  reused.

  On CPU the sums are first taken directly, in the compute dtype, and the
  scaled computation runs only where they could overflow or lose bits to
  underflow (a ``jax.lax.cond`` on scalars); elsewhere it always runs.

  Args:
    d: the SAM-branch direction, a list of leaves.
    g: the gradient, leaves of the same shapes.
    dtypes: the dtype in which to return each leaf (the buffer's).
    perturbed: whether the SAM step moved the parameters (:math:`\rho_t > 0`;
      a bool scalar). If not, ``d`` is ``g`` evaluated again, and differs
      from it by rounding alone, however large the model.

  Returns:
    The unit vector, or zeros, as leaves of ``dtypes``.
  """
  return jax.lax.platform_dependent(
      d, g,
      default=lambda d, g: _orthogonal_unit(d, g, dtypes, perturbed, False),
      cpu=lambda d, g: _orthogonal_unit(d, g, dtypes, perturbed, True))


def _orthogonal_unit(d, g, dtypes, perturbed, fast: bool) -> list[jax.Array]:
  """:func:`orthogonal_unit`, with the plain sums first if ``fast``."""
  epsilon = max(float(jnp.finfo(x.dtype).eps) for x in d + g)
  tolerance = (ROUNDING * epsilon) ** 2  # on ||g_v||^2 / ||d||^2
  compute = [_norms.compute_dtype(a.dtype, b.dtype)
             for a, b in zip(d, g, strict=True)]
  wide = _norms.compute_dtype(*compute)
  d = [a.astype(c) for a, c in zip(d, compute, strict=True)]
  g = [b.astype(c) for b, c in zip(g, compute, strict=True)]

  def scaled(d, g):
    # d and g each scaled into [0.5, 1): ||d|| >= 0.5 and ||v|| <= 2 ||d||,
    # so neither the norms nor the threshold over- or underflow.
    d, g = _scaled(d, wide), _scaled(g, wide)
    gg = _norms.sum_of_squares(g, wide)
    nonzero = gg > 0
    v = _minus_along(d, g, jnp.where(
        nonzero, _inner(d, g, wide) / jnp.where(nonzero, gg, 1), 0))
    vv = _norms.sum_of_squares(v, wide)
    # A NaN or Inf in d or g makes vv or the bound NaN or Inf: not kept.
    keep = perturbed & (vv > tolerance * _norms.sum_of_squares(d, wide))
    return _normalized(v, vv, keep)

  if not fast:
    u = scaled(d, g)
  else:
    gg = _norms.sum_of_squares(g, wide)
    dd = _norms.sum_of_squares(d, wide)
    usable = (jnp.isfinite(gg) & jnp.isfinite(dd)
              & (gg >= _norms.direct_floor(g, wide)))
    v = _minus_along(d, g, _inner(d, g, wide) / jnp.where(usable, gg, 1))
    vv = _norms.sum_of_squares(v, wide)
    # Exact to rounding where no square of v is lost to underflow (v is
    # finite where d and g are, and ||v|| <= ||d||). Then vv >= floor, above
    # any tolerance * dd that underflows.
    exact = usable & (vv >= _norms.direct_floor(v, wide))
    keep = perturbed & (vv > tolerance * dd)
    u = jax.lax.cond(exact, lambda v, d, g: _normalized(v, vv, keep),
                     lambda v, d, g: scaled(d, g), v, d, g)
  return [x.astype(t) for x, t in zip(u, dtypes, strict=True)]


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


def _normalized(v, vv, keep) -> list[jax.Array]:
  """``v / sqrt(vv)`` where ``keep``, else zeros (no square root of a value
  that is then discarded, so gradients stay finite)."""
  inverse = 1 / jnp.sqrt(jnp.where(keep, vv, 1))
  return [jnp.where(keep, x * inverse.astype(x.dtype), 0) for x in v]


def with_reuse(g: list[jax.Array], u: list[jax.Array], alpha: jax.Array
               ) -> list[jax.Array]:
  r""":math:`g + \alpha \|g\|\, u` leaf by leaf, each leaf in ``g``'s dtype.

  Computed in at least float32 and rounded once to ``g``'s dtype, with
  :math:`\|g\| = n \cdot 2^k` from :func:`rst_optax._norms.global_norm` and
  :math:`\alpha = m \cdot 2^e` (``jnp.frexp``), as
  :math:`g + (m n u) 2^{k + e}` (the power applied as three scalar powers
  of two of one sign): no intermediate overflows, so an entry where
  :math:`u` is zero is :math:`g`'s and never NaN, however large
  :math:`\alpha \|g\|`. Where the term overflows alone, the sum is taken at
  half scale, so that the result overflows only where
  :math:`g + \alpha \|g\| u` itself is beyond the dtype's range. Where
  :math:`\alpha \le 0`, :math:`\alpha` is NaN or infinite, or :math:`\|g\|`
  is not finite (a NaN or Inf in :math:`g`), the result is :math:`g` itself.

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
  use = (alpha > 0) & jnp.isfinite(alpha) & jnp.isfinite(n)
  mantissa, exponent = jnp.frexp(jnp.where(use, alpha, 0))
  scaled = [(mantissa * n).astype(c) * b.astype(c)  # below sqrt(size)
            for b, c in zip(u, compute, strict=True)]
  term = _norms.times_power_of_two(scaled, k + exponent, wide, parts=3)
  half = _norms.times_power_of_two(scaled, k + exponent - 1, wide, parts=3)
  return [jnp.where(use, jnp.where(jnp.isinf(t), 2 * (a.astype(c) / 2 + h),
                                   a.astype(c) + t).astype(a.dtype), a)
          for a, t, h, c in zip(g, term, half, compute, strict=True)]
