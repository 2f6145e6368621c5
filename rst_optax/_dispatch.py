"""Host dispatch: RST's branch decided on the host, one executable per branch.

The decision of step ``t`` is a pure function of ``(schedule, seed, t)``
(:func:`rst_optax.coin`), so the host knows it ahead of time without reading
anything back from the device. A train step jitted with ``take_sam`` static
then compiles once per branch, two executables in all, and runs with no
control flow in its graph. On XLA:CPU this avoids a large slowdown of
convolution gradients inside ``jax.lax.cond`` (jax issue #12868).
"""

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from rst_optax import _checks, _coin
from rst_optax._rst import RSTState


def iter_decisions(
    schedule: _coin.ScalarOrSchedule,
    seed: _coin.Seed,
    start: int = 0,
    chunk_size: int = 4096,
) -> Iterator[bool]:
  """The branches :func:`rst_optax.rst` takes at steps ``start, start + 1, ...``.

  A lazy generator of Python bools, computed ``chunk_size`` steps at a time by
  :func:`rst_optax.decisions`, which calls the same :func:`rst_optax.coin` as
  the transformation's graph. It ends only at the int32 step limit
  (``2**31 - 1``), where the transformation's step count stops too.

  Args:
    schedule: the ``schedule`` given to :func:`rst_optax.rst`.
    seed: the ``seed`` given to :func:`rst_optax.rst`.
    start: the first step, ``>= 0``; ``int(opt_state.count)`` to resume.
    chunk_size: steps computed per call of :func:`rst_optax.decisions`,
      ``>= 1``.

  Returns:
    An iterator of Python bools; item ``i`` is ``True`` when step
    ``start + i`` is a SAM step.

  Example:
    >>> import itertools, rst_optax
    >>> it = rst_optax.iter_decisions(0.5, seed=0, start=0, chunk_size=4)
    >>> got = list(itertools.islice(it, 10))
    >>> got == rst_optax.decisions(0.5, seed=0, start=0, stop=10).tolist()
    True
  """
  return _decision_stream('iter_decisions', schedule, seed, start, chunk_size)


def _decision_stream(fn, schedule, seed, start, chunk_size) -> Iterator[bool]:
  """:func:`iter_decisions`, with errors raised in the name of ``fn``."""
  _checks.number(fn, 'schedule', schedule, low=0.0, high=1.0,
                 allow_schedule=True)
  _checks.seed(fn, seed)
  start = _checks.integer(fn, 'start', start, 0)
  chunk_size = _checks.integer(fn, 'chunk_size', chunk_size, 1)

  def generate() -> Iterator[bool]:
    begin = start
    while begin < _coin.MAX_STEP:
      stop = min(begin + chunk_size, _coin.MAX_STEP)
      yield from _coin.decisions(schedule, seed, begin, stop).tolist()
      begin = stop

  return generate()


