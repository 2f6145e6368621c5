"""Flax integration of :func:`rst_optax.rst`: NNX `grad_fn`, Linen `TrainState`.

This module imports Flax, so the core package does not import it; use
``from rst_optax import flax_utils``.

- NNX: ``nnx.Optimizer(model, rst(...), wrt=nnx.Param)`` works as it is, since
  ``Optimizer.update(model, grads, **kwargs)`` forwards ``kwargs`` to
  ``tx.update``; :func:`nnx_grad_fn` builds the ``grad_fn`` to pass.
- Linen: ``flax.training.train_state.TrainState.apply_gradients`` forwards no
  extra arguments, so :class:`TrainState` is a drop-in subclass that does;
  :func:`linen_grad_fn` builds ``grad_fn`` from a loss of the parameters.

Either way the second (perturbed) pass runs on a copy of the model state and
its side effects (BatchNorm running statistics, RNG counters) are dropped: the
running statistics are those of the first, unperturbed pass, as in SAM.

The references of the method are listed under :func:`rst_optax.rst`.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

try:
  from flax import nnx
  from flax.training import train_state
except ImportError as error:
  raise ImportError(
      'rst_optax.flax_utils needs Flax, which is not installed; install it '
      'with: pip install flax (or, in a clone of rst_optax, the extra: '
      'pip install ".[flax]")') from error

from rst_optax import _checks
from rst_optax._types import GradFn

__all__ = ['TrainState', 'linen_grad_fn', 'nnx_grad_fn']

# Variables -> their values: `nnx.as_pure` from Flax 0.12.7, `nnx.pure` before.
_as_pure = getattr(nnx, 'as_pure', None) or nnx.pure


def nnx_grad_fn(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    wrt: nnx.filterlib.Filter = nnx.Param,
    has_aux: bool = False,
    **kwargs: Any,
) -> GradFn:
  r"""The ``grad_fn`` of :func:`rst_optax.rst` for an NNX model.

  .. math:: \mathtt{grad\_fn}(w) = \nabla_w\, \mathtt{loss\_fn}(
     \text{model with parameters } w, *\text{args}).

  The model is split into its ``wrt`` variables and the rest; ``grad_fn``
  merges the parameters it is given with a *copy* of the rest, taken when
  ``nnx_grad_fn`` is called, so the pass it runs leaves ``model`` untouched:
  the BatchNorm running statistics it computes, RNG counters it advances and
  any other state it writes are dropped. Call it before your first pass, so
  that both passes see the same state (the same dropout masks, for example),
  as both gradients of SAM belong to one loss :math:`L_B(w)`.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``), the loss you differentiate with ``nnx.grad``.
    model: the NNX model, as it is before the first pass.
    *args: the arguments of ``loss_fn`` after the model (the batch).
    wrt: the filter of the trained variables; the same as the ``wrt`` of the
      ``nnx.Optimizer``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``grad_fn(params) -> grads``, where ``params`` has the structure of
    ``nnx.state(model, wrt)`` (as ``nnx.Optimizer.update`` passes it).

  Raises:
    TypeError: if ``loss_fn`` is not callable or ``has_aux`` not a bool; and
      when ``grad_fn`` is traced, if ``loss_fn`` does not return a real
      floating scalar (without ``has_aux``) or a ``(loss, aux)`` pair (with
      it), naming ``has_aux`` where it looks wrong.
    ValueError: when ``grad_fn`` is called with parameters other than the
      model's ``wrt`` variables.

  Example:
    >>> import jax.numpy as jnp, optax, rst_optax
    >>> from flax import nnx
    >>> from rst_optax import flax_utils
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, rst_optax.rst(optax.sgd(0.1), schedule=0.5), wrt=nnx.Param)
    >>> loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> grad_fn = flax_utils.nnx_grad_fn(loss_fn, model, x, y)
    >>> grads = nnx.grad(loss_fn)(model, x, y)
    >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)
    >>> int(optimizer.opt_state.count[...])
    1
  """
  _checks.helper_args('nnx_grad_fn', loss_fn, has_aux)
  graphdef, trained, rest = nnx.split(model, wrt, ...)  # type: ignore[misc]
  rest = _as_pure(rest)  # arrays, a snapshot of the state before the pass
  expected = jax.tree.structure(_as_pure(trained))

  def loss_of_params(params):
    got = jax.tree.structure(_as_pure(params))
    if got != expected:
      raise ValueError(
          'nnx_grad_fn: grad_fn was given parameters that are not the '
          "model's `wrt` variables: pass nnx_grad_fn the same `wrt` as "
          f'nnx.Optimizer(..., wrt=...). `wrt`={wrt!r} selects '
          f'{_paths(trained)}; grad_fn got {_paths(params)}.')
    copy = nnx.merge(graphdef, params, rest, copy=True)
    return _checks.loss_output('nnx_grad_fn', loss_fn(copy, *args, **kwargs),
                               has_aux)

  grad = jax.grad(loss_of_params, has_aux=has_aux)
  if has_aux:
    return lambda params: grad(params)[0]
  return grad


def _paths(state: Any) -> str:
  """The paths of a state's leaves, for messages."""
  paths = [jax.tree_util.keystr(path, simple=True, separator='/') for path, _
           in jax.tree_util.tree_flatten_with_path(_as_pure(state))[0]]
  shown = ', '.join(paths[:8]) + (', ...' if len(paths) > 8 else '')
  return f'{len(paths)} arrays ({shown})'


