"""Argument checks shared by the public functions: one message style for all.

Each check raises an error that names the function and the argument and says
what is allowed. Values that cannot be inspected when the function runs
(tracers, e.g. hyperparameters that ``optax.inject_hyperparams`` passes under
``jax.jit``) pass unchecked.
"""

import inspect
import math
import operator
import sys
from collections.abc import Callable
from numbers import Number
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
    allow_schedule: bool = False, arrays_as_schedules: bool = False,
) -> None:
  """Checks that ``value`` is a finite real scalar in the given range.

  A real scalar is a Python int or float, or a NumPy or JAX scalar or 0-d
  array of an integer or floating dtype; other number types
  (``fractions.Fraction``, ``decimal.Decimal``) are refused, as JAX cannot
  take them.

  Args:
    fn: the public function, for the message.
    name: the argument, for the message.
    value: the value to check.
    low: the least allowed value (excluded with ``low_open``), or None.
    high: the greatest allowed value (included), or None.
    low_open: whether ``low`` itself is excluded.
    allow_schedule: whether a callable (a schedule of the step count) passes;
      it must take one positional argument, the step count.
    arrays_as_schedules: whether a JAX array is checked for its type alone,
      its value then being taken as a schedule's output is. This is how
      ``optax.inject_hyperparams`` passes numbers: as arrays, concrete when
      called eagerly and traced under ``jax.jit``, where the value cannot be
      checked; so that both modes agree, neither checks it.

  Raises:
    TypeError: if ``value`` is not a real scalar (nor an allowed schedule),
      or is a schedule that cannot be called with one positional argument.
    ValueError: if it is not finite or out of range.
  """
  if allow_schedule and callable(value):
    schedule_arity(fn, name, value)
    return
  if _is_tracer(value):
    return
  allowed = 'a finite number'
  if low is not None and high is not None:
    allowed = f'a number in [{low:g}, {high:g}]'
  elif low is not None:
    allowed = f'a finite number {">" if low_open else ">="} {low:g}'
  if allow_schedule:
    allowed += ' or a schedule (a callable of the step count)'
  if not _is_real_scalar(value):
    hint = ''
    if isinstance(value, Number) and not isinstance(value, (bool, complex)):
      hint = (f' A {type(value).__name__} is not taken (JAX cannot convert '
              'it): pass float(value).')
    raise TypeError(
        f'{fn}: `{name}` must be {allowed}; got {value!r}.{hint}')
  if arrays_as_schedules and isinstance(value, jax.Array):
    return
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


def prng_key(fn: str, name: str, value: Any) -> None:
  """Checks that ``value`` is one PRNG key: a typed key (``jax.random.key``)
  or the raw ``uint32`` key data of the default implementation
  (``jax.random.PRNGKey``).

  Reads only the dtype and shape, so it costs nothing on tracers.

  Raises:
    TypeError: naming ``fn`` and ``name``, if ``value`` is not a key (an int
      seed, for example) or is an array of keys.
    ValueError: if raw key data has the wrong shape.
  """
  dtype = getattr(value, 'dtype', None)
  shape = getattr(value, 'shape', None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if shape == ():
      return
    raise TypeError(f'{fn}: `{name}` must be a single PRNG key, not an array '
                    f'of keys; got shape {shape}.')
  if (dtype is not None and np.dtype(dtype) == np.uint32
      and np.ndim(value) == 1):
    want = jax.random.key_data(jax.random.key(0)).shape
    if shape != want:
      raise ValueError(
          f'{fn}: raw key data in `{name}` must have shape {want} (the default '
          f'PRNG implementation); got shape {shape}. Pass a typed key, '
          'jax.random.wrap_key_data(data, impl=...), for other '
          'implementations.')
    return
  got = (f'an array of shape {shape} and dtype {dtype}' if dtype is not None
         else repr(value))
  raise TypeError(
      f'{fn}: `{name}` must be a JAX PRNG key (jax.random.key(seed), or '
      f'jax.random.PRNGKey(seed)), not a seed; got {got}.')


def step_count(fn: str, name: str, value: Any) -> None:
  """Checks that ``value`` is a step count: an int in ``[0, 2**31 - 1]``, or
  a 0-d array (a tracer, e.g. ``rst``'s count) of an integer dtype.

  Arrays are checked by dtype and shape only, so it costs nothing on
  tracers; Python and NumPy ints by value too.

  Raises:
    TypeError: naming ``fn`` and ``name``, if ``value`` is not an integer
      scalar (a float or a bool, for example).
    ValueError: if a Python or NumPy int is outside ``[0, 2**31 - 1]``.
  """
  allowed = ('an int in [0, 2**31 - 1] (the int32 step count) or an integer '
             'scalar array')
  if isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_)):
    step(fn, name, value)
    return
  dtype = getattr(value, 'dtype', None)
  if (isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0
      and dtype is not None and np.dtype(dtype) != np.bool_
      and jnp.issubdtype(dtype, jnp.integer)):
    return
  raise TypeError(f'{fn}: `{name}` must be {allowed}; got {value!r}.')


