"""Overflow-safe norms and SAM's perturbation, in at least float32.

Every norm of the library goes through here: SAM's perturbation
(:func:`perturbation`) and the reused direction of ``rst(..., reuse=...)``
(:func:`global_norm`). Each leaf is computed in its own dtype and at least
float32, the scalars in the widest of those. A norm is scaled by a power of
two near the largest entry, so that it neither overflows nor underflows for
any finite input. On CPU the plain sum of squares is used where it is exact,
behind a ``jax.lax.cond`` on a scalar (see :func:`perturbation`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(*dtypes) -> np.dtype:
  """The dtype to compute in: the widest of ``dtypes``, and at least float32."""
  return jax.dtypes.canonicalize_dtype(jnp.result_type(jnp.float32, *dtypes))


def max_abs(leaves: list[jax.Array], dtype) -> jax.Array:
  """The largest ``|x|`` over all entries of ``leaves`` (NaN if any is NaN,
  0 if there are none), as a ``dtype`` scalar."""
  maxima = [jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]
  return functools.reduce(jnp.maximum, maxima, jnp.zeros([], dtype))


def all_finite(leaves: list[jax.Array]) -> jax.Array:
  """Whether every entry of ``leaves`` is finite, as a bool scalar."""
  return functools.reduce(
      jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves],
      jnp.asarray(True))


def safe_sqrt(x: jax.Array) -> jax.Array:
  """``jnp.sqrt(x)``, with a zero (not infinite) derivative at ``x = 0``.

  The square root is never taken of a 0 that ``jnp.where`` then discards,
  so that ``jax.grad`` through a zero norm is 0, not NaN (0 times the
  infinite derivative). NaN and Inf pass through.
  """
  zero = x == 0
  return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, x)))


def sum_of_squares(leaves: list[jax.Array], dtype) -> jax.Array:
  """The sum of the squares of every entry, each squared in ``dtype``."""
  return sum((jnp.sum(jnp.square(x.astype(dtype))) for x in leaves),
             jnp.zeros([], dtype))


def scaled_down(leaves: list[jax.Array], dtype) -> tuple[
    list[jax.Array], jax.Array, jax.Array]:
  """``leaves`` divided by ``2**k``, the power of two just above their largest
  entry (exactly: only the exponents change), so that the largest is in
  [0.5, 1). Returns them, ``k`` (an int32 scalar; 0 if all are zero) and the
  largest entry (NaN or Inf if any entry is)."""
  largest = max_abs(leaves, dtype)
  _, exponent = jnp.frexp(largest)
  return [jnp.ldexp(x, -exponent) for x in leaves], exponent, largest


def times_power_of_two(leaves: list[jax.Array], k: jax.Array, dtype,
                       parts: int = 2) -> list[jax.Array]:
  """``leaves`` times ``2**k`` (``k`` an int32 scalar), as ``parts``
  multiplies by scalars, powers of two of the sign of ``k`` that ``dtype``
  represents (two cover the exponent of any one number, ``|k| < 300`` in
  float32; three the sum of two such): exact where the result is normal, an
  intermediate overflows only if the result does, and cheaper than
  ``jnp.ldexp`` on every entry."""
  powers = []
  for left in range(parts, 0, -1):
    step = k // left
    powers.append(jnp.ldexp(jnp.ones([], dtype), step))
    k = k - step
  out = []
  for x in leaves:
    for power in powers:
      x = x * power.astype(x.dtype)
    out.append(x)
  return out


def direct_floor(leaves: list[jax.Array], dtype) -> float:
  """The least sum of squares at which the plain sum is exact to rounding.

  Squares below the smallest normal number may be flushed to zero; above
  this floor, all of them together are below the rounding error of the sum.
  """
  size = max(sum(x.size for x in leaves), 1)
  return float(jnp.finfo(dtype).tiny) * size / float(jnp.finfo(dtype).eps)


def global_norm(leaves: list[jax.Array], dtype) -> tuple[jax.Array, jax.Array]:
  r"""The L2 norm of all entries of ``leaves`` as ``(n, k)``, with
  :math:`\|x\|_2 = n \cdot 2^k`, overflow- and underflow-safe.

  ``n`` is a ``dtype`` scalar (non-finite if an entry is), ``k`` an int32
  scalar. On CPU, where the plain sum of squares is finite and above the
  floor of flushed squares, ``n`` is its square root and ``k = 0``; otherwise
  (and always elsewhere) ``n`` is the norm of the leaves scaled by
  :func:`scaled_down`. The ``jax.lax.cond`` between the two returns scalars
  only.
  """
  squares = sum_of_squares(leaves, dtype)
  floor = direct_floor(leaves, dtype)

  exact = jnp.isfinite(squares) & (squares >= floor)

  def scaled():
    unit, exponent, _ = scaled_down(leaves, dtype)
    return safe_sqrt(sum_of_squares(unit, dtype)), exponent

  def direct():
    return jnp.sqrt(jnp.where(exact, squares, 1)), jnp.zeros([], jnp.int32)

  return jax.lax.platform_dependent(
      cpu=lambda: jax.lax.cond(exact, direct, scaled), default=scaled)


def scaled_perturbation(
    g: list[jax.Array], w: list[jax.Array], rho: jax.Array, eps: float,
    eta: float | None,
) -> tuple[list[jax.Array], jax.Array]:
  r"""SAM's perturbation of the leaves ``w`` along the leaves ``g``, scaled.

  :math:`e = \rho\, s^2 g / (\|s g\|_2 + \varepsilon)` with :math:`s = 1`
  (SAM) or :math:`s = |w| + \eta` (ASAM, when ``eta`` is not None). The norm
  is scaled: :math:`s` and then :math:`s g` are divided by a power of two near
  their largest entry before squaring, so it neither overflows nor underflows
  for any finite :math:`g` and :math:`w`. Each leaf is computed in its own
  dtype and at least float32, the scalars in the widest of those.

  Returns:
    The perturbation of each leaf (in its compute dtype), and whether
    :math:`s g` is finite (if not, the perturbation is meaningless).
  """
  dtypes = [compute_dtype(a.dtype, b.dtype) for a, b in zip(g, w, strict=True)]
  wide = compute_dtype(*dtypes)
  x = [a.astype(d) for a, d in zip(g, dtypes, strict=True)]
  power = lambda k: jnp.ldexp(jnp.ones([], wide), k)
  c_s = jnp.ones([], wide)
  if eta is not None:
    s = [jnp.abs(b.astype(d)) + jnp.asarray(eta, d)
         for b, d in zip(w, dtypes, strict=True)]
    s_scaled, k_s, _ = scaled_down(s, wide)
    c_s = power(k_s)
    x = [si * xi for si, xi in zip(s_scaled, x, strict=True)]
  unit, k_x, largest = scaled_down(x, wide)
  c_x = power(k_x)
  # ||s g|| = c_s * c_x * scaled_norm, where 0.5 <= scaled_norm <= sqrt(n)
  # unless g is zero.
  scaled_norm = safe_sqrt(sum_of_squares(unit, wide))
  scale = jnp.asarray(rho, wide) / (scaled_norm + eps / (c_s * c_x))
  e = [scale.astype(d) * u for u, d in zip(unit, dtypes, strict=True)]
  if eta is not None:
    e = [si * ei for si, ei in zip(s, e, strict=True)]
  return e, jnp.isfinite(largest)


def perturbation(
    g: list[jax.Array], w: list[jax.Array], rho: jax.Array, eps: float,
    eta: float | None,
) -> tuple[list[jax.Array], jax.Array]:
  """:func:`scaled_perturbation`, computed directly on CPU when that is exact.

  On CPU, where a small model's step is short enough for two more reductions
  over the parameters to show (about 12% of a 23k-parameter MLP's SAM step),
  the plain sum of squares of :math:`s g` is computed first; where it is
  finite and far enough above the smallest normal number that no flushed
  square matters, the perturbation follows from it at once, and otherwise
  (an overflow, an underflow, a zero or a non-finite gradient) a
  ``jax.lax.cond`` takes the scaled computation. Elsewhere the scaled
  computation always runs: a ``cond`` there could make the host wait for its
  predicate, and the extra reductions are cheap next to the gradient. The
  choice is ``jax.lax.platform_dependent``, made when lowering.
  """
  dtypes = [compute_dtype(a.dtype, b.dtype) for a, b in zip(g, w, strict=True)]
  wide = compute_dtype(*dtypes)
  x = [a.astype(d) for a, d in zip(g, dtypes, strict=True)]
  s = None
  if eta is not None:
    s = [jnp.abs(b.astype(d)) + jnp.asarray(eta, d)
         for b, d in zip(w, dtypes, strict=True)]
    x = [si * xi for si, xi in zip(s, x, strict=True)]
  squares = sum_of_squares(x, wide)
  exact = jnp.isfinite(squares) & (squares >= direct_floor(x, wide))

  def direct(_):
    # (Under jax.vmap the cond is a select, and both branches run.)
    norm = jnp.sqrt(jnp.where(exact, squares, 1))
    scale = jnp.asarray(rho, wide) / (norm + eps)
    e = [scale.astype(d) * u for u, d in zip(x, dtypes, strict=True)]
    if s is not None:
      e = [si * ei for si, ei in zip(s, e, strict=True)]
    return e, jnp.isfinite(squares)  # True here, typed like the data

  scaled = lambda _=None: scaled_perturbation(g, w, rho, eps, eta)
  return jax.lax.platform_dependent(
      cpu=lambda: jax.lax.cond(exact, direct, scaled, None), default=scaled)
