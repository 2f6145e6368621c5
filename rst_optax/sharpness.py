"""Flatness measures of a trained model: top Hessian eigenvalue, ε-sharpness.

Sharpness-aware training aims at minima whose loss stays low in a
neighbourhood of the weights. These two measures tell how far a run got:

- :func:`top_hessian_eigenvalue`, the curvature along the sharpest direction,
  by ``optax.power_iteration`` over a Hessian-vector product;
- :func:`epsilon_sharpness`, the largest rise of the loss within an L2 ball of
  radius :math:`\\rho`, the quantity SAM's inner step approximates to first
  order, by projected gradient ascent.

Both take ``loss_fn(params) -> scalar``, a function of the parameters alone
that closes over the data (a fixed batch, or the whole training set where it
fits), or ``(loss, aux)`` with ``has_aux=True``, and accept any pytree of
floating-point parameters. What ``loss_fn`` returns is checked when tracing.

References:
  Keskar et al., `On Large-Batch Training for Deep Learning: Generalization
  Gap and Sharp Minima <https://arxiv.org/abs/1609.04836>`_, 2017.

  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rst_optax import _checks

__all__ = [
    'epsilon_sharpness',
    'hvp',
    'top_hessian_eigenvalue',
]

LossFn = Callable[[optax.Params], jax.Array]


def _check_loss_fn(fn: str, loss_fn, has_aux) -> None:
  if not callable(loss_fn):
    raise TypeError(
        f'{fn}: `loss_fn` must be a callable params -> scalar loss; got '
        f'{loss_fn!r}.')
  if not isinstance(has_aux, (bool, np.bool_)):
    raise TypeError(f'{fn}: `has_aux` must be a bool; got {has_aux!r}.')


def _check_params(fn: str, params) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError(f'{fn}: `params` must be a pytree with at least one array '
                     'leaf; got an empty tree.')
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      where = jax.tree_util.keystr(path) or '(the root)'
      got = (f'a {type(leaf).__name__}, not an array' if dtype is None
             else f'of dtype {dtype}')
      raise TypeError(
          f'{fn}: every leaf of `params` must be a floating-point array; the '
          f'leaf at {where} is {got}.')


def _check_key(fn: str, key) -> jax.Array:
  """``key``, checked, or ``jax.random.key(0)`` for None."""
  if key is None:
    return jax.random.key(0)
  _checks.prng_key(fn, 'key', key)
  return key


def _loss_of(fn: str, loss_fn, has_aux: bool) -> LossFn:
  """``loss_fn`` as a function of the parameters to the loss alone, its
  output checked when tracing (named as ``fn``'s)."""

  def loss(params):
    out = _checks.loss_output(fn, loss_fn(params), has_aux)
    return out[0] if has_aux else out

  return loss


def _normalize(tree, eps=1e-30):
  return optax.tree.scale(1.0 / (optax.tree.norm(tree) + eps), tree)


def hvp(
    loss_fn: LossFn, params: optax.Params, vector: optax.Params, *,
    has_aux: bool = False,
) -> optax.Params:
  r"""Hessian-vector product :math:`\nabla^2 L(w)\, v`, forward over reverse.

  Computed as ``jax.jvp(jax.grad(loss_fn), (params,), (vector,))``: one
  gradient's cost, twice or so, and no Hessian in memory.

  Args:
    loss_fn: ``loss_fn(params) -> scalar`` (or ``(loss, aux)`` with
      ``has_aux=True``).
    params: the point :math:`w`, a pytree of floating-point arrays.
    vector: :math:`v`, a pytree with the structure, shapes and dtypes of
      ``params``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.

  Returns:
    :math:`H v`, a pytree with the structure of ``params``.

  Raises:
    TypeError: if ``loss_fn`` is not callable or does not return a real
      floating scalar (or a ``(loss, aux)`` pair with ``has_aux``), a leaf
      of ``params`` is not floating-point, or ``vector``'s dtypes differ.
    ValueError: if ``params`` is empty, or ``vector``'s structure or shapes
      are not those of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> from rst_optax import sharpness
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([3.0, 1.0]) * w ** 2)
    >>> sharpness.hvp(loss, jnp.zeros(2), jnp.ones(2))
    Array([3., 1.], dtype=float32)
  """
  fn = 'hvp'
  _check_loss_fn(fn, loss_fn, has_aux)
  _check_params(fn, params)
  _checks.same_structure(fn, 'vector', vector, 'params', params)
  for (path, v), w in zip(jax.tree_util.tree_leaves_with_path(vector),
                          jax.tree.leaves(params), strict=True):
    dtype = getattr(v, 'dtype', None)
    if dtype != w.dtype:
      where = jax.tree_util.keystr(path) or '(the root)'
      got = f'a {type(v).__name__}' if dtype is None else dtype
      raise TypeError(
          f'{fn}: `vector` must have the dtypes of `params`; the leaf at '
          f'{where} is {got} for {w.dtype}.')
  return _hvp(_loss_of(fn, loss_fn, has_aux), params, vector)


def _hvp(loss: LossFn, params: optax.Params, vector: optax.Params
         ) -> optax.Params:
  """:func:`hvp` of checked arguments."""
  return jax.jvp(jax.grad(loss), (params,), (vector,))[1]


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: optax.Params,
    *,
    num_iters: int = 100,
    error_tolerance: float = 1e-6,
    key: jax.Array | None = None,
    has_aux: bool = False,
) -> tuple[jax.Array, optax.Params]:
  r"""Dominant eigenvalue of the Hessian of ``loss_fn`` at ``params``.

  Power iteration (``optax.power_iteration``) over the Hessian-vector product
  :func:`hvp`, from a random start:

  .. math:: v_{k+1} = \frac{H v_k}{\|H v_k\|_2}, \qquad
     \lambda = v_k^\top H v_k,

  with :math:`H = \nabla^2 L(w)`. It finds the eigenvalue of largest
  magnitude; at or near a minimum, where :math:`H` has no large negative
  eigenvalue, that is the top eigenvalue :math:`\lambda_\max`, the curvature
  along the sharpest direction. Power iteration converges at the rate
  :math:`|\lambda_2 / \lambda_1|`, so check that the value is stable in
  ``num_iters`` on your problem.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``, twice differentiable; close it
      over the data (a fixed batch or the whole training set).
    params: the point, a pytree of floating-point arrays.
    num_iters: the most power iterations, ``>= 1``.
    error_tolerance: stops when the relative change of the estimate is below
      it, ``>= 0``.
    key: a JAX PRNG key for the random start (typed, or raw ``uint32`` key
      data); ``None`` uses ``jax.random.key(0)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.

  Returns:
    ``(eigenvalue, eigenvector)``: a float scalar and a unit-norm pytree with
    the structure of ``params``. Where the Hessian is zero (a linear or
    constant loss), ``0`` and the random start vector, normalized: every
    vector is then an eigenvector.

  Raises:
    TypeError: if ``loss_fn`` is not callable or does not return a real
      floating scalar (or a ``(loss, aux)`` pair with ``has_aux``), a leaf
      of ``params`` is not floating-point, or ``key`` is not a PRNG key.
    ValueError: if ``params`` is empty, or an argument is out of range.

  Example:
    >>> import jax.numpy as jnp
    >>> from rst_optax import sharpness
    >>> h = jnp.array([4.0, 1.0, 0.5])
    >>> loss = lambda w: 0.5 * jnp.sum(h * w['a'] ** 2)
    >>> lam, v = sharpness.top_hessian_eigenvalue(loss, {'a': jnp.ones(3)})
    >>> round(float(lam), 4)
    4.0

  References:
    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020.
  """
  fn = 'top_hessian_eigenvalue'
  _check_loss_fn(fn, loss_fn, has_aux)
  _check_params(fn, params)
  num_iters = _checks.integer(fn, 'num_iters', num_iters, 1)
  _checks.number(fn, 'error_tolerance', error_tolerance, low=0.0)
  key = _check_key(fn, key)
  loss = _loss_of(fn, loss_fn, has_aux)
  v0 = optax.tree.random_like(key, params, jax.random.normal)

  def power_iteration():
    return optax.power_iteration(
        lambda v: _hvp(loss, params, v), v0=v0, num_iters=num_iters,
        error_tolerance=error_tolerance)

  def zero_hessian():
    # H v0 = 0 for a random v0 only where H = 0 (almost surely); power
    # iteration would divide by ||H v0|| = 0.
    eigenvalue = jax.eval_shape(power_iteration)[0]
    return jnp.zeros([], eigenvalue.dtype), _normalize(v0)

  is_zero = optax.tree.norm(_hvp(loss, params, v0)) == 0
  return jax.lax.cond(is_zero, zero_hessian, power_iteration)


