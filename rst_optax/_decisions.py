"""The host-side decision API: the branches of ``rst``, known ahead of time.

:func:`decisions` and :func:`iter_decisions` compute, on the host and without
reading anything back from a training step, the coin that
:func:`rst_optax.rst` draws in its graph at each step. Both run the same
:func:`rst_optax.coin` one step after another (``jax.lax.map``), as the
transformation does, so they agree bit for bit with it for every PRNG key
implementation (``threefry2x32``, ``rbg``, ``unsafe_rbg``): ``jax.vmap`` would
change the draws of the ``rbg`` keys.
"""

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rst_optax import _checks, _coin
from rst_optax._types import MAX_STEP, ScalarOrSchedule, Seed


def check_schedule(fn: str, schedule: Any) -> None:
  """Checks ``schedule`` as ``rst`` does; a callable must return a scalar.

  Args:
    fn: the public function, for the message.
    schedule: a number in [0, 1] or a callable of the step count.

  Raises:
    TypeError: if ``schedule`` is neither, or its values are not real scalars.
    ValueError: if the number is outside [0, 1] or not finite.
  """
  _checks.number(fn, 'schedule', schedule, low=0.0, high=1.0,
                 allow_schedule=True)
  if callable(schedule):  # trace it once, as rst does
    jax.eval_shape(_checks.checked_schedule(fn, 'schedule', schedule),
                   jax.ShapeDtypeStruct((), jnp.int32))


def _raise_on_nan(fn: str, nan: np.ndarray, start: int) -> None:
  if nan.any():
    step = start + int(np.argmax(nan))
    raise ValueError(
        f'{fn}: `schedule` returned NaN at step {step}; p(t) must be a number '
        'in [0, 1] (in its graph, rst takes no SAM step where p(t) is NaN).')


def _as_dynamic(schedule: ScalarOrSchedule) -> tuple[Any, jax.Array]:
  """Splits ``schedule`` into a static callable (or None) and a float32 p."""
  if callable(schedule):
    return schedule, jnp.zeros([], jnp.float32)
  return None, jnp.asarray(schedule, jnp.float32)


@functools.lru_cache(maxsize=64)
def _draw(schedule):
  """Jitted ``coin`` over a vector of steps, one step at a time, and NaN flags.

  ``schedule`` is a callable, or None for a number passed as ``p``.
  """

  def draw(key, steps, p):
    sched = p if schedule is None else schedule

    def one(t):
      return (_coin.coin(key, t, sched),
              jnp.isnan(_coin.probability_at(sched, t)))

    return jax.lax.map(one, steps)

  return jax.jit(draw)


def _draw_chunk(schedule: ScalarOrSchedule, seed: Seed, start: int,
                stop: int) -> tuple[np.ndarray, np.ndarray]:
  """The coin at steps ``[start, stop)``, and where p(t) is NaN there."""
  static, p = _as_dynamic(schedule)
  try:
    draw = _draw(static)
  except TypeError:  # an unhashable callable: no caching.
    draw = _draw.__wrapped__(static)
  steps = jnp.arange(start, stop, dtype=jnp.int32)
  taken, nan = draw(_coin.as_key(seed), steps, p)
  return np.asarray(taken, dtype=bool), np.asarray(nan, dtype=bool)


def _decide(fn: str, schedule: ScalarOrSchedule, seed: Seed, start: int,
            stop: int) -> np.ndarray:
  """:func:`decisions` without the argument checks."""
  taken, nan = _draw_chunk(schedule, seed, start, stop)
  _raise_on_nan(fn, nan, start)
  return taken


def probabilities(fn: str, schedule: ScalarOrSchedule, total_steps: int
                  ) -> np.ndarray:
  """p(t) for ``t`` in ``[0, total_steps)``, clipped as the coin clips it.

  The caller checks ``schedule`` (:func:`check_schedule`) first.

  Raises:
    ValueError: naming ``fn``, if p(t) is NaN at some step.
  """
  steps = jnp.arange(total_steps, dtype=jnp.int32)
  probs = np.asarray(
      jax.vmap(lambda t: _coin.probability_at(schedule, t))(steps))
  _raise_on_nan(fn, np.isnan(probs), 0)
  return probs


