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

from rst_optax import _checks, _coin

GradFn = Callable[[optax.Params], optax.Updates]


class RSTState(NamedTuple):
  """State of the transformation returned by :func:`rst`.

  Attributes:
    count: int32 scalar, the number of ``update`` calls so far; it is the step
      ``t`` at which the schedules are evaluated and the coin is drawn.
    key: the PRNG key of the coin as raw ``uint32`` key data (see
      ``jax.random.key_data``), so the state is a plain array pytree that
      ``jax.jit``, ``optax.tree`` helpers and checkpointers handle. It never
      changes: the draw at step ``t`` folds ``t`` into it.
    sam_steps: int32 scalar, the number of SAM steps taken so far. A run has
      cost ``count + sam_steps`` forward-backward passes.
    base_state: the state of the base optimizer.
  """

  count: jax.Array
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
  if hasattr(jax.lax, 'pcast'):
    cast = lambda x: jax.lax.pcast(x, axis_name, to='varying')
  elif hasattr(jax.lax, 'pvary'):  # JAX < 0.8
    cast = lambda x: jax.lax.pvary(x, axis_name)
  else:
    return tree

  def mark(x):
    try:
      return cast(x)
    except ValueError:  # already varying over axis_name
      return x

  return jax.tree.map(mark, tree)


