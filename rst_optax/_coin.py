"""The coin of RST: one pure function of (key, step) for graph and host alike.

Both the in-graph branch of :func:`rst_optax.rst` and the host-side
:func:`rst_optax.decisions` call :func:`coin`, so a loop that dispatches on the
host takes exactly the branches the transformation would have taken.
"""

import functools
from collections.abc import Callable
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rst_optax import _checks

# The last step: the step count is int32 and stops there (optax.safe_increment).
MAX_STEP = int(np.iinfo(np.int32).max)

ScalarOrSchedule = float | jax.Array | optax.Schedule
Seed = int | jax.Array


def as_schedule(value: ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
  """Returns ``value`` itself if it is callable, else a constant schedule."""
  if callable(value):
    return value
  return lambda count: jnp.asarray(value)


def is_python_constant(value, target: float) -> bool:
  """Whether ``value`` is a Python number (not an array) equal to ``target``."""
  return (
      isinstance(value, Real)
      and not isinstance(value, bool)
      and float(value) == target
  )


def is_typed_key(value) -> bool:
  """Whether ``value`` is a typed PRNG key array (``jax.random.key``)."""
  return isinstance(value, jax.Array) and jnp.issubdtype(
      value.dtype, jax.dtypes.prng_key)


def as_key(seed: Seed) -> jax.Array:
  """Turns an int seed or a PRNG key (typed or raw ``uint32``) into a typed key."""
  if is_typed_key(seed):
    return seed
  is_array = isinstance(seed, (jax.Array, np.ndarray))
  if is_array and seed.dtype == jnp.uint32 and seed.ndim == 1:
    return jax.random.wrap_key_data(seed)
  return jax.random.key(seed)


def probability(schedule: ScalarOrSchedule, step: jax.Array) -> jax.Array:
  """p(t): the schedule at ``step``, clipped to [0, 1], as float32."""
  p = as_schedule(schedule)(step)
  return jnp.clip(jnp.asarray(p, jnp.float32), 0.0, 1.0)


def coin(key: jax.Array, step: jax.Array, schedule: ScalarOrSchedule) -> jax.Array:
  """Whether step ``step`` is a SAM step: ``X_t ~ Bernoulli(p(t))``.

  The draw is ``jax.random.bernoulli(jax.random.fold_in(key, step), p(t))``:
  a pure function of the key and the step, with no key splitting, so a run
  resumed at step ``t`` draws what it would have drawn, and every device that
  holds the same key draws the same.

  Args:
    key: a typed PRNG key.
    step: the step count, an int32 scalar (or a vector under ``jax.vmap``).
    schedule: p(t), a float or an ``optax.Schedule``; clipped to [0, 1].

  Returns:
    A boolean scalar.
  """
  step = jnp.asarray(step, jnp.int32)
  return jax.random.bernoulli(
      jax.random.fold_in(key, step), probability(schedule, step)
  )


def decisions(
    schedule: ScalarOrSchedule, seed: Seed, start: int, stop: int
) -> np.ndarray:
  """The branches :func:`rst_optax.rst` takes at steps ``[start, stop)``.

  Computed in one vectorized call of the same :func:`coin` the transformation
  uses in its graph, so a training loop can decide on the host, ahead of time
  and without any device-to-host transfer, which compiled step to run.

  Args:
    schedule: the ``schedule`` given to :func:`rst_optax.rst`.
    seed: the ``seed`` given to :func:`rst_optax.rst`.
    start: first step (inclusive), ``>= 0``.
    stop: last step (exclusive), ``>= start``.

  Returns:
    A NumPy bool array of length ``stop - start``; entry ``i`` is ``True``
    when step ``start + i`` is a SAM step.

  Example:
    >>> import rst_optax
    >>> rst_optax.decisions(0.5, seed=0, start=0, stop=8).shape
    (8,)
  """
  _checks.number('decisions', 'schedule', schedule, low=0.0, high=1.0,
                 allow_schedule=True)
  _checks.seed('decisions', seed)
  start = _checks.integer('decisions', 'start', start, 0)
  stop = _checks.integer('decisions', 'stop', stop, start)
  if stop > MAX_STEP:
    raise ValueError(
        f'decisions: `stop` must be <= 2**31 - 1 (the int32 step count); '
        f'got {stop}.')
  steps = jnp.arange(start, stop, dtype=jnp.int32)
  try:
    draw = _vectorized_coin(schedule)
  except TypeError:  # an unhashable schedule (e.g. an array): no caching.
    draw = _vectorized_coin.__wrapped__(schedule)
  return np.asarray(draw(as_key(seed), steps), dtype=bool)


@functools.lru_cache(maxsize=64)
def _vectorized_coin(schedule: ScalarOrSchedule):
  """`coin` over a vector of steps, jitted once per schedule (and length)."""
  return jax.jit(jax.vmap(lambda key, t: coin(key, t, schedule),
                          in_axes=(None, 0)))
