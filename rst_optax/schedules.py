"""Scheduling functions p(t) for RST: the probability of a SAM step at step t.

Each family returns an ``optax.Schedule`` (a callable of the step count), so
they mix freely with Optax's own schedules, and any Optax schedule can serve
as p(t). :func:`mean_probability` gives a run's expected extra cost and
:func:`matching_lam` the G-RST weight that matches SAM's regularization.

References:
  Zhao, Zhang & Hu, `Randomized Sharpness-Aware Training for Boosting
  Computational Efficiency in Deep Learning
  <https://arxiv.org/abs/2203.09962>`_, 2022.
"""

import jax.numpy as jnp
import numpy as np
import optax

from rst_optax import _checks, _decisions
from rst_optax._types import MAX_STEP, ScalarOrSchedule

__all__ = [
    'FAMILIES',
    'constant',
    'family',
    'linear',
    'matching_lam',
    'mean_probability',
    'periodic',
    'piecewise',
    'trigonometric',
]


def constant(p: float) -> optax.Schedule:
  r"""A SAM step with the same probability at every step: :math:`p(t) = p`.

  Args:
    p: the probability, in [0, 1].

  Returns:
    An ``optax.Schedule``.

  Raises:
    TypeError: if ``p`` is not a real number (a bool or a string is
      not).
    ValueError: if it is outside [0, 1] or not finite.

  Example:
    >>> from rst_optax import schedules
    >>> float(schedules.constant(0.3)(10))
    0.3...
  """
  return optax.constant_schedule(_checks.probability('constant', 'p', p))


def piecewise(p_before: float, p_after: float, boundary: int) -> optax.Schedule:
  r"""Two levels: :math:`p(t) = p_\text{before}` for :math:`t < b`, then
  :math:`p_\text{after}`.

  ``piecewise(0, 1, b)`` is "SGD then SAM", ``piecewise(1, 0, b)`` "SAM then
  SGD", ``piecewise(P, 1 - P, T // 2)`` the paper's two-level schedule.

  Args:
    p_before: probability for steps ``t < boundary``, in [0, 1].
    p_after: probability from step ``boundary`` on, in [0, 1].
    boundary: the first step of the second level, ``>= 0``.

  Returns:
    An ``optax.Schedule``.

  Raises:
    TypeError: if ``p_before`` or ``p_after`` is not a real number, or
      ``boundary`` not an int.
    ValueError: if a probability is outside [0, 1], or ``boundary`` outside
      [0, 2**31 - 1] (the int32 step count).

  Example:
    >>> from rst_optax import schedules
    >>> s = schedules.piecewise(0.0, 1.0, boundary=100)
    >>> float(s(99)), float(s(100))
    (0.0, 1.0)
  """
  before = _checks.probability('piecewise', 'p_before', p_before)
  after = _checks.probability('piecewise', 'p_after', p_after)
  boundary = _checks.step('piecewise', 'boundary', boundary, 0)
  return optax.join_schedules(
      [optax.constant_schedule(before), optax.constant_schedule(after)],
      [boundary],
  )


def linear(p_start: float, p_end: float, total_steps: int) -> optax.Schedule:
  r"""A straight line from ``p_start`` at step 0 to ``p_end`` at ``total_steps``.

  .. math:: p(t) = p_\text{start} + (p_\text{end} - p_\text{start})
     \min(t / T, 1).

  The paper's "linear increasing" schedule of mean :math:`P` is
  ``linear(max(0, 2P - 1), min(1, 2P), T)``.

  Args:
    p_start: probability at step 0, in [0, 1].
    p_end: probability at ``total_steps`` and after, in [0, 1].
    total_steps: :math:`T`, ``>= 1``.

  Returns:
    An ``optax.Schedule``.

  Raises:
    TypeError: if ``p_start`` or ``p_end`` is not a real number, or
      ``total_steps`` not an int.
    ValueError: if a probability is outside [0, 1], or ``total_steps``
      outside [1, 2**31 - 1] (the int32 step count).

  Example:
    >>> from rst_optax import schedules
    >>> float(schedules.linear(0.0, 1.0, total_steps=10)(5))
    0.5
  """
  return optax.linear_schedule(
      _checks.probability('linear', 'p_start', p_start),
      _checks.probability('linear', 'p_end', p_end),
      _checks.step('linear', 'total_steps', total_steps, 1),
  )