def rst(
    base_tx: optax.GradientTransformation,
    schedule: _coin.ScalarOrSchedule = 0.5,
    rho: _coin.ScalarOrSchedule = 0.05,
    lam: _coin.ScalarOrSchedule = 1.0,
    *,
    seed: _coin.Seed = 0,
    adaptive: bool = False,
    eps: float = 1e-12,
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
  :math:`\epsilon_t = \rho_t\, |w|^2 g / (\| |w| g \|_2 + \varepsilon)`.
  ``lam = 1`` is plain RST; ``schedule = 1, lam = 1`` is SAM. Conditioned on
  :math:`w`, the expected direction is
  :math:`(1 - p\lambda)\, g + p\lambda\, \nabla L_B(w + \epsilon)`: a gradient-norm
  penalty of weight :math:`p\lambda` times SAM's, which
  :func:`rst_optax.schedules.matching_lam` sets to any target.

  The coin is ``jax.random.bernoulli(jax.random.fold_in(key, t), p(t))``, a pure
  function of ``(seed, t)`` shared with :func:`rst_optax.decisions`. The branch
  is picked with ``jax.lax.cond``, so a jitted train step compiles once and runs
  the second gradient only on SAM steps. When ``schedule`` is the Python number
  ``0`` or ``1`` the decision is known when tracing and no ``cond`` is traced.

  ``update`` takes, besides the usual arguments:

  - ``grad_fn`` (required): ``grad_fn(params) -> grads``, the minibatch gradient
    at other parameters, closing over the same batch. With BatchNorm, let it
    discard the statistics of the perturbed pass and keep those of your first.
  - ``take_sam`` (optional): a Python bool fixes the branch when tracing (no
    ``cond``; for host-side dispatch with :func:`rst_optax.decisions`), a
    boolean array overrides the coin inside the ``cond``. Either way the caller
    is responsible for it matching the coin if the run must be reproducible.
  - any other keyword arguments are forwarded to ``base_tx.update``.

  Numerical faults lose nothing silently. If :math:`g` has a NaN or Inf entry,
  the SAM branch feeds :math:`g` itself to the base optimizer (its perturbation
  would be NaN everywhere), so the updates are non-finite exactly where the
  base optimizer's alone would be; ``grad_fn`` still runs on that step and
  ``sam_steps`` still counts it. A NaN or Inf in ``grad_fn``'s output is never
  masked: it reaches the updates. Wrap the *base* optimizer,
  ``rst(optax.apply_if_finite(base_tx, n), ...)``, to skip such a step: the
  base state and parameters are left as they were while ``count`` and
  ``sam_steps`` advance, so the coin stays aligned with the step index. Under
  ``jax.vmap`` with a per-example coin (batched state), ``jax.lax.cond``
  becomes a select: both branches run on every step, results are unchanged.

  Args:
    base_tx: the base optimizer, any ``optax.GradientTransformation``; it
      receives :math:`d_t` and the extra keyword arguments.
    schedule: p(t), the probability of a SAM step: a float or an
      ``optax.Schedule``; values are clipped to [0, 1].
    rho: perturbation radius :math:`\rho`, ``>= 0``; a float or a schedule.
    lam: G-RST mixing weight :math:`\lambda`; a float or a schedule.
    seed: an int or a JAX PRNG key for the coin.
    adaptive: use the ASAM perturbation (element-wise scaled by :math:`|w|`).
    eps: :math:`\varepsilon > 0` in the normalization; keeps a zero gradient
      finite.
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
        '`base_tx` must be an optax.GradientTransformation (with callable '
        f'`init` and `update`); got {base_tx!r}.'
    )
  _checks.number('rst', 'schedule', schedule, low=0.0, high=1.0,
                 allow_schedule=True)
  _checks.number('rst', 'rho', rho, low=0.0, allow_schedule=True)
  _checks.number('rst', 'lam', lam, allow_schedule=True)
  _checks.number('rst', 'eps', eps, low=0.0, low_open=True)
  _checks.seed('rst', seed)
  if not isinstance(adaptive, (bool, np.bool_)):
    raise TypeError(f'`adaptive` must be a bool; got {adaptive!r}.')
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f'`axis_name` must be a str or None; got {axis_name!r}.')
  if perturbation not in ('global', 'local'):
    raise ValueError(
        f"`perturbation` must be 'global' or 'local'; got {perturbation!r}.")
  if perturbation == 'local' and axis_name is None:
    raise ValueError(
        "`perturbation='local'` (per-device, m-sharpness) needs `axis_name`, "
        'the mapped axis of shard_map/pmap over which gradients are averaged.')
  local = perturbation == 'local'

  base_tx = optax.with_extra_args_support(base_tx)
  key_impl = (jax.random.key_impl(seed) if _coin.is_typed_key(seed) else None)
  rho_fn = _coin.as_schedule(rho)
  lam_fn = _coin.as_schedule(lam)
  plain_rst = _coin.is_python_constant(lam, 1.0)
  if _coin.is_python_constant(schedule, 0.0):
    fixed_branch: bool | None = False
  elif _coin.is_python_constant(schedule, 1.0):
    fixed_branch = True
  else:
    fixed_branch = None

  def init_fn(params: optax.Params) -> RSTState:
    return RSTState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(_coin.as_key(seed)),
        sam_steps=jnp.zeros([], jnp.int32),
        base_state=base_tx.init(params),
    )

  def sam_direction(g, g_local, params, grad_fn, count):
    """The SAM-branch direction (G-RST mix), perturbing along ``g_local``."""
    rho_t = jnp.asarray(rho_fn(count), jnp.float32)
    step = optax.tree.cast(g_local, jnp.float32)
    if adaptive:
      abs_w = jax.tree.map(lambda w: jnp.abs(w).astype(jnp.float32), params)
      step = optax.tree.mul(step, abs_w)  # |w| g, whose norm normalizes.
      norm = optax.tree.norm(step)
      step = optax.tree.mul(step, abs_w)  # |w|^2 g
    else:
      norm = optax.tree.norm(step)
    scale = rho_t / (norm + eps)
    perturbed = jax.tree.map(
        lambda w, e: (w.astype(jnp.float32) + scale * e).astype(w.dtype),
        params, step)
    if axis_name is not None:
      perturbed = _mark_varying(perturbed, axis_name)
      g_sam = jax.lax.pmean(grad_fn(perturbed), axis_name)
    else:
      g_sam = grad_fn(perturbed)
    if plain_rst:
      direction = optax.tree.cast_like(g_sam, g)
    else:
      lam_t = jnp.asarray(lam_fn(count), jnp.float32)
      direction = jax.tree.map(
          lambda a, b: ((1.0 - lam_t) * a + lam_t * b).astype(a.dtype),
          g, g_sam)
    # A NaN or Inf in the gradient makes its norm non-finite and the
    # perturbation NaN everywhere: hand the base optimizer g itself instead,
    # non-finite exactly where it is. (With local perturbations, check the
    # averaged g, the same on every device, as the base branch returns it.)
    if local:
      norm = optax.tree.norm(optax.tree.cast(g, jnp.float32))
    return optax.tree.where(jnp.isfinite(norm), direction, g)

  def update_fn(
      updates: optax.Updates,
      state: RSTState,
      params: optax.Params | None = None,
      *,
      grad_fn: GradFn | None = None,
      take_sam: bool | jax.Array | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, RSTState]:
    if params is None:
      raise ValueError('rst: `update` needs `params` (the current parameters).')
    if grad_fn is None:
      raise ValueError(
          'rst: `update` needs `grad_fn`, the minibatch gradient as a function '
          'of the parameters, e.g. tx.update(grads, state, params, '
          'grad_fn=jax.grad(lambda p: loss(p, batch))).'
      )
    count = state.count
    local_updates = updates
    if local:
      updates = jax.lax.pmean(updates, axis_name)
    if take_sam is None:
      take_sam = fixed_branch
    if take_sam is None:
      key = jax.random.wrap_key_data(state.key, impl=key_impl)
      take_sam = _coin.coin(key, count, schedule)
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

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