def _is_real_dtype(dtype: Any) -> bool:
  """Whether ``dtype`` is a real number type: any JAX integer or floating
  dtype, bfloat16 and the other ``ml_dtypes`` types included (NumPy gives
  bfloat16 the kind ``'V'``), but not bool, complex or a PRNG key."""
  try:
    dtype = np.dtype(dtype)
  except TypeError:  # e.g. a PRNG key's extended dtype
    return False
  return bool(jnp.issubdtype(dtype, jnp.floating)
              or jnp.issubdtype(dtype, jnp.integer))


def _is_real_scalar(value: Any) -> bool:
  """Whether ``value`` is a 0-d real number: a Python int or float, or a
  NumPy/JAX scalar or 0-d array of an int or float dtype (bfloat16 and
  float16 included; not bool, not a string, not complex, and no other number
  type such as ``fractions.Fraction``, which JAX cannot convert)."""
  if isinstance(value, bool):
    return False
  if isinstance(value, (int, float)):
    return True
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return np.ndim(value) == 0 and _is_real_dtype(value.dtype)
  return False


def schedule_value(fn: str, name: str, value: Any) -> None:
  """Checks, when tracing, that a schedule returned a real scalar.

  Works on tracers too: only the shape and dtype are read, so it costs
  nothing per step. Every JAX integer and floating dtype passes, bfloat16
  and float16 included.

  Raises:
    TypeError: naming ``fn`` and ``name``, if ``value`` is not a real scalar.
  """
  dtype = getattr(value, 'dtype', None)
  ok = (np.ndim(value) == 0 and _is_real_dtype(dtype)
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


def _dtype_of(leaf: Any) -> Any:
  """The dtype of an array leaf, or NumPy's for a Python scalar."""
  return leaf.dtype if hasattr(leaf, 'dtype') else np.asarray(leaf).dtype


def _where(path: Any) -> str:
  """A leaf's path for messages; ``(the root)`` for a single-array tree."""
  return jax.tree_util.keystr(path) or '(the root)'


def real_floating(fn: str, name: str, tree: Any) -> None:
  """Checks, when tracing, that every leaf of ``tree`` has a real floating
  dtype (complex and integer leaves, and PRNG keys, are refused).

  Raises:
    TypeError: naming ``fn``, ``name`` and the leaf, if one is not.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = _dtype_of(leaf)
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      kind: Any = f'a PRNG key ({dtype}); keep keys out of `{name}`'
    elif not jnp.issubdtype(dtype, jnp.floating):
      kind = ('complex' if jnp.issubdtype(dtype, jnp.complexfloating)
              else np.dtype(dtype))
    else:
      continue
    raise TypeError(
        f'{fn}: every leaf of `{name}` must have a real floating dtype; the '
        f'leaf at {_where(path)} is {kind}.')


def _same_shapes(tree: Any, ref: Any) -> bool:
  """Whether ``tree`` has the tree structure and leaf shapes of ``ref``."""
  return jax.tree.structure(tree) == jax.tree.structure(ref) and all(
      np.shape(a) == np.shape(b)
      for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref), strict=True))


def same_structure(fn: str, name: str, tree: Any, ref_name: str,
                   ref: Any) -> None:
  """Checks that ``tree`` has the tree structure and leaf shapes of ``ref``:
  whole shapes, so ``(1,)`` and ``(5,)`` differ.

  Raises:
    ValueError: naming ``fn``, ``name`` and the first leaf that differs.
  """
  if jax.tree.structure(tree) != jax.tree.structure(ref):
    raise ValueError(
        f'{fn}: `{name}` must have the tree structure of `{ref_name}`; got '
        f'{jax.tree.structure(tree)} for {jax.tree.structure(ref)}.')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree),
                          jax.tree.leaves(ref), strict=True):
    if np.shape(a) != np.shape(b):
      raise ValueError(
          f'{fn}: `{name}` must have the shapes of `{ref_name}`; at '
          f'{_where(path)} got {np.shape(a)} for {np.shape(b)}.')


def _is_nnx_variable(x: Any) -> bool:
  """Whether ``x`` is a Flax NNX variable (``nnx.Param``, ``nnx.BatchStat``,
  ...), told by its classes' module and name, so flax need not be imported."""
  return any(c.__module__.startswith('flax.nnx')
             and c.__name__ in ('Variable', 'VariableState')
             for c in type(x).__mro__)


def not_nnx_variables(fn: str, name: str, tree: Any, ref: Any) -> None:
  """Refuses a ``tree`` that holds Flax NNX variables where ``ref`` (the
  parameters) holds plain arrays, with the fix, instead of the tree
  structures (which for NNX variables run to kilobytes)."""
  if any(_is_nnx_variable(x)
         for x in jax.tree.leaves(ref, is_leaf=_is_nnx_variable)):
    return
  for path, x in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=_is_nnx_variable):
    if _is_nnx_variable(x):
      # nnx.pure was renamed nnx.as_pure; name the one installed.
      nnx = sys.modules.get('flax.nnx')
      pure = 'as_pure' if hasattr(nnx, 'as_pure') else 'pure'
      raise ValueError(
          f'{fn}: `{name}` holds flax.nnx variables (an nnx.'
          f'{type(x).__name__} at {_where(path)}) where the parameters are '
          'plain arrays, as nnx.Optimizer passes them: return plain arrays, '
          f'e.g. nnx.{pure}(grads), or build grad_fn with '
          'rst_optax.flax_utils.nnx_grad_fn(loss_fn, model, *batch).')


