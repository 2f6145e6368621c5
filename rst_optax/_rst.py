"""Randomized Sharpness-Aware Training (RST) and its generalization G-RST.

Each step flips a biased coin: with probability p(t) the gradient goes through
a sharpness-aware (SAM) branch that evaluates the gradient a second time at
perturbed parameters; otherwise it goes to the base optimizer as it is.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rst_optax import _checks, _coin, _types

# eps must stay positive once rounded to float32.
_EPS_MIN = float(np.finfo(np.float32).tiny)

_SUPPORTED_SUBSET = (
    'rst(optax.multi_transform(...), ...) or rst(optax.masked(...), ...) for '
    'per-group base optimizers, and rst(..., mask=...) to perturb a subset of '
    'the parameters')


class RSTState(NamedTuple):
  """State of the transformation returned by :func:`rst`.

  Attributes:
    count: int32 scalar, the number of ``update`` calls so far; it is the step
      ``t`` at which the schedules are evaluated and the coin is drawn. It
      stops at the int32 maximum (``optax.safe_increment``).
    key: the PRNG key of the coin as raw ``uint32`` key data (see
      ``jax.random.key_data``), so the state is a plain array pytree that
      ``jax.jit``, ``optax.tree`` helpers and checkpointers handle. It never
      changes: the draw at step ``t`` folds ``t`` into it.
    sam_steps: int32 scalar, the number of SAM steps taken so far. A run has
      cost ``count + sam_steps`` forward-backward passes.
    base_state: the state of the base optimizer.
  """

  count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count
  key: jax.Array
  sam_steps: jax.Array
  base_state: optax.OptState


def _mark_varying(tree: optax.Params, axis_name: str) -> optax.Params:
  """Marks ``tree`` as varying over ``axis_name`` where it is not already.

  Under ``jax.shard_map`` with ``check_vma=True``, ``jax.grad`` at parameters
  that are the same on every device returns their gradient already summed
  over the axis; at varying parameters it returns this device's gradient.
  Under ``pmap`` or ``check_vma=False`` this is a no-op.
  """

  def mark(x):
    try:
      return jax.lax.pcast(x, axis_name, to='varying')
    except ValueError:  # already varying over axis_name
      return x

  return jax.tree.map(mark, tree)


def _compute_dtype(*dtypes) -> np.dtype:
  """The dtype to compute in: the widest of ``dtypes``, and at least float32."""
  return jax.dtypes.canonicalize_dtype(jnp.result_type(jnp.float32, *dtypes))


def _max_abs(leaves: list[jax.Array], dtype) -> jax.Array:
  """The largest ``|x|`` over all entries of ``leaves`` (NaN if any is NaN,
  0 if there are none), as a ``dtype`` scalar."""
  maxima = [jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]
  return functools.reduce(jnp.maximum, maxima, jnp.zeros([], dtype))


def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  """Whether every entry of ``leaves`` is finite, as a bool scalar."""
  return functools.reduce(
      jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves],
      jnp.asarray(True))


def _scaled_down(leaves: list[jax.Array], dtype) -> tuple[
    list[jax.Array], jax.Array, jax.Array]:
  """``leaves`` divided by ``c``, the power of two just above their largest
  entry (exactly: only the exponents change), so that the largest is in
  [0.5, 1). Returns them, ``c`` (a ``dtype`` scalar; 1 if all are zero) and
  the largest entry (NaN or Inf if any entry is)."""
  largest = _max_abs(leaves, dtype)
  _, exponent = jnp.frexp(largest)
  scaled = [jnp.ldexp(x, -exponent) for x in leaves]
  return scaled, jnp.ldexp(jnp.ones([], dtype), exponent), largest


def _scaled_perturbation(
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
  dtypes = [_compute_dtype(a.dtype, b.dtype) for a, b in zip(g, w, strict=True)]
  wide = _compute_dtype(*dtypes)
  x = [a.astype(d) for a, d in zip(g, dtypes, strict=True)]
  c_s = jnp.ones([], wide)
  if eta is not None:
    s = [jnp.abs(b.astype(d)) + jnp.asarray(eta, d)
         for b, d in zip(w, dtypes, strict=True)]
    s_scaled, c_s, _ = _scaled_down(s, wide)
    x = [si * xi for si, xi in zip(s_scaled, x, strict=True)]
  unit, c_x, largest = _scaled_down(x, wide)
  # ||s g|| = c_s * c_x * scaled_norm, where 0.5 <= scaled_norm <= sqrt(n)
  # unless g is zero.
  scaled_norm = jnp.sqrt(sum((jnp.sum(jnp.square(u)).astype(wide)
                              for u in unit), jnp.zeros([], wide)))
  scale = jnp.asarray(rho, wide) / (scaled_norm + eps / (c_s * c_x))
  e = [scale.astype(d) * u for u, d in zip(unit, dtypes, strict=True)]
  if eta is not None:
    e = [si * ei for si, ei in zip(s, e, strict=True)]
  return e, jnp.isfinite(largest)


def _perturbation(
    g: list[jax.Array], w: list[jax.Array], rho: jax.Array, eps: float,
    eta: float | None,
) -> tuple[list[jax.Array], jax.Array]:
  """:func:`_scaled_perturbation`, computed directly on CPU when that is exact.

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
  dtypes = [_compute_dtype(a.dtype, b.dtype) for a, b in zip(g, w, strict=True)]
  wide = _compute_dtype(*dtypes)
  x = [a.astype(d) for a, d in zip(g, dtypes, strict=True)]
  s = None
  if eta is not None:
    s = [jnp.abs(b.astype(d)) + jnp.asarray(eta, d)
         for b, d in zip(w, dtypes, strict=True)]
    x = [si * xi for si, xi in zip(s, x, strict=True)]
  squares = sum((jnp.sum(jnp.square(u)).astype(wide) for u in x),
                jnp.zeros([], wide))
  # Squares below the smallest normal number may be flushed to zero; above
  # this floor, all of them together are below the rounding error of the sum.
  size = max(sum(u.size for u in x), 1)
  floor = float(jnp.finfo(wide).tiny) * size / float(jnp.finfo(wide).eps)

  def direct(_):
    scale = jnp.asarray(rho, wide) / (jnp.sqrt(squares) + eps)
    e = [scale.astype(d) * u for u, d in zip(x, dtypes, strict=True)]
    if s is not None:
      e = [si * ei for si, ei in zip(s, e, strict=True)]
    return e, jnp.isfinite(squares)  # True here, typed like the data

  scaled = lambda _=None: _scaled_perturbation(g, w, rho, eps, eta)
  return jax.lax.platform_dependent(
      cpu=lambda: jax.lax.cond(
          jnp.isfinite(squares) & (squares >= floor), direct, scaled, None),
      default=scaled)