def linen_grad_fn(
    loss_fn: Callable[..., Any],
    *args: Any,
    has_aux: bool = False,
    **kwargs: Any,
) -> GradFn:
  r"""The ``grad_fn`` of :func:`rst_optax.rst` for a loss of the parameters.

  .. math:: \mathtt{grad\_fn}(w) = \nabla_w\, \mathtt{loss\_fn}(w, *\text{args}).

  For Linen with BatchNorm, write the loss as you do for the first pass,
  ``model.apply({'params': w, 'batch_stats': stats}, x, mutable=
  ['batch_stats'])`` returning ``(loss, updates)``, and pass ``has_aux=True``:
  the statistics of the perturbed pass (``aux``) are dropped, and the
  ``batch_stats`` you store come from your first pass only.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs) -> loss`` (or
      ``(loss, aux)`` with ``has_aux=True``).
    *args: the arguments of ``loss_fn`` after the parameters (batch
      statistics, the batch).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is dropped.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``grad_fn(params) -> grads``.

  Raises:
    TypeError: if ``loss_fn`` is not callable or ``has_aux`` not a bool; and
      when ``grad_fn`` is traced, if ``loss_fn`` does not return a real
      floating scalar (without ``has_aux``) or a ``(loss, aux)`` pair (with
      it), naming ``has_aux`` where it looks wrong.

  Example:
    >>> import jax, jax.numpy as jnp, optax, rst_optax
    >>> import flax.linen as nn
    >>> from rst_optax import flax_utils
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> state = flax_utils.TrainState.create(
    ...     apply_fn=model.apply,
    ...     params=model.init(jax.random.key(0), x)['params'],
    ...     tx=rst_optax.rst(optax.sgd(0.1), schedule=0.5))
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((state.apply_fn({'params': params}, x) - y) ** 2)
    >>> grads = jax.grad(loss_fn)(state.params, x, y)
    >>> state = state.apply_gradients(
    ...     grads=grads, grad_fn=flax_utils.linen_grad_fn(loss_fn, x, y))
    >>> int(state.step)
    1
  """
  _checks.helper_args('linen_grad_fn', loss_fn, has_aux)
  grad = jax.grad(lambda *a, **k: _checks.loss_output(
      'linen_grad_fn', loss_fn(*a, **k), has_aux), has_aux=has_aux)

  def grad_fn(params):
    grads = grad(params, *args, **kwargs)
    return grads[0] if has_aux else grads

  return grad_fn


class TrainState(train_state.TrainState):
  r"""Linen ``TrainState`` whose ``apply_gradients`` forwards extra arguments.

  A drop-in subclass of ``flax.training.train_state.TrainState`` with a
  ``batch_stats`` field (``None`` unless given). ``apply_gradients`` computes

  .. math:: (u, s') = \mathtt{tx.update}(g, s, w, **\text{extra}), \qquad
     w' = w + u,

  where the keyword arguments that name a field of the state (``batch_stats``,
  or fields of your own subclass) replace that field, as in Flax, and all the
  others (``grad_fn``, ``take_sam``, ...) go to ``tx.update``.

  Attributes:
    step: the number of ``apply_gradients`` calls so far (Flax's field).
    apply_fn: the model's apply function, usually ``model.apply`` (Flax's).
    params: the parameters (Flax's field).
    tx: the optimizer, e.g. :func:`rst_optax.rst` (Flax's field).
    opt_state: the state of ``tx`` (Flax's field).
    batch_stats: the Linen ``batch_stats`` collection, or ``None``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, rst_optax
    >>> import flax.linen as nn
    >>> from rst_optax import flax_utils
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    ...     return nn.Dense(1)(nn.relu(x))
    >>> x, y = jnp.ones((8, 2)), jnp.zeros((8, 1))
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = flax_utils.TrainState.create(
    ...     apply_fn=Net().apply, params=variables['params'],
    ...     batch_stats=variables['batch_stats'],
    ...     tx=rst_optax.rst(optax.sgd(0.1), schedule=1.0))
    >>> def loss_fn(params, batch_stats, x, y):
    ...   out, updates = state.apply_fn(
    ...       {'params': params, 'batch_stats': batch_stats}, x, train=True,
    ...       mutable=['batch_stats'])
    ...   return jnp.mean((out - y) ** 2), updates
    >>> (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    ...     state.params, state.batch_stats, x, y)
    >>> grad_fn = flax_utils.linen_grad_fn(
    ...     loss_fn, state.batch_stats, x, y, has_aux=True)
    >>> state = state.apply_gradients(
    ...     grads=grads, grad_fn=grad_fn, batch_stats=updates['batch_stats'])
    >>> int(state.opt_state.sam_steps)
    1
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads: optax.Updates, **kwargs: Any) -> Any:
    """Applies ``grads`` with ``tx``, forwarding the extra keyword arguments.

    Args:
      grads: gradients with the structure of ``params``.
      **kwargs: fields of the state to replace (as in Flax), and any other
        keyword arguments of ``tx.update`` (``grad_fn``, ``take_sam``, ...).

    Returns:
      The state with ``step`` incremented, ``params`` and ``opt_state``
      updated and the given fields replaced.
    """
    fields = {field.name for field in dataclasses.fields(self)}
    replace = {k: v for k, v in kwargs.items() if k in fields}
    extra_args = {k: v for k, v in kwargs.items() if k not in fields}
    if not extra_args:
      return super().apply_gradients(grads=grads, **replace)
    # Flax's apply_gradients calls tx.update(grads, opt_state, params) with
    # no other argument: run it with a tx whose update has the extra
    # arguments bound, then put the original tx back.
    tx = self.tx
    bound = optax.GradientTransformation(
        tx.init, functools.partial(tx.update, **extra_args))
    new = super(TrainState, self.replace(tx=bound)).apply_gradients(
        grads=grads, **replace)
    return new.replace(tx=tx)