def grad_fn_output(fn: str, grads: Any, params: Any) -> None:
  """Checks, when tracing, that ``grad_fn(params)`` returned gradients: the
  tree structure and shapes of ``params``, with real floating dtypes.

  Raises:
    ValueError: if the structure or a shape differs, with a hint where the
      output looks like the loss, ``(value, grads)`` or ``(grads, aux)``, or
      holds Flax NNX variables.
    TypeError: if a leaf does not have a real floating dtype.
  """
  structure = jax.tree.structure(params)
  is_scalar = lambda x: (jax.tree.structure(x).num_leaves == 1
                         and np.ndim(jax.tree.leaves(x)[0]) == 0)
  not_nnx_variables(fn, 'grad_fn(params)', grads, params)
  hint = ''
  if isinstance(grads, tuple) and len(grads) == 2:
    first, second = (jax.tree.structure(x) for x in grads)
    if second == structure and is_scalar(grads[0]):
      hint = (' It looks like a (value, grads) pair from jax.value_and_grad: '
              'pass jax.grad(loss_fn) instead.')
    elif first == structure:
      hint = (' It looks like (grads, aux) from has_aux=True: return the '
              'gradients alone, e.g. lambda p: jax.grad(loss_fn, '
              'has_aux=True)(p)[0].')
  elif is_scalar(grads) and not _same_shapes(grads, params):
    hint = (' It looks like the loss itself: pass its gradient, '
            'jax.grad(loss_fn).')
  try:
    same_structure(fn, 'grad_fn(params)', grads, 'params', params)
    real_floating(fn, 'grad_fn(params)', grads)
  except (ValueError, TypeError) as e:
    raise type(e)(f'{e}{hint}') from None


def helper_args(fn: str, loss_fn: Any, has_aux: Any) -> None:
  """Checks the ``loss_fn`` and ``has_aux`` of a ``grad_fn`` helper.

  Raises:
    TypeError: naming ``fn`` and the argument, if ``loss_fn`` is not
      callable or ``has_aux`` is not a bool.
  """
  if not callable(loss_fn):
    raise TypeError(f'{fn}: `loss_fn` must be callable; got {loss_fn!r}.')
  if not isinstance(has_aux, (bool, np.bool_)):
    raise TypeError(f'{fn}: `has_aux` must be a bool; got {has_aux!r}.')


