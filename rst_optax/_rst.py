"""Randomized Sharpness-Aware Training (RST) and its generalization G-RST.

Each step flips a biased coin: with probability p(t) the gradient goes through
a sharpness-aware (SAM) branch that evaluates the gradient a second time at
perturbed parameters; otherwise it goes to the base optimizer as it is.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rst_optax import _checks, _coin, _norms, _reuse, _types
from rst_optax._types import MAX_STEP

# eps must stay positive once rounded to float32.
_EPS_MIN = float(np.finfo(np.float32).tiny)
# eps when none is given (None, so that optax.inject_hyperparams does not
# cast it to 16 bits, where float16 would round it to 0).
_EPS_DEFAULT = 1e-12

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


class RSTReuseState(NamedTuple):
  r"""State of :func:`rst` with ``reuse`` (LookSAM): :class:`RSTState`'s
  fields and the direction that base steps reuse.

  Attributes:
    count: as in :class:`RSTState`.
    key: as in :class:`RSTState`.
    sam_steps: as in :class:`RSTState`.
    base_state: as in :class:`RSTState`.
    reuse_direction: :math:`g_v / \|g_v\|`, the unit vector of the part of
      the last SAM step's direction orthogonal to its gradient, with the
      structure of the parameters: each perturbed leaf in its parameter's
      dtype, ``optax.MaskedNode()`` where ``mask`` leaves the parameter out.
      Zero before the first SAM step, and after a SAM step whose
      :math:`g_v` was zero, at the level of rounding
      (:math:`\|g_v\| \le 8 \epsilon \|d\|`) or not finite, or whose
      :math:`\rho_t` was not positive; base steps then reuse nothing.
  """

  count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count
  key: jax.Array
  sam_steps: jax.Array
  base_state: optax.OptState
  reuse_direction: optax.Updates


class RSTWindowState(NamedTuple):
  r"""State of :func:`rst` with ``reuse`` and ``reuse_window``:
  :class:`RSTReuseState`'s fields and the step of the last SAM step.

  Attributes:
    count: as in :class:`RSTState`.
    key: as in :class:`RSTState`.
    sam_steps: as in :class:`RSTState`.
    base_state: as in :class:`RSTState`.
    reuse_direction: as in :class:`RSTReuseState`.
    last_sam_step: int32 scalar, the step count ``t`` of the last SAM step,
      -1 before the first one (no base step reuses then). A base step at
      step ``t`` reuses only if ``0 <= last_sam_step`` and ``t -
      last_sam_step <= reuse_window``; where ``count`` has stopped at the
      int32 maximum, a SAM step stores that maximum.
  """

  count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count
  key: jax.Array
  sam_steps: jax.Array
  base_state: optax.OptState
  reuse_direction: optax.Updates
  last_sam_step: jax.Array


# The states of rst: without reuse, with reuse, with reuse and a window.
STATE_TYPES = (RSTState, RSTReuseState, RSTWindowState)
_REUSE_STATE_TYPES = (RSTReuseState, RSTWindowState)


def _reuse_state(fields: dict[str, Any], reuse_direction: optax.Updates,
                 last_sam_step: jax.Array | None
                 ) -> RSTReuseState | RSTWindowState:
  """The state with ``reuse``: an :class:`RSTWindowState` with a window
  (``last_sam_step`` given), an :class:`RSTReuseState` without one."""
  if last_sam_step is None:
    return RSTReuseState(**fields, reuse_direction=reuse_direction)
  return RSTWindowState(**fields, reuse_direction=reuse_direction,
                        last_sam_step=last_sam_step)


def _mark_varying(tree: optax.Params, axis_name: str) -> optax.Params:
  """Marks ``tree`` as varying over ``axis_name`` where it is not already.

  Under ``jax.shard_map`` with ``check_vma=True``, ``jax.grad`` at parameters
  that are the same on every device returns their gradient already summed
  over the axis; at varying parameters it returns this device's gradient.
  Under ``pmap`` or ``check_vma=False`` this is a no-op, and so it is where
  ``axis_name`` is not a manual mesh axis (``jax.vmap(..., axis_name=...)``):
  nothing tracks variance there, and ``pcast`` would fail inside a ``cond``.
  """
  if axis_name not in jax.sharding.get_abstract_mesh().manual_axes:
    return tree

  def mark(x):
    try:
      return jax.lax.pcast(x, axis_name, to='varying')
    except ValueError:  # already varying over axis_name
      return x

  return jax.tree.map(mark, tree)


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
    d = _norms.compute_dtype(a.dtype, b.dtype)
    a_d = a.astype(d)
    return (a_d + jnp.asarray(lam, d) * (b.astype(d) - a_d)).astype(a.dtype)

  return jax.tree.map(leaf, g, g_sam)


_STATIC_MASK_HINT = (
    ' Under optax.inject_hyperparams a callable `mask` is taken for a '
    'schedule and called with the step count: pass '
    "static_args=('mask',).")


def _perturbed_leaves(mask: Any, params: optax.Params,
                      can_take_sam: bool = True) -> list[bool]:
  """Which leaves of ``params`` rst's ``mask`` selects, in leaf order.

  Refuses a mask that does not fit ``params``, a single bool for several
  leaves, and (when ``can_take_sam``) a mask that selects no leaf: each
  would silently turn every SAM step into a plain step that still pays for
  ``grad_fn``.
  """
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
        f'{jax.tree.structure(params)}.{_STATIC_MASK_HINT}') from None
  leaves = jax.tree.leaves(full)
  if len(leaves) != n or not all(
      isinstance(m, (bool, np.bool_)) for m in leaves):
    raise TypeError(
        f'rst: `mask` must be {allowed}; got {tree!r}.{_STATIC_MASK_HINT}')
  if n > 1 and jax.tree.structure(tree).num_nodes == 1:
    raise ValueError(
        f'rst: `mask` is the single value {tree!r} for params of {n} leaves; '
        f'it must be {allowed} (mask=None perturbs every parameter).'
        f'{_STATIC_MASK_HINT}')
  if can_take_sam and n and not any(leaves):
    raise ValueError(
        'rst: `mask` selects no parameter, so no SAM step would perturb '
        'anything (each would still pay for grad_fn); select at least one '
        f'leaf, or use schedule=0 for the base optimizer alone.'
        f'{_STATIC_MASK_HINT}')
  return [bool(m) for m in leaves]


def _check_base_tx_state(base_state: optax.OptState) -> None:
  """Refuses base optimizers that cannot work under rst (by their state)."""
  private = tuple(t for t in (getattr(
      optax.contrib, 'DifferentiallyPrivateAggregateState', None),) if t)
  found = jax.tree.leaves(base_state,
                          is_leaf=lambda x: isinstance(x, private))
  if private and any(isinstance(x, private) for x in found):
    raise TypeError(
        'rst: `base_tx` holds a differentially private aggregation '
        '(optax.contrib.dpsgd or optax.contrib.differentially_private_'
        'aggregate), which takes per-example gradients; rst passes it one '
        'minibatch gradient (or its SAM direction), so the two do not work '
        'together.')


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


def _check_reuse_window(reuse_window: Any, reusing: bool) -> int | None:
  """Checks ``reuse_window``; returns it as an int at most the last step."""
  if reuse_window is None:
    return None
  allowed = ('None (no bound) or a Python int >= 1, the most steps after a '
             'SAM step at which a base step still reuses its direction')
  if isinstance(reuse_window, (bool, np.bool_)) or not isinstance(
      reuse_window, (int, np.integer)):
    hint = (" Under optax.inject_hyperparams pass static_args=("
            "'reuse_window',)." if isinstance(reuse_window, jax.Array)
            else '')
    raise TypeError(
        f'rst: `reuse_window` must be {allowed}; got {reuse_window!r}.{hint}')
  if reuse_window < 1:
    raise ValueError(
        f'rst: `reuse_window` must be {allowed}; got {reuse_window}.')
  if not reusing:
    raise ValueError(
        'rst: `reuse_window` bounds the reuse of `reuse`, which is None or '
        f'0 here, so reuse_window={reuse_window} would do nothing: pass '
        '`reuse` too, or leave `reuse_window` at None.')
  # The step count stops at MAX_STEP: a larger window bounds nothing more.
  return min(int(reuse_window), MAX_STEP)


def _check_state(state: Any, reusing: bool, windowed: bool) -> None:
  """Refuses a state of another kind (with or without ``reuse``, with or
  without ``reuse_window``), by name."""
  if not isinstance(state, STATE_TYPES):
    return
  name = type(state).__name__
  if isinstance(state, RSTState) == reusing:
    made = 'without' if isinstance(state, RSTState) else 'with'
    raise TypeError(
        f'rst: `state` is a {name}, made by an rst {made} `reuse`, but this '
        f'rst {"has" if reusing else "has no"} `reuse`: initialize the state '
        "with this transformation's init.")
  if isinstance(state, RSTWindowState) != windowed:
    if windowed:
      made, has, convert = 'without', 'has', (
          'to bound the reuse of a state made without it, pass '
          'rst_optax.RSTWindowState(*state, last_sam_step=jnp.int32(-1)): '
          'no reuse until its next SAM step')
    else:
      made, has, convert = 'with', 'has no', (
          'to drop the bound, pass rst_optax.RSTReuseState(*state[:5])')
    raise TypeError(
        f'rst: `state` was made by an rst {made} `reuse_window` (it is an '
        f'{name}), but this rst {has} `reuse_window`: initialize the state '
        f"with this transformation's init (or, {convert}).")


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _check_reuse_direction(buffer: Any, params: optax.Params,
                           selected: list[bool]) -> None:
  """Refuses a reuse buffer that does not fit ``params`` and ``mask``.

  The buffer must have the layout :func:`rst`'s ``init`` gives it: the tree
  structure of ``params``, ``optax.MaskedNode()`` exactly where ``mask``
  leaves a parameter out, and elsewhere the parameter's shape and dtype.
  Only structures, shapes and dtypes are read: no cost per step.
  """
  what = 'rst: `state.reuse_direction` (the reuse buffer)'
  fix = (' This happens when a state (a checkpoint) is restored after the '
         'model, its dtypes or `mask` changed: make the state with this '
         "transformation's init, or restore into a target made by it.")
  p_items = jax.tree_util.tree_leaves_with_path(params)
  b_items = jax.tree_util.tree_leaves_with_path(buffer,
                                                is_leaf=_is_masked_node)
  p_paths = [path for path, _ in p_items]
  b_paths = [path for path, _ in b_items]
  if (jax.tree.structure(buffer, is_leaf=_is_masked_node)
      != jax.tree.structure(params)):
    keys = lambda paths: ', '.join(
        jax.tree_util.keystr(p) for p in paths) or 'none'
    missing = [p for p in p_paths if p not in b_paths]
    extra = [p for p in b_paths if p not in p_paths]
    hint = ('; if `mask` changed: a state made with a `mask` holds no array '
            'for the parameters it left out' if missing and not extra else '')
    detail = (f'missing leaves: {keys(missing)}; leaves not in `params`: '
              f'{keys(extra)}{hint}' if missing or extra else
              f'{jax.tree.structure(buffer, is_leaf=_is_masked_node)} for '
              f'{jax.tree.structure(params)}')
    raise ValueError(
        f'{what} does not have the tree structure of `params` ({detail}).'
        f'{fix}')
  for (path, b), (_, w), m in zip(b_items, p_items, selected, strict=True):
    where = f'leaf {_checks._where(path)}'
    if m and _is_masked_node(b):
      raise ValueError(
          f'{what}: {where} is optax.MaskedNode(), but `mask` selects that '
          'parameter: the state was made with a different `mask`.' + fix)
    if not m and not _is_masked_node(b):
      raise ValueError(
          f'{what}: {where} holds an array, but `mask` leaves that parameter '
          'out (its buffer leaf is optax.MaskedNode()): the state was made '
          'with a different `mask`.' + fix)
    if not m:
      continue
    if np.shape(b) != np.shape(w):
      raise ValueError(
          f'{what}: {where} has shape {np.shape(b)} but the parameter has '
          f'shape {np.shape(w)}.' + fix)
    if jnp.result_type(b) != jnp.result_type(w):
      raise ValueError(
          f'{what}: {where} has dtype {jnp.result_type(b)} but the parameter '
          f'has dtype {jnp.result_type(w)}.' + fix)


def rst(
    base_tx: optax.GradientTransformation,
    schedule: _types.ScalarOrSchedule = 0.5,
    rho: _types.ScalarOrSchedule = 0.05,
    lam: _types.ScalarOrSchedule = 1.0,
    *,
    seed: _types.Seed = 0,
    reuse: _types.ScalarOrSchedule | None = None,
    reuse_window: int | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float | None = None,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    axis_name: str | None = None,
    perturbation: str = 'global',
) -> optax.GradientTransformationExtraArgs:
  r"""Randomized Sharpness-Aware Training (RST, and G-RST with ``lam``).

  Each step flips a coin: with probability p(t) it is a SAM step, which
  evaluates the gradient a second time at perturbed parameters; otherwise the
  gradient goes to the base optimizer as it is. At step :math:`t`, with
  :math:`g = \nabla L_B(w)` the incoming updates and
  :math:`X_t \sim \mathrm{Bernoulli}(p(t))`, the base optimizer receives

  .. math::

    d_t = \begin{cases}
      (1 - \lambda_t)\, g + \lambda_t\, \nabla L_B(w + \epsilon_t)
        & X_t = 1 \text{ (SAM branch)}\\
      g + \alpha_t \|g\|_2\, u & X_t = 0 \text{ (base branch)}
    \end{cases}
    \qquad
    \epsilon_t = \rho_t \frac{g}{\|g\|_2 + \varepsilon},

  with :math:`u` the unit vector of the part of the last SAM direction
  orthogonal to its :math:`g` (LookSAM; :math:`\alpha_t` is ``reuse``, 0 by
  default, and 0 more than ``reuse_window`` steps after the last SAM
  step). ``schedule=1, lam=1`` is SAM. Put clipping and weight decay
  *inside* ``rst``, not chained before it (:doc:`composing`).

  Args:
    base_tx: the base optimizer; it receives :math:`d_t`.
    schedule: p(t), the probability of a SAM step: a float in [0, 1] or a
      schedule (its values are clipped to [0, 1]).
    rho: perturbation radius :math:`\rho \ge 0`; a float or a schedule.
    lam: G-RST mixing weight :math:`\lambda`; a float or a schedule.
    seed: an int in [-2**63, 2**63 - 1] or a JAX PRNG key (typed, of any
      implementation, or raw ``uint32`` key data of the default one).
    reuse: LookSAM's :math:`\alpha \ge 0`, how much of the last SAM step's
      direction each base step reuses; a float or a schedule. ``None``
      (default) or a number equal to 0: no reuse, state :class:`RSTState`;
      otherwise :class:`RSTReuseState`, one parameter-sized buffer more.
      LookSAM is ``schedule=schedules.periodic(k)`` with ``reuse``.
    reuse_window: with ``reuse``, a Python int :math:`k \ge 1`: a base step
      reuses only if the last SAM step was at most :math:`k` steps before
      (``periodic(m)`` with :math:`k \ge m - 1` is LookSAM exactly).
      The state is then an :class:`RSTWindowState`. ``None`` (default): no
      bound.
    adaptive: use the ASAM perturbation, scaled by :math:`|w| + \eta`.
    eta: ASAM's :math:`\eta \ge 0`; only used with ``adaptive=True``.
    eps: :math:`\varepsilon`, at least float32's smallest normal number;
      ``None`` (default) is 1e-12.
    mask: which parameters are perturbed (the norm is over them alone): a
      pytree of bools or a callable returning one; ``None``: all.
    axis_name: under ``shard_map``/``pmap`` with per-device gradients, the
      axis over which the SAM gradient is averaged; ``None`` (default) for
      ``jax.jit`` with shardings.
    perturbation: with ``axis_name``: ``'global'`` (default; the step of one
      device on the whole batch) or ``'local'`` (m-sharpness).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`RSTState`
    (:class:`RSTReuseState` with ``reuse``, :class:`RSTWindowState` with
    ``reuse_window`` too). Its ``update`` also takes
    ``grad_fn`` (required, by keyword: ``params -> grads`` on the same batch)
    and ``take_sam`` (optional: a bool or boolean scalar that fixes the
    branch, for host dispatch); other keyword arguments go to ``base_tx``.
    The coin is a pure function of ``(seed, t)`` (:func:`rst_optax.decisions`)
    and the branch is picked with ``jax.lax.cond``: one compiled step, the
    second gradient on SAM steps only. More: :doc:`method`, :doc:`numerics`
    (precision, NaN, ``vmap``, ``MultiSteps``), :doc:`dispatch`,
    :doc:`distributed`.

  Raises:
    TypeError, ValueError: for a bad argument, when built, in ``init`` or
      when ``update`` is traced, naming ``rst`` and the argument; the list
      is in :ref:`rst-errors`.

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
    - Zhao, Zhang & Hu, `Randomized Sharpness-Aware Training for Boosting
      Computational Efficiency in Deep Learning
      <https://arxiv.org/abs/2203.09962>`_, 2022.
    - Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.
    - Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, 2021.
    - Liu et al., `Towards Efficient and Scalable Sharpness-Aware
      Minimization <https://arxiv.org/abs/2203.02714>`_, CVPR 2022 (LookSAM).
  """
  if not (callable(getattr(base_tx, 'init', None))
          and callable(getattr(base_tx, 'update', None))):
    raise TypeError(
        'rst: `base_tx` must be an optax.GradientTransformation (with callable '
        f'`init` and `update`); got {base_tx!r}.'
    )
  # A JAX array (what optax.inject_hyperparams passes, traced under jit) is
  # taken as a schedule's value is: clipped, or negative as 0.
  _checks.number('rst', 'schedule', schedule, low=0.0, high=1.0,
                 allow_schedule=True, arrays_as_schedules=True)
  _checks.number('rst', 'rho', rho, low=0.0,
                 high=float(np.finfo(np.float32).max), allow_schedule=True,
                 arrays_as_schedules=True)
  _checks.number('rst', 'lam', lam, allow_schedule=True)
  if reuse is not None:
    # high: a float32 value, as alpha is in float32 with float32 parameters.
    _checks.number('rst', 'reuse', reuse, low=0.0,
                   high=float(np.finfo(np.float32).max), allow_schedule=True,
                   arrays_as_schedules=True)
  _checks.number('rst', 'eta', eta, low=0.0)
  if eps is None:
    eps = _EPS_DEFAULT
  try:
    _checks.number('rst', 'eps', eps, low=_EPS_MIN)
  except ValueError as e:
    raise ValueError(
        f'{e} Under optax.inject_hyperparams with 16-bit parameters a given '
        'eps is cast to their dtype (float16 rounds 1e-12 to 0): leave eps '
        "at its default (None), or pass static_args=('eps',) or "
        'hyperparam_dtype=jnp.float32.') from None
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
  reusing = reuse is not None and not _coin.is_python_constant(reuse, 0.0)
  window = _check_reuse_window(reuse_window, reusing)
  alpha_fn = _coin.as_schedule(_checks.checked_schedule('rst', 'reuse', reuse))
  plain_rst = _coin.is_python_constant(lam, 1.0)
  can_take_sam = not _coin.is_python_constant(schedule, 0.0)
  if _coin.is_python_constant(schedule, 0.0):
    fixed_branch: bool | None = False
  elif _coin.is_python_constant(schedule, 1.0):
    fixed_branch = True
  else:
    fixed_branch = None

  def init_fn(params: optax.Params
              ) -> RSTState | RSTReuseState | RSTWindowState:
    _checks.not_masked('rst', 'params', params, _SUPPORTED_SUBSET)
    _checks.real_floating('rst', 'params', params)
    fields = dict(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(_coin.as_key(seed)),
        sam_steps=jnp.zeros([], jnp.int32),
        base_state=base_tx.init(params),
    )
    _check_base_tx_state(fields['base_state'])
    # -1: no SAM step yet, so no step is within the window.
    last_sam_step = None if window is None else jnp.full([], -1, jnp.int32)
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:
      # No parameters, or optax.tree_map_params's placeholder (a node with
      # no leaves, which stands for the parameters): nothing to check, and
      # the buffer is laid out as the parameters are.
      return (_reuse_state(fields, params, last_sam_step)
              if reusing else RSTState(**fields))
    selected = _perturbed_leaves(mask, params, can_take_sam)
    if not reusing:
      return RSTState(**fields)
    return _reuse_state(fields, treedef.unflatten([
        jnp.zeros_like(w) if m else optax.MaskedNode()
        for w, m in zip(leaves, selected, strict=True)]), last_sam_step)

  def split(params, *trees):
    """The selected leaves of each of ``trees`` (laid out like ``params``),
    and a function that puts new selected leaves back into a tree."""
    treedef = jax.tree.structure(params)
    selected = _perturbed_leaves(mask, params, can_take_sam)
    picked = [[x for x, m in zip(treedef.flatten_up_to(t), selected,
                                 strict=True) if m] for t in trees]

    def merge(tree, new):
      new = iter(new)
      return treedef.unflatten([next(new) if m else x for x, m in zip(
          treedef.flatten_up_to(tree), selected, strict=True)])

    return picked, merge

  def perturb(params, g, count):
    """``params`` plus the perturbation along ``g`` on the selected leaves;
    and whether the perturbation is finite."""
    (g_leaves, w_leaves), merge = split(params, g, params)
    w_leaves = [jnp.asarray(w) for w in w_leaves]  # a Python float too
    e, finite = _norms.perturbation(g_leaves, w_leaves,
                                    _radius(rho_fn(count)), eps,
                                    eta if adaptive else None)
    perturbed = [(w.astype(e_w.dtype) + e_w).astype(w.dtype)
                 for w, e_w in zip(w_leaves, e, strict=True)]
    return (merge(params, perturbed), finite,
            len(w_leaves) == len(jax.tree.leaves(params)))

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
      finite = _norms.all_finite(jax.tree.leaves(g))
    elif not all_selected:
      finite &= _norms.all_finite(jax.tree.leaves(g))
    return optax.tree.where(finite, direction, g)

  def branches(params, grad_fn, count, last_sam_step):
    """The SAM and base branches: ``(g, g_local, reused) -> (direction,
    reused)``, ``reused`` the reuse direction (None without ``reuse``)."""

    def sam_branch(g, g_local, reused):
      direction = sam_direction(g, g_local, params, grad_fn, count)
      if reused is None:
        return direction, None
      # The part of the direction taken (mixed, or g after a fault) that g
      # lacks; with the averaged g, so it is the same on every device.
      (d_leaves, g_leaves, old), merge = split(params, direction, g, reused)
      # With rho(t) = 0, grad_fn ran at w itself: nothing to reuse.
      return direction, merge(reused, _reuse.orthogonal_unit(
          d_leaves, g_leaves, [u.dtype for u in old],
          perturbed=_radius(rho_fn(count)) > 0))

    def base_branch(g, g_local, reused):
      del g_local
      if reused is None:
        return g, None
      (g_leaves, u_leaves), merge = split(params, g, reused)
      alpha = alpha_fn(count)
      if window is not None:
        # Outside the window alpha is 0, and with_reuse returns g itself.
        # (count - window >= -MAX_STEP: no overflow.)
        fresh = last_sam_step >= jnp.maximum(count - window, 0)
        alpha = jnp.where(fresh, alpha, jnp.zeros_like(alpha))
      return merge(g, _reuse.with_reuse(g_leaves, u_leaves, alpha)), reused

    return sam_branch, base_branch

  def update_fn(
      updates: optax.Updates,
      state: RSTState | RSTReuseState | RSTWindowState,
      params: optax.Params | None = None,
      *args: Any,
      grad_fn: _types.GradFn | None = None,
      take_sam: bool | jax.Array | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, RSTState | RSTReuseState | RSTWindowState]:
    _check_update_args(updates, params, grad_fn, take_sam, args)
    _check_state(state, reusing, window is not None)
    if axis_name is not None:
      _checks.axis_name_bound('rst', axis_name)
    if isinstance(state, _REUSE_STATE_TYPES) and jax.tree.leaves(params):
      _check_reuse_direction(state.reuse_direction, params, _perturbed_leaves(
          mask, params, can_take_sam))
    # A Python float in the gradient, as a 0-d array (as optax.sgd takes it).
    updates = jax.tree.map(jnp.asarray, updates)
    count = state.count
    local_updates = updates
    if local:
      updates = jax.lax.pmean(updates, axis_name)
    if take_sam is None:
      take_sam = fixed_branch
    if take_sam is None:
      key = jax.random.wrap_key_data(state.key, impl=key_impl)
      take_sam = _coin.coin(key, count, p_schedule)
    last_sam_step = (state.last_sam_step
                     if isinstance(state, RSTWindowState) else None)
    sam_branch, base_branch = branches(params, grad_fn, count, last_sam_step)
    reused = (state.reuse_direction
              if isinstance(state, _REUSE_STATE_TYPES) else None)
    if isinstance(take_sam, (bool, np.bool_)):
      branch = sam_branch if take_sam else base_branch
      direction, reused = branch(updates, local_updates, reused)
      sam_steps = (optax.safe_increment(state.sam_steps) if take_sam
                   else state.sam_steps)
      if window is not None and take_sam:
        last_sam_step = count
    else:
      take_sam = jnp.asarray(take_sam, bool)
      direction, reused = jax.lax.cond(
          take_sam, sam_branch, base_branch, updates, local_updates, reused)
      sam_steps = jnp.where(take_sam, optax.safe_increment(state.sam_steps),
                            state.sam_steps)
      if last_sam_step is not None:
        last_sam_step = jnp.where(take_sam, count, last_sam_step)
    new_updates, base_state = base_tx.update(
        direction, state.base_state, params, **extra_args)
    fields = dict(count=optax.safe_increment(count), key=state.key,
                  sam_steps=sam_steps, base_state=base_state)
    if not reusing:
      return new_updates, RSTState(**fields)
    return new_updates, _reuse_state(fields, reused, last_sam_step)

  _coin.attach_config(update_fn, schedule, seed)  # read by HostDispatch
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
