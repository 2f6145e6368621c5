"""The coin of RST: one pure function of (key, step) for graph and host alike.

Both the in-graph branch of :func:`rst_optax.rst` and the host-side
:func:`rst_optax.decisions` call :func:`coin`, so a loop that dispatches on the
host takes exactly the branches the transformation would have taken.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np

from rst_optax import _checks
from rst_optax._types import ScalarOrSchedule, Seed


class CoinConfig(NamedTuple):
  """What decides the coin of an ``rst`` transformation: schedule and seed.

  :func:`rst_optax.rst` attaches it to the ``update`` function it returns, so
  that :class:`rst_optax.HostDispatch` reads it from the transformation itself
  and the two cannot disagree.
  """

  schedule: ScalarOrSchedule
  seed: Seed


_CONFIG_ATTRIBUTE = '_rst_coin'


def attach_config(update_fn: Callable[..., Any], schedule, seed) -> None:
  """Records ``CoinConfig(schedule, seed)`` on ``rst``'s ``update_fn``."""
  setattr(update_fn, _CONFIG_ATTRIBUTE, CoinConfig(schedule, seed))


def config_of(tx: Any) -> CoinConfig | None:
  """The :class:`CoinConfig` of an ``rst`` transformation, else ``None``."""
  config = getattr(getattr(tx, 'update', None), _CONFIG_ATTRIBUTE, None)
  return config if isinstance(config, CoinConfig) else None


# The steps at which two schedules are compared: the first 256, and powers
# of two (and their neighbours) up to the int32 step limit.
_PROBE_STEPS = np.unique(np.clip(np.concatenate([
    np.arange(256),
    *[np.array([2**k - 1, 2**k, 2**k + 1]) for k in range(8, 32)],
]), 0, 2**31 - 1)).astype(np.int32)


def _coin_of(config: CoinConfig) -> tuple[str, np.ndarray, np.ndarray] | None:
  """The key implementation, key data and p(t) at :data:`_PROBE_STEPS` of
  ``config``; None if the schedule cannot be evaluated there."""
  key = as_key(config.seed)
  try:
    probs = np.asarray(jax.jit(jax.vmap(
        lambda t: probability_at(config.schedule, t)))(_PROBE_STEPS))
  except Exception:  # noqa: BLE001 - not comparable; rst would have failed.
    return None
  return (str(jax.random.key_impl(key)),
          np.asarray(jax.random.key_data(key)), probs)


def same_coin(a: CoinConfig, b: CoinConfig) -> bool:
  """Whether ``a`` and ``b`` draw the same coin, as far as can be told.

  True if they are the same configuration, or have the same key and the same
  p(t) at :data:`_PROBE_STEPS` (the first 256 steps, and around every power
  of two): two schedules that differ only elsewhere are taken as the same.
  Also True where a schedule cannot be evaluated on its own (the comparison
  is then left to the step count and key checks).
  """
  if a is b or (a.schedule is b.schedule and a.seed is b.seed):
    return True
  coin_a, coin_b = _coin_of(a), _coin_of(b)
  if coin_a is None or coin_b is None:
    return True
  return (coin_a[0] == coin_b[0] and np.array_equal(coin_a[1], coin_b[1])
          and np.array_equal(coin_a[2], coin_b[2], equal_nan=True))


def as_schedule(value: ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
  """Returns ``value`` itself if it is callable, else a constant schedule."""
  if callable(value):
    return value
  return lambda count: jnp.asarray(value)


def is_python_constant(value, target: float) -> bool:
  """Whether ``value`` is a number known when tracing, equal to ``target``: a
  Python int or float or a NumPy scalar (``np.float32(0.0)``), not an array
  (0-d arrays are what ``optax.inject_hyperparams`` passes)."""
  return (
      _checks._is_real_scalar(value)
      and not isinstance(value, (np.ndarray, jax.Array))
      and float(value) == target
  )


def is_typed_key(value: Any) -> TypeGuard[jax.Array]:
  """Whether ``value`` is a typed PRNG key array (``jax.random.key``)."""
  return isinstance(value, jax.Array) and jnp.issubdtype(
      value.dtype, jax.dtypes.prng_key)


def as_key(seed: Seed) -> jax.Array:
  """Turns an int seed or a PRNG key (typed or raw ``uint32``) into a typed key."""
  if is_typed_key(seed):
    return seed
  if (isinstance(seed, (jax.Array, np.ndarray)) and seed.dtype == jnp.uint32
      and seed.ndim == 1):
    return jax.random.wrap_key_data(seed)
  return jax.random.key(seed)


def probability_at(schedule: ScalarOrSchedule, step: jax.Array) -> jax.Array:
  """p(t): the schedule at ``step``, clipped to [0, 1], as float32.

  A NaN p(t) stays NaN, and the coin then draws ``False``: no SAM step.
  """
  p = as_schedule(schedule)(step)
  return jnp.clip(jnp.asarray(p, jnp.float32), 0.0, 1.0)


def coin(key: jax.Array, step: jax.Array, schedule: ScalarOrSchedule) -> jax.Array:
  """Whether step ``step`` is a SAM step: ``X_t ~ Bernoulli(p(t))``.

  The draw is ``jax.random.bernoulli(jax.random.fold_in(key, step), p(t))``:
  a pure function of the key and the step, with no key splitting, so a run
  resumed at step ``t`` draws what it would have drawn, and every device that
  holds the same key draws the same. A NaN p(t) draws ``False``.

  Args:
    key: a PRNG key: typed (``jax.random.key``) or the raw ``uint32`` key
      data of the default implementation (``jax.random.PRNGKey``).
    step: the step count: an int in ``[0, 2**31 - 1]`` or an integer scalar
      array (as ``rst``'s int32 count).
    schedule: p(t), a float or an ``optax.Schedule``; clipped to [0, 1].

  Returns:
    A boolean scalar.

  Raises:
    TypeError: if ``key`` is not a PRNG key (an int seed, for example), or
      ``step`` is not an integer scalar (a float, for example). Both are
      checked by dtype and shape, when tracing: no cost per step.
    ValueError: if ``step`` is a Python or NumPy int outside
      ``[0, 2**31 - 1]``, or ``key`` is raw key data of the wrong shape.
  """
  _checks.prng_key('coin', 'key', key)
  _checks.step_count('coin', 'step', step)
  step = jnp.asarray(step, jnp.int32)
  return jax.random.bernoulli(
      jax.random.fold_in(key, step), probability_at(schedule, step)
  )