def loss_output(fn: str, out: Any, has_aux: bool) -> Any:
  """Checks, when tracing, what ``loss_fn`` returned; returns it unchanged.

  Without ``has_aux`` it must be a real floating scalar, the loss; with it,
  a pair ``(loss, aux)``. Only shapes and dtypes are read: no cost per step.

  Args:
    fn: the public function, for the message.
    out: ``loss_fn``'s output.
    has_aux: the ``has_aux`` that ``fn`` was given.

  Raises:
    TypeError: naming ``fn`` and ``loss_fn`` (and ``has_aux`` where it is
      the likely cause), if ``out`` is not of that form.
  """
  pair = isinstance(out, (tuple, list)) and len(out) == 2
  if has_aux and not pair:
    raise TypeError(
        f'{fn}: with `has_aux=True`, `loss_fn` must return a pair (loss, aux); '
        f'got {_describe(out)}. Pass has_aux=False if it returns the loss '
        'alone.')
  loss = out[0] if has_aux else out
  if _is_float_scalar(loss):
    return out
  if not has_aux and pair and _is_float_scalar(out[0]):
    raise TypeError(
        f'{fn}: `loss_fn` returned a pair whose first item is a scalar, as '
        '(loss, aux) does, but `has_aux` is False: pass has_aux=True.')
  what = 'the loss in (loss, aux)' if has_aux else 'the loss'
  raise TypeError(
      f'{fn}: `loss_fn` must return {what} as a real floating scalar; got '
      f'{_describe(loss)}.')


def _is_float_scalar(x: Any) -> bool:
  dtype = getattr(x, 'dtype', None)
  if dtype is None:
    return isinstance(x, float)
  return np.ndim(x) == 0 and _is_real_dtype(dtype) and jnp.issubdtype(
      dtype, jnp.floating)


def _describe(x: Any) -> str:
  """``x`` for messages: shape and dtype for arrays and tracers."""
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    return f'an array of shape {tuple(x.shape)} and dtype {x.dtype}'
  if isinstance(x, (tuple, list)):
    return f'a {type(x).__name__} of {len(x)} items'
  return f'{type(x).__name__} {x!r}'


def axis_name_bound(fn: str, axis_name: str) -> None:
  """Checks, when tracing, that ``axis_name`` is a bound mapped axis.

  ``jax.lax.axis_size`` raises a ``NameError`` for an axis that no
  enclosing ``shard_map``, ``pmap`` or ``jax.vmap(..., axis_name=...)``
  binds; it reads only the trace's axis environment, so the check costs
  nothing per step.

  Args:
    fn: the public function, for the message.
    axis_name: the axis name to look up.

  Raises:
    ValueError: naming ``fn`` and ``axis_name``, if the axis is not bound.
  """
  try:
    jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f'{fn}: `axis_name`={axis_name!r} is not a bound axis here: '
        '`axis_name` needs the update to run inside jax.shard_map or '
        'jax.pmap over that axis (or jax.vmap(..., axis_name=...)). Under '
        'jax.jit with shardings, gradients are already global: leave '
        '`axis_name` as None.') from None


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
  signature = _unbindable_by_one_argument(grad_fn)
  if signature is not None:
    raise TypeError(
        f'{fn}: `grad_fn` must take one positional argument, the parameters '
        '(grad_fn(params) -> grads, on the same batch); its signature is '
        f'{signature}. optax.contrib.sam\'s opaque mode passes a second '
        f'argument; {fn} does not. Close over the batch instead, e.g. '
        'grad_fn=lambda p: jax.grad(loss_fn)(p, batch).')


def _unbindable_by_one_argument(f: Callable) -> inspect.Signature | None:
  """``f``'s signature if one positional argument cannot be bound to it;
  None if it can, or if ``f`` has no readable signature (a builtin or an
  extension type: trusted)."""
  try:
    signature = inspect.signature(f)
  except (TypeError, ValueError):
    return None
  try:
    signature.bind(None)
  except TypeError:
    return signature
  return None


def schedule_arity(fn: str, name: str, schedule: Any) -> None:
  """Checks that the schedule ``schedule`` can be called as
  ``schedule(count)``, as :func:`grad_fn_arity` checks ``grad_fn``; a
  callable without a readable signature passes unchecked.

  Raises:
    TypeError: naming ``fn`` and ``name``, if one positional argument cannot
      be bound to the schedule's parameters.
  """
  signature = _unbindable_by_one_argument(schedule)
  if signature is not None:
    raise TypeError(
        f'{fn}: the `{name}` schedule must take one positional argument, the '
        f'step count (schedule(count) -> number, as an optax.Schedule); its '
        f'signature is {signature}. Bind any other argument first, e.g. with '
        'functools.partial or a lambda count: ....')


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