def epsilon_sharpness(
    loss_fn: LossFn,
    params: optax.Params,
    rho: float,
    *,
    num_steps: int = 10,
    key: jax.Array | None = None,
    has_aux: bool = False,
) -> jax.Array:
  r"""ε-sharpness: the largest rise of the loss within an L2 ball of radius ρ.

  .. math:: S_\rho(w) = \max_{\|\epsilon\|_2 \le \rho} L(w + \epsilon) - L(w),

  estimated by projected normalized gradient ascent on the sphere
  :math:`\|\epsilon\|_2 = \rho`. It starts from SAM's perturbation
  :math:`\rho\, g / \|g\|_2`, :math:`g = \nabla L(w)` (from a random direction
  when :math:`g = 0`, as at an exact minimum), and takes ``num_steps`` steps

  .. math:: \epsilon \leftarrow \rho\,
     \frac{\epsilon + \rho\, \hat g(\epsilon)}
          {\|\epsilon + \rho\, \hat g(\epsilon)\|_2},
     \qquad \hat g(\epsilon) = \frac{\nabla L(w + \epsilon)}
                                    {\|\nabla L(w + \epsilon)\|_2}.

  The result is the largest rise seen over the iterates, and at least 0 (the
  centre of the ball): a lower bound of :math:`S_\rho` that tightens with
  ``num_steps``. For a quadratic with Hessian :math:`H` at its minimum it
  tends to :math:`\tfrac12 \lambda_\max(H) \rho^2`. Compare models at the same
  :math:`\rho` and with the same loss; the measure is not invariant to
  rescalings of the weights that leave the function unchanged.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``, differentiable; close it over the
      data.
    params: the point :math:`w`, a pytree of floating-point arrays.
    rho: the radius :math:`\rho`, a finite number ``>= 0``.
    num_steps: ascent steps after the first (SAM) perturbation, ``>= 0``.
    key: a JAX PRNG key (typed, or raw ``uint32`` key data) for the random
      direction used when the gradient at ``params`` is zero; ``None`` uses
      ``jax.random.key(0)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.

  Returns:
    :math:`S_\rho(w)` as a float scalar.

  Raises:
    TypeError: if ``loss_fn`` is not callable or does not return a real
      floating scalar (or a ``(loss, aux)`` pair with ``has_aux``), a leaf
      of ``params`` is not floating-point, or ``key`` is not a PRNG key.
    ValueError: if ``params`` is empty, or an argument is out of range.

  Example:
    >>> import jax.numpy as jnp
    >>> from rst_optax import sharpness
    >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w ** 2)
    >>> s = sharpness.epsilon_sharpness(loss, jnp.zeros(2), rho=0.1,
    ...                                 num_steps=50)
    >>> round(float(s), 5)  # 0.5 * 4 * 0.1 ** 2
    0.02

  References:
    Keskar et al., `On Large-Batch Training for Deep Learning: Generalization
    Gap and Sharp Minima <https://arxiv.org/abs/1609.04836>`_, 2017.

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.
  """
  fn = 'epsilon_sharpness'
  _check_loss_fn(fn, loss_fn, has_aux)
  _check_params(fn, params)
  _checks.number(fn, 'rho', rho, low=0.0)
  num_steps = _checks.integer(fn, 'num_steps', num_steps, 0)
  key = _check_key(fn, key)
  loss_fn = _loss_of(fn, loss_fn, has_aux)

  value_and_grad = jax.value_and_grad(lambda e: loss_fn(
      optax.tree.add(params, e)))
  zero = optax.tree.zeros_like(params)
  base, grad = value_and_grad(zero)
  random_dir = optax.tree.random_like(key, params, jax.random.normal)
  is_zero = optax.tree.norm(grad) == 0
  start = jax.tree.map(lambda g, r: jnp.where(is_zero, r, g), grad, random_dir)
  eps = optax.tree.scale(rho, _normalize(start))

  def body(_, carry):
    eps, best = carry
    loss, grad = value_and_grad(eps)
    best = jnp.maximum(best, loss)
    moved = optax.tree.add_scale(eps, rho, _normalize(grad))
    return optax.tree.scale(rho, _normalize(moved)), best

  eps, best = jax.lax.fori_loop(0, num_steps, body, (eps, base))
  best = jnp.maximum(best, loss_fn(optax.tree.add(params, eps)))
  return best - base
