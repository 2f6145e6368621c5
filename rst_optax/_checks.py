"""Argument checks shared by the public functions: one message style for all.

Each check raises an error that names the function and the argument and says
what is allowed. Values that cannot be inspected when the function runs
(tracers, e.g. hyperparameters that ``optax.inject_hyperparams`` passes under
``jax.jit``) pass unchecked.
"""

import inspect
import math
import operator
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _is_tracer(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def number(
    fn: str, name: str, value: Any, *, low: float | None = None,
    high: float | None = None, low_open: bool = False,
    allow_schedule: bool = False,
) -> None:
  """Checks that ``value`` is a finite real scalar in the given range.

  Args:
    fn: the public function, for the message.
    name: the argument, for the message.
    value: the value to check.
    low: the least allowed value (excluded with ``low_open``), or None.
    high: the greatest allowed value (included), or None.
    low_open: whether ``low`` itself is excluded.
    allow_schedule: whether a callable (a schedule of the step count) passes.

  Raises:
    TypeError: if ``value`` is not a real scalar (nor an allowed schedule).
    ValueError: if it is not finite or out of range.
  """
  if (allow_schedule and callable(value)) or _is_tracer(value):
    return
  allowed = 'a finite number'
  if low is not None and high is not None:
    allowed = f'a number in [{low:g}, {high:g}]'
  elif low is not None:
    allowed = f'a finite number {">" if low_open else ">="} {low:g}'
  if allow_schedule:
    allowed += ' or a schedule (a callable of the step count)'
  if not _is_real_scalar(value):
    raise TypeError(f'{fn}: `{name}` must be {allowed}; got {value!r}.')
  x = float(value)
  bad = not math.isfinite(x)
  bad |= low is not None and (x <= low if low_open else x < low)
  bad |= high is not None and x > high
  if bad:
    raise ValueError(f'{fn}: `{name}` must be {allowed}; got {x}.')


def probability(fn: str, name: str, value: Any) -> float:
  """Checks that ``value`` is a number in [0, 1] and returns it as a float."""
  number(fn, name, value, low=0.0, high=1.0)
  return float(value)


def integer(fn: str, name: str, value: Any, minimum: int) -> int:
  """Checks that ``value`` is an int (not a bool) ``>= minimum``; returns it."""
  try:
    if isinstance(value, bool):
      raise TypeError
    value = operator.index(value)
  except TypeError:
    raise TypeError(
        f'{fn}: `{name}` must be an int >= {minimum}; got {value!r}.') from None
  if value < minimum:
    raise ValueError(f'{fn}: `{name}` must be an int >= {minimum}; got {value}.')
  return value


def seed(fn: str, value: Any) -> None:
  """Checks that ``value`` is an int seed or a JAX PRNG key (typed or raw).

  An int seed must fit the int64 that ``jax.random.key`` takes; raw key data
  must be a ``uint32`` vector of the length of the default implementation's
  keys (other implementations' data must be wrapped into a typed key).
  """
  if _is_tracer(value):
    return
  allowed = ('an int or a JAX PRNG key (jax.random.key(...) or '
             'jax.random.PRNGKey(...))')
  is_array = isinstance(value, (jax.Array, np.ndarray))
  if is_array and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
    if value.ndim == 0:
      return
    raise TypeError(f'{fn}: `seed` must be a single PRNG key, not an array of '
                    f'keys; got shape {value.shape}.')
  if is_array and value.dtype == np.uint32 and value.ndim == 1:
    want = jax.random.key_data(jax.random.key(0)).shape
    if value.shape != want:
      raise ValueError(
          f'{fn}: raw key data in `seed` must have shape {want} (the default '
          f'PRNG implementation); got shape {value.shape}. Pass a typed key, '
          'jax.random.wrap_key_data(data, impl=...), for other '
          'implementations.')
    return
  is_int_array = (is_array and value.ndim == 0
                  and jnp.issubdtype(value.dtype, jnp.integer))
  is_int = (isinstance(value, (int, np.integer))
            and not isinstance(value, (bool, np.bool_)))
  if not (is_int or is_int_array):
    raise TypeError(f'{fn}: `seed` must be {allowed}; got {value!r}.')
  if not _INT64_MIN <= int(value) <= _INT64_MAX:
    raise ValueError(
        f'{fn}: an int `seed` must be in [-2**63, 2**63 - 1] (an int64); got '
        f'{int(value)}.')


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_real_scalar(value: Any) -> bool:
  """Whether ``value`` is a 0-d real number: a Python int or float, or a
  NumPy/JAX scalar or 0-d array of an int or float dtype (not bool, not a
  string, not complex)."""
  if isinstance(value, bool):
    return False
  if isinstance(value, (int, float)):
    return True
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return np.ndim(value) == 0 and np.dtype(value.dtype).kind in 'iuf'
  return isinstance(value, Real) and not isinstance(value, complex)


def schedule_value(fn: str, name: str, value: Any) -> None:
  """Checks, when tracing, that a schedule returned a real scalar.

  Works on tracers too: only the shape and dtype are read, so it costs
  nothing per step.
  """
  dtype = getattr(value, 'dtype', None)
  ok = (np.ndim(value) == 0 and np.dtype(dtype).kind in 'iuf'
        if dtype is not None else _is_real_scalar(value))
  if not ok:
    shape = getattr(value, 'shape', None)
    got = f'shape {shape} and dtype {dtype}' if dtype is not None else (
        repr(value))
    raise TypeError(
        f'{fn}: the `{name}` schedule must return a real scalar (a number or a '
        f'0-d int or float array) at every step; got {got}.')


def take_sam(fn: str, value: Any) -> None:
  """Checks ``take_sam``: a Python bool or a boolean scalar array."""
  if isinstance(value, (bool, np.bool_)):
    return
  dtype = getattr(value, 'dtype', None)
  if dtype is not None and np.dtype(dtype) == np.bool_ and np.ndim(value) == 0:
    return
  raise TypeError(
      f'{fn}: `take_sam` must be None, a Python bool or a boolean scalar '
      f'array; got {value!r}.')


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def not_masked(fn: str, name: str, tree: Any, supported: str) -> None:
  """Refuses a ``tree`` with ``optax.MaskedNode`` leaves (``fn`` was put
  inside ``optax.masked`` or ``optax.multi_transform``)."""
  leaves = jax.tree.leaves(tree, is_leaf=_is_masked_node)
  if any(_is_masked_node(leaf) for leaf in leaves):
    raise ValueError(
        f'{fn}: `{name}` holds optax.MaskedNode entries: {fn} was put inside '
        f'optax.masked or optax.multi_transform, which it does not support. '
        f'Put those inside it instead: {supported}.')


def real_floating(fn: str, name: str, tree: Any) -> None:
  """Checks, when tracing, that every leaf of ``tree`` has a real floating
  dtype (complex and integer leaves are refused)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = np.dtype(leaf.dtype if hasattr(leaf, 'dtype')
                     else np.asarray(leaf).dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      where = jax.tree_util.keystr(path) or '(the root)'
      kind = 'complex' if jnp.issubdtype(dtype, jnp.complexfloating) else dtype
      raise TypeError(
          f'{fn}: every leaf of `{name}` must have a real floating dtype; the '
          f'leaf at {where} is {kind}.')


def same_structure(fn: str, name: str, tree: Any, ref_name: str,
                   ref: Any) -> None:
  """Checks that ``tree`` has the tree structure and leaf shapes of ``ref``."""
  if jax.tree.structure(tree) != jax.tree.structure(ref):
    raise ValueError(
        f'{fn}: `{name}` must have the tree structure of `{ref_name}`; got '
        f'{jax.tree.structure(tree)} for {jax.tree.structure(ref)}.')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree),
                          jax.tree.leaves(ref), strict=True):
    if np.shape(a) != np.shape(b):
      raise ValueError(
          f'{fn}: `{name}` must have the shapes of `{ref_name}`; at '
          f'{jax.tree_util.keystr(path)} got {np.shape(a)} for {np.shape(b)}.')


def grad_fn_output(fn: str, grads: Any, params: Any) -> None:
  """Checks, when tracing, that ``grad_fn(params)`` returned gradients: the
  tree structure and shapes of ``params``, with real floating dtypes."""
  structure = jax.tree.structure(params)
  hint = ''
  if isinstance(grads, tuple) and len(grads) == 2:
    first, second = (jax.tree.structure(x) for x in grads)
    if second == structure:
      hint = (' It looks like a (value, grads) pair from jax.value_and_grad: '
              'pass jax.grad(loss_fn) instead.')
    elif first == structure:
      hint = (' It looks like (grads, aux) from has_aux=True: return the '
              'gradients alone, e.g. lambda p: jax.grad(loss_fn, '
              'has_aux=True)(p)[0].')
  elif jax.tree.structure(grads).num_leaves == 1 and np.ndim(
      jax.tree.leaves(grads)[0]) == 0 and structure.num_leaves != 1:
    hint = (' It looks like the loss itself: pass its gradient, '
            'jax.grad(loss_fn).')
  try:
    same_structure(fn, 'grad_fn(params)', grads, 'params', params)
    real_floating(fn, 'grad_fn(params)', grads)
  except (ValueError, TypeError) as e:
    raise type(e)(f'{e}{hint}') from None


def grad_fn_arity(fn: str, grad_fn: Any) -> None:
  """Checks that ``grad_fn`` can be called as ``grad_fn(params)``.

  Reads the signature (``inspect.signature``, which sees through
  ``functools.partial``, bound methods and ``functools.wraps``); a callable
  without a readable signature passes unchecked. ``optax.contrib.sam``'s
  opaque mode calls ``grad_fn(params, i)``, so a function ported from there
  needs two arguments; the message shows the one-argument form.

  Raises:
    TypeError: if one positional argument cannot be bound to ``grad_fn``'s
      parameters (it needs more, none, or a keyword-only one).
  """
  try:
    signature = inspect.signature(grad_fn)
  except (TypeError, ValueError):  # a builtin or an extension type: trust it
    return
  try:
    signature.bind(None)
  except TypeError:
    raise TypeError(
        f'{fn}: `grad_fn` must take one positional argument, the parameters '
        '(grad_fn(params) -> grads, on the same batch); its signature is '
        f'{signature}. optax.contrib.sam\'s opaque mode passes a second '
        f'argument; {fn} does not. Close over the batch instead, e.g. '
        'grad_fn=lambda p: jax.grad(loss_fn)(p, batch).') from None


def step(fn: str, name: str, value: Any, minimum: int = 0) -> int:
  """Checks that ``value`` is an int in ``[minimum, 2**31 - 1]``; returns it.

  ``2**31 - 1`` is the last value of the int32 step count (``MAX_STEP``).
  """
  from rst_optax._types import MAX_STEP

  value = integer(fn, name, value, minimum)
  if value > MAX_STEP:
    raise ValueError(
        f'{fn}: `{name}` must be an int in [{minimum}, 2**31 - 1] (the int32 '
        f'step count stops at 2**31 - 1); got {value}.')
  return value


def checked_schedule(fn: str, name: str, value: Any) -> Any:
  """``value``, or for a callable, the same schedule with its output checked
  by :func:`schedule_value` when tracing (no cost per step)."""
  if not callable(value):
    return value

  def schedule(count):
    out = value(count)
    schedule_value(fn, name, out)
    return out

  return schedule