def decisions(
    schedule: ScalarOrSchedule, seed: Seed, start: int, stop: int
) -> np.ndarray:
  """The branches :func:`rst_optax.rst` takes at steps ``[start, stop)``.

  Step ``t``'s entry is ``jax.random.bernoulli(jax.random.fold_in(key, t),
  p(t))`` with ``key`` the seed's key: the same :func:`rst_optax.coin` that the
  transformation draws in its graph, computed in one jitted call (cached per
  schedule), so a training loop can decide on the host, ahead of time and
  without any device-to-host transfer, which compiled step to run.

  Args:
    schedule: the ``schedule`` given to :func:`rst_optax.rst`.
    seed: the ``seed`` given to :func:`rst_optax.rst`.
    start: first step (inclusive), ``>= 0``.
    stop: last step (exclusive), ``>= start`` and ``<= 2**31 - 1``, where the
      transformation's int32 step count stops.

  Returns:
    A NumPy bool array of length ``stop - start``; entry ``i`` is ``True``
    when step ``start + i`` is a SAM step.

  Raises:
    TypeError: if ``schedule`` is neither a number nor a callable that
      returns a real scalar, ``seed`` is neither an int nor a PRNG key, or
      ``start`` or ``stop`` is not an int.
    ValueError: if ``schedule`` is a number outside [0, 1], an int ``seed``
      is outside int64, ``start < 0``, ``stop < start`` or
      ``stop > 2**31 - 1``, or the schedule is NaN at one of the steps (the
      transformation takes no SAM step there; here it is an error).

  Example:
    >>> import rst_optax
    >>> rst_optax.decisions(0.5, seed=0, start=0, stop=8).shape
    (8,)
  """
  check_schedule('decisions', schedule)
  _checks.seed('decisions', seed)
  start = _checks.integer('decisions', 'start', start, 0)
  stop = _checks.integer('decisions', 'stop', stop, start)
  if stop > MAX_STEP:
    raise ValueError(
        f'decisions: `stop` must be <= 2**31 - 1 (the int32 step count); '
        f'got {stop}.')
  return _decide('decisions', schedule, seed, start, stop)


class _Stream(Iterator[bool]):
  """The decisions of steps ``start, start + 1, ...``, drawn a chunk at a
  time; a NaN p(t) raises when its own step is reached, and again at every
  later ``next`` (the stream does not move past it)."""

  def __init__(self, fn: str, schedule: ScalarOrSchedule, seed: Seed,
               start: int, chunk_size: int):
    self._fn, self._schedule, self._seed = fn, schedule, seed
    self._chunk_size = chunk_size
    self._begin = start  # the step of self._taken[0]
    self._taken = np.zeros(0, bool)
    self._nan = np.zeros(0, bool)
    self._at = 0

  def __next__(self) -> bool:
    if self._at == len(self._taken):
      begin = self._begin + len(self._taken)
      if begin >= MAX_STEP:
        raise StopIteration
      stop = min(begin + self._chunk_size, MAX_STEP)
      self._taken, self._nan = _draw_chunk(self._schedule, self._seed, begin,
                                           stop)
      self._begin, self._at = begin, 0
    if self._nan[self._at]:
      _raise_on_nan(self._fn, self._nan[self._at:self._at + 1],
                    self._begin + self._at)
    taken = bool(self._taken[self._at])
    self._at += 1
    return taken


def stream(fn: str, schedule: ScalarOrSchedule, seed: Seed, start: int,
           chunk_size: int) -> Iterator[bool]:
  """:func:`iter_decisions` of checked arguments; errors name ``fn``."""
  return _Stream(fn, schedule, seed, start, chunk_size)


def iter_decisions(
    schedule: ScalarOrSchedule,
    seed: Seed,
    start: int = 0,
    chunk_size: int = 4096,
) -> Iterator[bool]:
  """The branches :func:`rst_optax.rst` takes at steps ``start, start + 1, ...``.

  A lazy generator of Python bools, computed ``chunk_size`` steps at a time as
  :func:`decisions` computes them. It ends only at the int32 step limit
  (``2**31 - 1``), where the transformation's step count stops too.

  Args:
    schedule: the ``schedule`` given to :func:`rst_optax.rst`.
    seed: the ``seed`` given to :func:`rst_optax.rst`.
    start: the first step, ``>= 0``; ``int(opt_state.count)`` to resume.
    chunk_size: steps computed at a time, ``>= 1``.

  Returns:
    An iterator of Python bools; item ``i`` is ``True`` when step
    ``start + i`` is a SAM step. Where the schedule is NaN at step ``t``, it
    yields the items before ``t`` and raises a ValueError at item ``t``
    itself (at each ``next`` from then on), though p(t) is computed a chunk
    at a time.

  Raises:
    TypeError: as :func:`decisions` does, and if ``chunk_size`` is not an int.
    ValueError: as :func:`decisions` does, if ``start`` is outside
      [0, 2**31 - 1], or ``chunk_size < 1``.

  Example:
    >>> import itertools, rst_optax
    >>> it = rst_optax.iter_decisions(0.5, seed=0, start=0, chunk_size=4)
    >>> got = list(itertools.islice(it, 10))
    >>> got == rst_optax.decisions(0.5, seed=0, start=0, stop=10).tolist()
    True
  """
  check_schedule('iter_decisions', schedule)
  _checks.seed('iter_decisions', seed)
  start = _checks.step('iter_decisions', 'start', start, 0)
  chunk_size = _checks.integer('iter_decisions', 'chunk_size', chunk_size, 1)
  return stream('iter_decisions', schedule, seed, start, chunk_size)