def trigonometric(
    p_start: float, p_end: float, total_steps: int
) -> optax.Schedule:
  r"""A half cosine wave from ``p_start`` at step 0 to ``p_end`` at ``total_steps``.

  .. math:: p(t) = p_\text{end} + (p_\text{start} - p_\text{end})
     \tfrac{1}{2}\bigl(1 + \cos(\pi \min(t / T, 1))\bigr).

  It stays near ``p_start`` early and near ``p_end`` late, with mean
  :math:`(p_\text{start} + p_\text{end}) / 2`; ``p_start < p_end`` gives a
  rising (sine-shaped) schedule, ``p_start > p_end`` a falling one.

  Args:
    p_start: probability at step 0, in [0, 1].
    p_end: probability at ``total_steps`` and after, in [0, 1].
    total_steps: :math:`T`, ``>= 1``.

  Returns:
    An ``optax.Schedule``.

  Raises:
    TypeError: if ``p_start`` or ``p_end`` is not a real number, or
      ``total_steps`` not an int.
    ValueError: if a probability is outside [0, 1], or ``total_steps``
      outside [1, 2**31 - 1] (the int32 step count).

  Example:
    >>> from rst_optax import schedules
    >>> s = schedules.trigonometric(0.0, 1.0, total_steps=100)
    >>> float(s(0)), float(s(50)), float(s(100))
    (0.0, 0.5, 1.0)
  """
  start = _checks.probability('trigonometric', 'p_start', p_start)
  end = _checks.probability('trigonometric', 'p_end', p_end)
  total = _checks.step('trigonometric', 'total_steps', total_steps, 1)

  def schedule(count):
    frac = jnp.minimum(jnp.asarray(count, jnp.float32) / total, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

  return schedule


def periodic(every: int) -> optax.Schedule:
  r"""A SAM step at every ``every``-th step, and none between: no coin at all.

  .. math:: p(t) = \begin{cases} 1 & t \bmod k = k - 1 \\ 0 &
     \text{otherwise} \end{cases}

  with :math:`k` = ``every``. A probability of exactly 1 or 0 makes the coin
  of :func:`rst_optax.rst` certain, so the run is deterministic: SAM at steps
  :math:`k - 1, 2k - 1, \dots`, mean probability :math:`1 / k`. With
  ``lam=matching_lam(...)`` (:math:`\lambda = k`) this is the periodic SAM
  of init2winit's ``factor_sam``.

  Args:
    every: :math:`k`, the period in steps, ``>= 1`` (1: SAM at every step).

  Returns:
    An ``optax.Schedule``.

  Raises:
    TypeError: if ``every`` is not an int (a bool is not).
    ValueError: if it is outside [1, 2**31 - 1] (the int32 step count).

  Example:
    >>> from rst_optax import schedules
    >>> s = schedules.periodic(4)
    >>> [float(s(t)) for t in range(8)]
    [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
  """
  k = _checks.step('periodic', 'every', every, 1)

  def schedule(count):
    return (jnp.asarray(count) % k == k - 1).astype(jnp.float32)

  return schedule


#: The names :func:`family` accepts.
FAMILIES = ('constant', 'piecewise', 'linear', 'trigonometric', 'periodic')


def family(name: str, mean_p: float, total_steps: int) -> optax.Schedule:
  r"""The schedule of the family ``name`` whose mean over the run is ``mean_p``.

  With :math:`P` = ``mean_p`` and :math:`T` = ``total_steps``:

  - ``'constant'``: :math:`p(t) = P`.
  - ``'piecewise'``: SGD then SAM, ``piecewise(0, 1, round((1 - P) T))``:
    no SAM step, then a SAM step at every step of the last :math:`P` of the
    run.
  - ``'linear'``: ``linear(max(0, 2P - 1), min(1, 2P), T)``, the paper's
    "linear increasing" schedule.
  - ``'trigonometric'``: ``trigonometric(max(0, 2P - 1), min(1, 2P), T)``,
    rising along a half cosine between the same ends.
  - ``'periodic'``: ``periodic(1 / P)``, a SAM step every :math:`1 / P`
    steps, deterministic; :math:`1 / P` must be a whole number (P = 0.5,
    0.25, 0.2, ...), or P = 0 (never).

  Each has :func:`mean_probability` :math:`P` over ``[0, T)``, up to
  :math:`1 / (2T)` from the discrete steps (``'periodic'``: up to
  :math:`1 / T`), so runs of different families cost the same on average.

  Args:
    name: one of :data:`FAMILIES`.
    mean_p: :math:`P`, the mean probability of a SAM step, in [0, 1].
    total_steps: :math:`T`, the run's length, ``>= 1``.

  Returns:
    An ``optax.Schedule``.

  Raises:
    ValueError: if ``name`` is not in :data:`FAMILIES`, ``mean_p`` or
      ``total_steps`` is out of range, or, for ``'periodic'``, ``mean_p`` is
      not 0 nor 1/k for a whole number k in [1, 2**31 - 1] (up to a relative
      1e-9).
    TypeError: if ``mean_p`` or ``total_steps`` is not a number.

  Example:
    >>> from rst_optax import schedules
    >>> s = schedules.family('linear', 0.25, total_steps=1000)
    >>> round(schedules.mean_probability(s, 1000), 3)
    0.25
  """
  if not isinstance(name, str) or name not in FAMILIES:
    raise ValueError(
        f'family: `name` must be one of {FAMILIES}; got {name!r}.')
  p = _checks.probability('family', 'mean_p', mean_p)
  total = _checks.step('family', 'total_steps', total_steps, 1)
  if name == 'constant':
    return constant(p)
  if name == 'piecewise':
    return piecewise(0.0, 1.0, round((1.0 - p) * total))
  if name == 'periodic':
    if p == 0.0:
      return constant(0.0)
    every = round(1.0 / p)
    if abs(every * p - 1.0) > 1e-9 or every > MAX_STEP:
      raise ValueError(
          "family: for name='periodic', `mean_p` must be 1/k for a whole "
          'number k in [1, 2**31 - 1] (0.5, 0.25, 0.2, ...) or 0; got '
          f'{mean_p!r}.')
    return periodic(every)
  low, high = max(0.0, 2.0 * p - 1.0), min(1.0, 2.0 * p)
  if name == 'linear':
    return linear(low, high, total)
  return trigonometric(low, high, total)


def mean_probability(
    schedule: ScalarOrSchedule, total_steps: int
) -> float:
  r"""Mean SAM probability over steps ``[0, total_steps)``: the expected extra cost.

  .. math:: \bar p = \frac{1}{T} \sum_{t=0}^{T-1} \operatorname{clip}(p(t), 0, 1).

  A run of :math:`T` steps costs :math:`T (1 + \bar p)` forward-backward passes
  on average (SAM: :math:`2T`).

  Args:
    schedule: a float or an ``optax.Schedule``, as given to
      :func:`rst_optax.rst`.
    total_steps: :math:`T`, ``>= 1``.

  Returns:
    :math:`\bar p` as a Python float.

  Raises:
    TypeError: if ``schedule`` is neither a number nor a callable returning a
      real scalar.
    ValueError: if it is a number outside [0, 1], or p(t) is NaN at a step.

  Example:
    >>> from rst_optax import schedules
    >>> round(schedules.mean_probability(schedules.linear(0., 1., 1000), 1000), 4)
    0.4995
  """
  return _mean_probability('mean_probability', schedule, total_steps)


def _mean_probability(fn: str, schedule, total_steps) -> float:
  """:func:`mean_probability`, with errors raised in the name of ``fn``."""
  _decisions.check_schedule(fn, schedule)
  total = _checks.step(fn, 'total_steps', total_steps, 1)
  probs = _decisions.probabilities(fn, schedule, total)
  return float(np.mean(probs, dtype=np.float64))


def matching_lam(
    schedule: ScalarOrSchedule, total_steps: int, target: float = 1.0
) -> float:
  r"""The G-RST weight :math:`\lambda` that matches ``target`` times SAM's strength.

  In expectation over the coin, G-RST penalizes sharpness with weight
  :math:`\bar p \lambda` relative to SAM, so

  .. math:: \lambda = \text{target} / \bar p.

  For example ``lam = 2`` at :math:`\bar p = 0.5`.

  Args:
    schedule: a float or an ``optax.Schedule``.
    total_steps: the run's length :math:`T`, ``>= 1``.
    target: the wanted expected weight relative to SAM, a finite number > 0.

  Returns:
    :math:`\lambda` as a Python float.

  Raises:
    ValueError: if the schedule's mean probability is 0 (no SAM step at all),
      and as :func:`mean_probability` does.

  Example:
    >>> from rst_optax import schedules
    >>> schedules.matching_lam(0.5, total_steps=100)
    2.0
  """
  _checks.number('matching_lam', 'target', target, low=0.0, low_open=True)
  mean_p = _mean_probability('matching_lam', schedule, total_steps)
  if mean_p <= 0.0:
    raise ValueError(
        'matching_lam: the schedule never takes a SAM step over '
        f'total_steps={total_steps} (mean probability 0); no lam can match.')
  return float(target) / mean_p