def _radius(rho_t: Any) -> jax.Array:
  """rho(t), with a negative or NaN value (from a schedule) taken as 0."""
  rho_t = jnp.asarray(rho_t)
  return jnp.where(rho_t > 0, rho_t, jnp.zeros_like(rho_t))


def _mix(g: optax.Updates, g_sam: optax.Updates, lam: jax.Array
         ) -> optax.Updates:
  """G-RST's ``(1 - lam) g + lam g_sam``, per leaf in its dtype and at least
  float32, written ``g + lam (g_sam - g)`` so that ``g_sam == g`` gives ``g``
  exactly."""

  def leaf(a, b):
    d = _compute_dtype(a.dtype, b.dtype)
    a_d = a.astype(d)
    return (a_d + jnp.asarray(lam, d) * (b.astype(d) - a_d)).astype(a.dtype)

  return jax.tree.map(leaf, g, g_sam)


def _perturbed_leaves(mask: Any, params: optax.Params) -> list[bool]:
  """Which leaves of ``params`` rst's ``mask`` selects, in leaf order."""
  n = len(jax.tree.leaves(params))
  if mask is None:
    return [True] * n
  tree = mask(params) if callable(mask) else mask
  allowed = ('a pytree of Python bools with the structure of `params` (or a '
             'prefix of it), or a callable params -> such a pytree')
  try:
    full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), tree,
                        params)
  except (ValueError, TypeError):
    raise ValueError(
        f'rst: `mask` must be {allowed}; got {tree!r} for params of structure '
        f'{jax.tree.structure(params)}.') from None
  leaves = jax.tree.leaves(full)
  if len(leaves) != n or not all(
      isinstance(m, (bool, np.bool_)) for m in leaves):
    raise TypeError(f'rst: `mask` must be {allowed}; got {tree!r}.')
  return [bool(m) for m in leaves]


