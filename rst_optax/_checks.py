"""Argument checks shared by the public functions: one message style for all.

Each check raises an error that names the function and the argument and says
what is allowed. Values that cannot be inspected when the function runs
(tracers, e.g. hyperparameters that ``optax.inject_hyperparams`` passes under
``jax.jit``) pass unchecked.
"""

import math
import operator
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
  try:
    is_real = isinstance(value, (Real, np.ndarray, np.generic, jax.Array))
    if not is_real or isinstance(value, bool) or np.ndim(value) != 0:
      raise TypeError
    x = float(value)
  except (TypeError, ValueError):
    raise TypeError(f'{fn}: `{name}` must be {allowed}; got {value!r}.') from None
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
  """Checks that ``value`` is an int seed or a JAX PRNG key (typed or raw)."""
  if _is_tracer(value):
    return
  if isinstance(value, (jax.Array, np.ndarray)):
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) and value.ndim == 0:
      return
    if value.dtype == np.uint32 and value.ndim == 1:
      return
    if jnp.issubdtype(value.dtype, jnp.integer) and value.ndim == 0:
      return
  elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return
  raise TypeError(
      f'{fn}: `seed` must be an int or a JAX PRNG key (jax.random.key(...) or '
      f'jax.random.PRNGKey(...)); got {value!r}.')
