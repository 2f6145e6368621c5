"""Equinox integration of :func:`rst_optax.rst`: the ``grad_fn`` of a model.

This module imports Equinox, so the core package does not import it; use
``from rst_optax import equinox_utils`` (``pip install ".[equinox]"`` from a clone).

An Equinox model is a pytree that holds its arrays and everything else
(activation functions, static fields). ``eqx.partition(model,
eqx.is_inexact_array)`` splits it into the trained arrays, which
``tx.init``/``tx.update`` see, and the rest; ``eqx.combine`` puts them back
together. :func:`eqx_grad_fn` builds, from a loss of the model, the
``grad_fn`` of the arrays that ``rst`` calls at the perturbed parameters.

A model with state (``eqx.nn.BatchNorm`` and ``eqx.nn.State``) returns its new
state next to the loss: pass ``has_aux=True`` and the state you gave your first
pass. The perturbed pass then starts from that state and its own new state is
dropped, so the running statistics you keep are those of the first pass, as
in SAM and as :mod:`rst_optax.flax_utils` does for Flax.
"""

from collections.abc import Callable
from typing import Any

import jax

try:
  import equinox as eqx
except ImportError as error:
  raise ImportError(
      'rst_optax.equinox_utils needs Equinox, which is not installed; install '
      'it with: pip install equinox (or, in a clone of rst_optax, the extra: '
      'pip install ".[equinox]")') from error

from rst_optax import _checks
from rst_optax._types import GradFn

__all__ = ['eqx_grad_fn']


def eqx_grad_fn(
    loss_fn: Callable[..., Any],
    model: Any,
    *args: Any,
    has_aux: bool = False,
    filter_spec: Any = eqx.is_inexact_array,
    **kwargs: Any,
) -> GradFn:
  r"""The ``grad_fn`` of :func:`rst_optax.rst` for an Equinox model.

  .. math:: \mathtt{grad\_fn}(w) = \nabla_w\, \mathtt{loss\_fn}(
     \mathtt{eqx.combine}(w, \text{rest of the model}), *\text{args}).

  ``model`` is split with ``eqx.partition(model, filter_spec)``; ``grad_fn``
  takes the trained part, the ``params`` that ``tx.update`` receives (arrays,
  ``None`` elsewhere), and combines it with the rest of ``model`` as it is
  when ``eqx_grad_fn`` is called. It is the gradient that
  ``eqx.filter_grad(loss_fn)`` gives for the model with those parameters.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``), the loss of your first pass.
    model: the Equinox model (a pytree, e.g. an ``eqx.Module``).
    *args: the arguments of ``loss_fn`` after the model: the batch, and for a
      model with state the ``eqx.nn.State`` your first pass started from.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` (for
      example the new ``eqx.nn.State`` of the perturbed pass) is dropped.
    filter_spec: which leaves are trained, as in ``eqx.partition``; the
      default ``eqx.is_inexact_array`` matches ``eqx.filter_grad``.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``grad_fn(params) -> grads``, where ``params`` has the structure of
    ``eqx.filter(model, filter_spec)``.

  Raises:
    TypeError: if ``loss_fn`` is not callable or ``has_aux`` not a bool; and
      when ``grad_fn`` is traced, if ``loss_fn`` does not return a real
      floating scalar (without ``has_aux``) or a ``(loss, aux)`` pair (with
      it), naming ``has_aux`` where it looks wrong.
    ValueError: when ``grad_fn`` is called with parameters whose structure is
      not that of ``eqx.filter(model, filter_spec)``.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax, rst_optax
    >>> from rst_optax import equinox_utils
    >>> model = eqx.nn.Linear(2, 1, key=jax.random.key(0))
    >>> params, static = eqx.partition(model, eqx.is_inexact_array)
    >>> tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0)
    >>> opt_state = tx.init(params)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((jax.vmap(model)(x) - y) ** 2)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> grads = eqx.filter_grad(loss_fn)(model, x, y)
    >>> grad_fn = equinox_utils.eqx_grad_fn(loss_fn, model, x, y)
    >>> updates, opt_state = tx.update(grads, opt_state, params,
    ...                                grad_fn=grad_fn)
    >>> model = eqx.apply_updates(model, updates)
    >>> int(opt_state.sam_steps)
    1
  """
  _checks.helper_args('eqx_grad_fn', loss_fn, has_aux)
  params, static = eqx.partition(model, filter_spec)
  expected = jax.tree.structure(params)

  def loss_of_params(trained):
    if jax.tree.structure(trained) != expected:
      raise ValueError(
          'eqx_grad_fn: grad_fn was given parameters whose structure is not '
          'that of eqx.filter(model, filter_spec): give tx.init and '
          'tx.update the arrays of eqx.partition(model, filter_spec) with the '
          f'same filter_spec. Expected {expected}; got '
          f'{jax.tree.structure(trained)}.')
    return _checks.loss_output(
        'eqx_grad_fn', loss_fn(eqx.combine(trained, static), *args, **kwargs),
        has_aux)

  grad = jax.grad(loss_of_params, has_aux=has_aux)
  if has_aux:
    return lambda trained: grad(trained)[0]
  return grad