def _check_update_args(updates, params, grad_fn, take_sam, args) -> None:
  """The checks of ``update``'s arguments, all made when tracing."""
  if args:
    raise TypeError(
        'rst: `update` takes `grad_fn` (and `take_sam`) by keyword only, '
        'e.g. tx.update(grads, state, params, grad_fn=jax.grad(loss_fn)); '
        f'got {len(args)} extra positional argument(s).')
  if params is None:
    raise ValueError('rst: `update` needs `params` (the current parameters).')
  if grad_fn is None:
    raise ValueError(
        'rst: `update` needs `grad_fn`, the minibatch gradient as a function '
        'of the parameters, e.g. tx.update(grads, state, params, '
        'grad_fn=jax.grad(lambda p: loss(p, batch))).'
    )
  if not callable(grad_fn):
    raise TypeError(f'rst: `grad_fn` must be callable; got {grad_fn!r}.')
  _checks.grad_fn_arity('rst', grad_fn)
  _checks.not_masked('rst', 'params', params, _SUPPORTED_SUBSET)
  _checks.not_masked('rst', 'updates', updates, _SUPPORTED_SUBSET)
  _checks.same_structure('rst', 'updates', updates, 'params', params)
  _checks.real_floating('rst', 'params', params)
  _checks.real_floating('rst', 'updates', updates)
  if take_sam is not None:
    _checks.take_sam('rst', take_sam)