class HostDispatch:
  """Runs a train step with RST's branch chosen on the host (no ``lax.cond``).

  Wraps ``train_step(..., take_sam: bool)``, a plain (not yet jitted) function
  that calls ``tx.update(..., take_sam=take_sam)`` for an ``rst``
  transformation ``tx``, in ``jax.jit`` with ``take_sam`` static, so it
  compiles at most twice (once per branch). Each call runs it with the
  decision of the current step, from :func:`iter_decisions` with the
  ``schedule`` and ``seed`` given to ``rst``, and moves to the next step. The
  run takes exactly the branches, and gives the same results, as the in-graph
  ``lax.cond`` of ``rst``; pass ``jit=flax.nnx.jit`` for NNX objects.

  Pick it where control flow costs: on XLA:CPU a convolution's gradient inside
  ``lax.cond`` runs 10-100x slower than outside (jax issue #12868); see
  :func:`recommended_dispatch`. The decisions need no device-to-host transfer.

  Attributes:
    step: the step the next call runs (``start`` plus the calls so far).
    sam_steps: the SAM steps taken through this object.
    take_sam: the decision of the next call, a Python bool.
    compilations: how many times ``train_step`` was traced (and compiled).
    jitted: the jitted ``train_step`` (takes ``take_sam`` explicitly).

  Example:
    >>> import jax, jax.numpy as jnp, optax, rst_optax
    >>> loss = lambda w, x: jnp.sum((w - x) ** 2)
    >>> tx = rst_optax.rst(optax.sgd(0.1), schedule=0.5, seed=0)
    >>> def train_step(w, state, x, take_sam):
    ...   g = jax.grad(loss)(w, x)
    ...   u, state = tx.update(g, state, w, take_sam=take_sam,
    ...                        grad_fn=lambda v: jax.grad(loss)(v, x))
    ...   return optax.apply_updates(w, u), state
    >>> step = rst_optax.HostDispatch(train_step, schedule=0.5, seed=0)
    >>> w = jnp.zeros(3)
    >>> state = tx.init(w)
    >>> for _ in range(8):
    ...   w, state = step(w, state, jnp.ones(3))
    >>> step.step, step.compilations, step.sam_steps == int(state.sam_steps)
    (8, 2, True)
  """

  def __init__(
      self,
      train_step: Callable[..., Any],
      schedule: _coin.ScalarOrSchedule,
      seed: _coin.Seed,
      *,
      start: int = 0,
      chunk_size: int = 4096,
      take_sam_argname: str = 'take_sam',
      jit: Callable[..., Callable[..., Any]] = jax.jit,
      **jit_kwargs: Any,
  ):
    """Wraps ``train_step``.

    Args:
      train_step: ``train_step(*args, take_sam, **kwargs)``; ``take_sam`` is
        passed by keyword, as a Python bool.
      schedule: the ``schedule`` given to :func:`rst_optax.rst`.
      seed: the ``seed`` given to :func:`rst_optax.rst`.
      start: the first step; ``int(opt_state.count)`` to resume a run.
      chunk_size: decisions computed at a time (see :func:`iter_decisions`).
      take_sam_argname: the name of ``train_step``'s decision argument.
      jit: the function that jits ``train_step``: ``jax.jit``, or for example
        ``flax.nnx.jit`` when ``train_step`` takes NNX objects. It must accept
        ``static_argnames``.
      **jit_kwargs: passed to ``jit`` (``donate_argnums``, other
        ``static_argnames``, shardings, ...).
    """
    if not callable(train_step):
      raise TypeError(
          f'HostDispatch: `train_step` must be callable; got {train_step!r}.')
    if not callable(jit):
      raise TypeError(f'HostDispatch: `jit` must be callable; got {jit!r}.')
    if not (isinstance(take_sam_argname, str)
            and take_sam_argname.isidentifier()):
      raise TypeError('HostDispatch: `take_sam_argname` must be a parameter '
                      f'name (a str); got {take_sam_argname!r}.')
    _check_takes_keyword(train_step, take_sam_argname)
    self._decisions = _decision_stream(
        'HostDispatch', schedule, seed, start, chunk_size)
    self._key_data = np.asarray(jax.random.key_data(_coin.as_key(seed)))
    self._argname = take_sam_argname
    self._next: bool | None = None
    self.step = _checks.integer('HostDispatch', 'start', start, 0)
    self.sam_steps = 0
    traces = [0]
    self._traces = traces

    @functools.wraps(train_step)
    def counted(*args, **kwargs):
      traces[0] += 1
      return train_step(*args, **kwargs)

    static = jit_kwargs.pop('static_argnames', ())
    static = (static,) if isinstance(static, str) else tuple(static)
    self.jitted = jit(
        counted, static_argnames=(*static, take_sam_argname), **jit_kwargs)

  @property
  def take_sam(self) -> bool:
    """The decision of the next call (step :attr:`step`)."""
    if self._next is None:
      try:
        self._next = next(self._decisions)
      except StopIteration:
        raise RuntimeError(
            f'HostDispatch: step {self.step} is past the int32 step limit of '
            'rst_optax.rst.') from None
    return self._next

  @property
  def compilations(self) -> int:
    """How many times ``train_step`` was traced, hence compiled (at most 2)."""
    return self._traces[0]

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    """Runs ``train_step(*args, **kwargs, take_sam=<decision>)`` and steps on."""
    if self._argname in kwargs:
      raise TypeError(
          f'HostDispatch: do not pass `{self._argname}`; HostDispatch decides '
          'it from the schedule and seed (call .jitted to choose yourself).')
    take_sam = self.take_sam
    out = self.jitted(*args, **kwargs, **{self._argname: take_sam})
    self._next = None
    self.step += 1
    self.sam_steps += take_sam
    return out

  def check_state(self, opt_state: Any) -> None:
    """Checks that ``opt_state``'s RST state is at :attr:`step`, with our seed.

    Off the hot path on purpose: it reads the step count back from the device,
    which waits for the steps in flight. Call it where you sync anyway (at
    logging or checkpoints, or once after resuming).

    Args:
      opt_state: an optimizer state holding one or more :class:`RSTState`.

    Raises:
      ValueError: if no :class:`RSTState` is found, its ``count`` differs from
        :attr:`step`, or its key is not that of this object's ``seed``.
    """
    found = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, RSTState))
             if isinstance(s, RSTState)]
    if not found:
      raise ValueError(
          'HostDispatch.check_state: `opt_state` holds no RSTState (the state '
          'of rst_optax.rst).')
    for state in found:
      counts = np.asarray(jax.device_get(jax.tree.leaves(state.count)))
      if np.any(counts != self.step):
        raise ValueError(
            f'HostDispatch.check_state: the optimizer state is at step '
            f'{counts.ravel()[0]} but HostDispatch at step {self.step}; to '
            'resume, build it with start=int(opt_state.count).')
      keys = np.asarray(jax.device_get(jax.tree.leaves(state.key)))
      if keys.shape[-1:] != self._key_data.shape[-1:] or np.any(
          keys != self._key_data):
        raise ValueError(
            'HostDispatch.check_state: the optimizer state\'s key is not that '
            'of HostDispatch\'s `seed`; give both the same seed.')


def _check_takes_keyword(fn: Callable[..., Any], name: str) -> None:
  """Raises a TypeError unless ``fn`` accepts the keyword argument ``name``."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # No signature to read: trust the caller.
    return
  param = params.get(name)
  if param is not None and param.kind in (
      inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
    return
  if param is None and any(
      p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  raise TypeError(
      f'HostDispatch: `train_step` must accept `{name}` as a keyword argument '
      f'(and pass it to tx.update(..., take_sam={name})); its signature is '
      f'{inspect.signature(fn)}.')


def recommended_dispatch() -> str:
  """The dispatch mode that suits the default backend: ``'host'`` or ``'cond'``.

  ``'host'`` (:class:`HostDispatch`) on CPU, where XLA runs a convolution's
  gradient inside ``jax.lax.cond`` 10-100x slower than outside (jax issue
  #12868; dense layers are not affected); ``'cond'`` (a plain ``jax.jit`` of
  the train step, the coin drawn in the graph) on GPU and TPU, which do not
  have this problem and where one executable holding both branches is the
  simplest.

  Returns:
    ``'host'`` if ``jax.default_backend() == 'cpu'``, else ``'cond'``.

  Example:
    >>> import rst_optax
    >>> rst_optax.recommended_dispatch() in ('host', 'cond')
    True
  """
  return 'host' if jax.default_backend() == 'cpu' else 'cond'
