r"""LookSAM's reuse of the SAM direction between SAM steps, leaf by leaf.

On a SAM step with gradient :math:`g` and SAM-branch direction :math:`d`,
:func:`orthogonal_unit` keeps the unit vector of the part of :math:`d` that
:math:`g` does not have, :math:`u = g_v / \|g_v\|` with
:math:`g_v = d - (\langle d, g\rangle / \|g\|^2)\, g`. On a later base step,
:func:`with_reuse` adds it back at the current gradient's scale,
:math:`g + \alpha \|g\|\, u`, which is LookSAM's
:math:`g + \alpha (\|g\| / \|g_v\|)\, g_v`. All norms are overflow-safe and in
at least float32 (:mod:`rst_optax._norms`).
"""

import jax
import jax.numpy as jnp

from rst_optax import _norms


def orthogonal_unit(d: list[jax.Array], g: list[jax.Array],
                    dtypes: list) -> list[jax.Array]:
  r"""The unit vector of :math:`d - (\langle d, g\rangle / \|g\|^2)\, g`.

  ``d`` and ``g`` are scaled by powers of two before the inner products, so
  nothing overflows or underflows for finite inputs. Where that part is zero
  (``d`` parallel to ``g``, or both zero) or not finite (a NaN or Inf in
  ``d`` or ``g``), the result is zero: nothing is reused.

  On CPU the computation sits in a ``jax.lax.cond`` on whether ``g`` is
  finite (no gradient inside), whose operands XLA materializes: it then reads
  the same ``d`` and ``g`` whether the step runs under host dispatch or in
  ``rst``'s own ``cond``. Otherwise XLA:CPU may fuse a copy of their last
  operation into the inner products, rounded differently (an FMA), and the
  difference of nearly parallel vectors magnifies that last bit: host
  dispatch and the ``cond`` would keep different directions.

  Args:
    d: the SAM-branch direction, a list of leaves.
    g: the gradient, leaves of the same shapes.
    dtypes: the dtype in which to return each leaf (the buffer's).

  Returns:
    The unit vector, or zeros, as leaves of ``dtypes``.
  """
  compute = lambda d, g: _orthogonal_unit(d, g, dtypes)
  zeros = lambda d, g: [jnp.zeros(x.shape, t)
                        for x, t in zip(d, dtypes, strict=True)]
  return jax.lax.platform_dependent(
      d, g, default=compute, cpu=lambda d, g: jax.lax.cond(
          _norms.all_finite(g), compute, zeros, d, g))


def _orthogonal_unit(d: list[jax.Array], g: list[jax.Array],
                     dtypes: list) -> list[jax.Array]:
  """:func:`orthogonal_unit` itself, on every platform."""
  compute = [_norms.compute_dtype(a.dtype, b.dtype)
             for a, b in zip(d, g, strict=True)]
  wide = _norms.compute_dtype(*compute)
  d_unit, _, _ = _norms.scaled_down(
      [a.astype(c) for a, c in zip(d, compute, strict=True)], wide)
  g_unit, _, _ = _norms.scaled_down(
      [b.astype(c) for b, c in zip(g, compute, strict=True)], wide)
  gg = _norms.sum_of_squares(g_unit, wide)
  dg = sum((jnp.sum(a.astype(wide) * b.astype(wide))
            for a, b in zip(d_unit, g_unit, strict=True)), jnp.zeros([], wide))
  coef = jnp.where(gg > 0, dg / jnp.where(gg > 0, gg, 1), 0)
  # (d - coef g) / 2**k_d: the part of d orthogonal to g, up to a power of 2.
  v = [a - coef.astype(c) * b
       for a, b, c in zip(d_unit, g_unit, compute, strict=True)]
  v_unit, _, _ = _norms.scaled_down(v, wide)
  norm = jnp.sqrt(_norms.sum_of_squares(v_unit, wide))
  keep = jnp.isfinite(norm) & (norm > 0)
  inverse = 1 / jnp.where(keep, norm, 1)
  return [jnp.where(keep, x * inverse.astype(c), 0).astype(t)
          for x, c, t in zip(v_unit, compute, dtypes, strict=True)]


def with_reuse(g: list[jax.Array], u: list[jax.Array], alpha: jax.Array
               ) -> list[jax.Array]:
  r""":math:`g + \alpha \|g\|\, u` leaf by leaf, each leaf in ``g``'s dtype.

  Computed in at least float32, with :math:`\|g\| = n \cdot 2^k` from
  :func:`rst_optax._norms.global_norm`, as :math:`g + 2^k (\alpha n u)`, so
  that it overflows only where the result does. Where :math:`\alpha \le 0`,
  :math:`\alpha` is NaN, or :math:`\|g\|` is not finite (a NaN or Inf in
  :math:`g`), the result is :math:`g` itself; where :math:`u` is zero (no SAM
  step yet) it equals :math:`g`.

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
  out = []
  for a, b, c in zip(g, u, compute, strict=True):
    added = a.astype(c) + jnp.ldexp(scale.astype(c) * b.astype(c), k)
    out.append(jnp.where(use, added.astype(a.dtype), a))
  return out