def rst(
    base_tx: optax.GradientTransformation,
    schedule: _types.ScalarOrSchedule = 0.5,
    rho: _types.ScalarOrSchedule = 0.05,
    lam: _types.ScalarOrSchedule = 1.0,
    *,
    seed: _types.Seed = 0,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    axis_name: str | None = None,
    perturbation: str = 'global',
) -> optax.GradientTransformationExtraArgs:
  r"""Randomized Sharpness-Aware Training (RST, and G-RST with ``lam``).

  At step :math:`t`, with :math:`g = \nabla L_B(w)` the incoming updates, draw
  :math:`X_t \sim \mathrm{Bernoulli}(p(t))` and feed the base optimizer

  .. math::

    d_t = \begin{cases}
      (1 - \lambda_t)\, g + \lambda_t\, \nabla L_B(w + \epsilon_t)
        & X_t = 1 \text{ (SAM branch)}\\
      g & X_t = 0 \text{ (base branch)}
    \end{cases}
    \qquad
    \epsilon_t = \rho_t \frac{g}{\|g\|_2 + \varepsilon}.

  With ``adaptive=True`` (ASAM) the perturbation is
  :math:`\epsilon_t = \rho_t\, s^2 g / (\| s g \|_2 + \varepsilon)` with
  :math:`s = |w| + \eta`. ``lam = 1`` is plain RST; ``schedule = 1, lam = 1``
  is SAM. Conditioned on :math:`w`, the expected direction is
  :math:`(1 - p\lambda)\, g + p\lambda\, \nabla L_B(w + \epsilon)`: a
  gradient-norm penalty of weight :math:`p\lambda` times SAM's, which
  :func:`rst_optax.schedules.matching_lam` sets to any target.

  The coin is ``jax.random.bernoulli(jax.random.fold_in(key, t), p(t))``, a pure
  function of ``(seed, t)`` shared with :func:`rst_optax.decisions`. The branch
  is picked with ``jax.lax.cond``, so a jitted train step compiles once and runs
  the second gradient only on SAM steps. When ``schedule`` is the Python number
  ``0`` or ``1`` the decision is known when tracing and no ``cond`` is traced.

  ``update`` takes, besides the usual arguments:

  - ``grad_fn`` (required, by keyword): ``grad_fn(params) -> grads``, the
    minibatch gradient at other parameters, closing over the same batch. Its
    output is checked when tracing: the tree structure and shapes of
    ``params``, real floating dtypes. With BatchNorm, let it discard the
    statistics of the perturbed pass and keep those of your first.
  - ``take_sam`` (optional): a Python bool fixes the branch when tracing (no
    ``cond``; for host-side dispatch with :func:`rst_optax.decisions`), a
    boolean scalar array overrides the coin inside the ``cond``. Either way the
    caller is responsible for it matching the coin if the run must be
    reproducible.
  - any other keyword arguments are forwarded to ``base_tx.update``.

  Precision: each leaf is perturbed in its own dtype and at least float32
  (bfloat16 and float16 in float32, float64 under ``jax_enable_x64`` in
  float64, with ``rho`` and ``lam`` in float64 too), then rounded back. The
  gradient norm is scaled by its largest entry, so any finite gradient takes
  its SAM step, however large its entries. ``rho = 0`` gives exactly the base
  direction, at any ``lam``. Complex (and integer) parameters are refused.

  Numerical faults lose nothing silently. If :math:`g` has a NaN or Inf entry,
  the SAM branch feeds :math:`g` itself to the base optimizer (its perturbation
  would be NaN everywhere), so the updates are non-finite exactly where the
  base optimizer's alone would be; ``grad_fn`` still runs on that step and
  ``sam_steps`` still counts it. A NaN or Inf in ``grad_fn``'s output is never
  masked: it reaches the updates. Wrap the *base* optimizer,
  ``rst(optax.apply_if_finite(base_tx, n), ...)``, to skip such a step: the
  base state and parameters are left as they were while ``count`` and
  ``sam_steps`` advance, so the coin stays aligned with the step index.
  Schedules can return values that cannot be checked at construction: a NaN
  p(t) takes no SAM step, and a negative or NaN rho(t) is taken as 0 (the SAM
  step evaluates ``grad_fn`` at :math:`w` itself). A NaN lam(t) reaches the
  updates.

  .. warning::
    Transformations chained *before* ``rst``, as in
    ``optax.chain(optax.clip_by_global_norm(1.0), rst(base_tx))``, are
    bypassed on SAM steps: the direction then comes from ``grad_fn``, which
    never goes through them. Put gradient clipping, weight decay and every
    other gradient transformation *inside*:
    ``rst(optax.chain(optax.clip_by_global_norm(1.0), base_tx))``.
    ``rst`` cannot detect a transformation before it, since it only sees the
    transformed gradient. Inside ``optax.masked`` or ``optax.multi_transform``
    it raises; use ``rst(optax.multi_transform(...))`` and ``mask``.

  .. warning::
    Under ``jax.vmap`` with a batched state (one coin per member, e.g. an
    ensemble over seeds), ``jax.lax.cond`` becomes a select: both branches
    run on every step, so every step pays for ``grad_fn``; the results are
    unchanged. With the state shared over the mapped axis the ``cond`` stays.

  .. warning::
    ``optax.MultiSteps(rst(...), k)`` is not the full-batch RST step: one coin
    is drawn per outer step and the perturbation follows the accumulated
    gradient, but the SAM gradient is ``grad_fn`` of the last micro-step only,
    and ``grad_fn`` runs on all k micro-steps of a SAM step. Accumulate both
    gradients inside the train step instead (``optax.microbatch`` for the
    first gradient and for ``grad_fn``).

  Args:
    base_tx: the base optimizer, any ``optax.GradientTransformation``; it
      receives :math:`d_t` and the extra keyword arguments.
    schedule: p(t), the probability of a SAM step: a float in [0, 1] or an
      ``optax.Schedule`` returning a scalar; its values are clipped to [0, 1].
    rho: perturbation radius :math:`\rho`, ``>= 0``; a float or a schedule.
    lam: G-RST mixing weight :math:`\lambda`; a float or a schedule.
    seed: an int in [-2**63, 2**63 - 1] or a JAX PRNG key (a typed key of any
      implementation, or raw ``uint32`` key data of the default one).
    adaptive: use the ASAM perturbation (element-wise scaled by
      :math:`|w| + \eta`).
    eta: ASAM's :math:`\eta \ge 0`, so that parameters at zero are perturbed
      too (Kwon et al. use 0.01); only used with ``adaptive=True``.
    eps: :math:`\varepsilon` in the normalization, at least float32's
      smallest normal number (about 1.2e-38); keeps a zero gradient finite.
    mask: which parameters are perturbed: a pytree of Python bools with the
      structure of the parameters (or a prefix of it), or a callable that
      returns one from the parameters, as in ``optax.add_decayed_weights``.
      ``True`` leaves are perturbed, and the norm is taken over them alone;
      ``False`` leaves stay where they are. ``grad_fn`` and the direction
      still cover every parameter. ``None`` (default) perturbs all.
    axis_name: when the train step runs under ``shard_map``/``pmap`` with
      per-device gradients, the mapped axis over which the SAM gradient is
      averaged with ``jax.lax.pmean`` (average your first gradient the same
      way before calling ``update``). ``grad_fn`` then returns this device's
      gradient on its shard of the batch: it is called on parameters marked
      varying over the axis, so that ``jax.grad`` under ``shard_map`` with
      ``check_vma=True`` does not sum it over devices (take your first
      gradient at ``jax.lax.pcast(params, axis_name, to='varying')`` for the
      same reason). ``None`` (default) for ``jax.jit`` with shardings, where
      gradients are already global.
    perturbation: with ``axis_name``, where the SAM perturbation comes from.
      ``'global'`` (default): from ``updates``, which must already be the
      gradient averaged over ``axis_name``, so every device perturbs alike and
      the step equals a single-device step on the whole batch. ``'local'``
      (m-sharpness, as in Foret et al.): ``updates`` is each device's own
      gradient; each device perturbs with it and evaluates ``grad_fn`` on its
      shard, and both gradients are averaged over ``axis_name`` by the
      transformation (the base branch and the base optimizer see the average).
      ``'local'`` needs ``axis_name``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`RSTState`.

  Raises:
    TypeError: when built, if ``base_tx`` is not an Optax transformation, a
      number argument is not a real number (bools and strings are not; a
      callable is allowed for ``schedule``, ``rho`` and ``lam``), ``seed`` is
      neither an int nor a PRNG key, ``adaptive`` is not a bool or
      ``axis_name`` not a str. When ``update`` is traced, if ``grad_fn`` is
      not a callable of one positional argument or is passed positionally,
      ``take_sam`` is not a bool, a schedule returns a non-scalar, or a leaf
      of ``params``, ``updates`` or ``grad_fn``'s output is complex or an
      integer.
    ValueError: when built, if a number is out of range or not finite
      (``schedule`` outside [0, 1], a negative ``rho`` or ``eta``, ``eps``
      below float32's smallest normal number, an int ``seed`` outside
      int64), or ``perturbation`` is not ``'global'`` or ``'local'`` (or
      ``'local'`` without ``axis_name``). In ``init``, if ``mask`` does not
      fit the parameters (a ``mask`` that is not bools: TypeError). When
      ``update`` is traced, if ``params`` or ``grad_fn`` is missing,
      ``updates`` or ``grad_fn``'s output do not match ``params`` in
      structure and shapes, or ``rst`` was put inside ``optax.masked`` or
      ``optax.multi_transform``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, rst_optax
    >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> tx = rst_optax.rst(optax.sgd(0.1), schedule=0.5, rho=0.05, seed=0)
    >>> w = jnp.zeros(3)
    >>> state = tx.init(w)
    >>> for _ in range(3):
    ...   g = jax.grad(loss)(w)
    ...   u, state = tx.update(g, state, w, grad_fn=jax.grad(loss))
    ...   w = optax.apply_updates(w, u)
    >>> int(state.count), int(state.count + state.sam_steps) >= 3
    (3, True)

  References:
    Zhao, Zhang & Hu, `Randomized Sharpness-Aware Training for Boosting
    Computational Efficiency in Deep Learning
    <https://arxiv.org/abs/2203.09962>`_, 2022.

    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.

    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, 2021.
  """
  if not (callable(getattr(base_tx, 'init', None))
          and callable(getattr(base_tx, 'update', None))):
    raise TypeError(
        'rst: `base_tx` must be an optax.GradientTransformation (with callable '
        f'`init` and `update`); got {base_tx!r}.'
    )
  _checks.number('rst', 'schedule', schedule, low=0.0, high=1.0,
                 allow_schedule=True)
  _checks.number('rst', 'rho', rho, low=0.0, allow_schedule=True)
  _checks.number('rst', 'lam', lam, allow_schedule=True)
  _checks.number('rst', 'eta', eta, low=0.0)
  _checks.number('rst', 'eps', eps, low=_EPS_MIN)
  _checks.seed('rst', seed)
  if not isinstance(adaptive, (bool, np.bool_)):
    raise TypeError(f'rst: `adaptive` must be a bool; got {adaptive!r}.')
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(
        f'rst: `axis_name` must be a str or None; got {axis_name!r}.')
  if perturbation not in ('global', 'local'):
    raise ValueError(
        f"rst: `perturbation` must be 'global' or 'local'; got "
        f'{perturbation!r}.')
  if perturbation == 'local' and axis_name is None:
    raise ValueError(
        "rst: `perturbation='local'` (per-device, m-sharpness) needs "
        '`axis_name`, the mapped axis of shard_map/pmap over which gradients '
        'are averaged.')
  local = perturbation == 'local'

  base_tx = optax.with_extra_args_support(base_tx)
  key_impl = (jax.random.key_impl(seed) if _coin.is_typed_key(seed) else None)
  p_schedule = _checks.checked_schedule('rst', 'schedule', schedule)
  rho_fn = _coin.as_schedule(_checks.checked_schedule('rst', 'rho', rho))
  lam_fn = _coin.as_schedule(_checks.checked_schedule('rst', 'lam', lam))
  plain_rst = _coin.is_python_constant(lam, 1.0)
  if _coin.is_python_constant(schedule, 0.0):
    fixed_branch: bool | None = False
  elif _coin.is_python_constant(schedule, 1.0):
    fixed_branch = True
  else:
    fixed_branch = None

  def init_fn(params: optax.Params) -> RSTState:
    _checks.not_masked('rst', 'params', params, _SUPPORTED_SUBSET)
    _perturbed_leaves(mask, params)  # checks mask against params early
    return RSTState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(_coin.as_key(seed)),
        sam_steps=jnp.zeros([], jnp.int32),
        base_state=base_tx.init(params),
    )

  def perturb(params, g, count):
    """``params`` plus the perturbation along ``g`` on the selected leaves;
    and whether the perturbation is finite."""
    w_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(g)
    selected = _perturbed_leaves(mask, params)
    pick = lambda leaves: [x for x, m in zip(leaves, selected, strict=True)
                           if m]
    e, finite = _perturbation(pick(g_leaves), pick(w_leaves),
                              _radius(rho_fn(count)), eps,
                              eta if adaptive else None)
    e = iter(e)
    perturbed = []
    for w, m in zip(w_leaves, selected, strict=True):
      if m:
        e_w = next(e)
        w = (w.astype(e_w.dtype) + e_w).astype(w.dtype)
      perturbed.append(w)
    return treedef.unflatten(perturbed), finite, all(selected)

  def sam_direction(g, g_local, params, grad_fn, count):
    """The SAM-branch direction (G-RST mix), perturbing along ``g_local``."""
    perturbed, finite, all_selected = perturb(params, g_local, count)
    if axis_name is not None:
      perturbed = _mark_varying(perturbed, axis_name)
    g_sam = grad_fn(perturbed)
    _checks.grad_fn_output('rst', g_sam, params)
    if axis_name is not None:
      g_sam = jax.lax.pmean(g_sam, axis_name)
    if plain_rst:
      direction = optax.tree.cast_like(g_sam, g)
    else:
      direction = _mix(g, g_sam, lam_fn(count))
    # A NaN or Inf in the gradient makes the perturbation meaningless: hand
    # the base optimizer g itself instead, non-finite exactly where it is.
    # (With local perturbations, check the averaged g, the same on every
    # device, as the base branch returns it; with a mask, check all of g.)
    if local:
      finite = _all_finite(jax.tree.leaves(g))
    elif not all_selected:
      finite &= _all_finite(jax.tree.leaves(g))
    return optax.tree.where(finite, direction, g)

  def update_fn(
      updates: optax.Updates,
      state: RSTState,
      params: optax.Params | None = None,
      *args: Any,
      grad_fn: _types.GradFn | None = None,
      take_sam: bool | jax.Array | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, RSTState]:
    _check_update_args(updates, params, grad_fn, take_sam, args)
    count = state.count
    local_updates = updates
    if local:
      updates = jax.lax.pmean(updates, axis_name)
    if take_sam is None:
      take_sam = fixed_branch
    if take_sam is None:
      key = jax.random.wrap_key_data(state.key, impl=key_impl)
      take_sam = _coin.coin(key, count, p_schedule)
    if isinstance(take_sam, (bool, np.bool_)):
      direction = (
          sam_direction(updates, local_updates, params, grad_fn, count)
          if take_sam else updates)
      sam_steps = (optax.safe_increment(state.sam_steps) if take_sam
                   else state.sam_steps)
    else:
      take_sam = jnp.asarray(take_sam, bool)
      direction = jax.lax.cond(
          take_sam,
          lambda g, g_local: sam_direction(g, g_local, params, grad_fn, count),
          lambda g, g_local: g,
          updates, local_updates,
      )
      sam_steps = jnp.where(take_sam, optax.safe_increment(state.sam_steps),
                            state.sam_steps)
    new_updates, base_state = base_tx.update(
        direction, state.base_state, params, **extra_args)
    return new_updates, RSTState(
        count=optax.safe_increment(count),
        key=state.key,
        sam_steps=sam_steps,
        base_state=base_state,
    )

  _coin.attach_config(update_fn, schedule, seed)  # read by HostDispatch
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
