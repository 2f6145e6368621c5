"""Host dispatch: RST's branch decided on the host, one executable per branch.

The decision of step ``t`` is a pure function of ``(schedule, seed, t)``
(:func:`rst_optax.coin`), both read from the ``rst`` transformation itself, so
the host knows it ahead of time without reading anything back from the
device. A train step jitted with ``take_sam`` static then compiles once per
branch, two executables in all, and runs with no control flow in its graph.
On XLA:CPU this avoids a large slowdown of convolution gradients inside
``jax.lax.cond`` (jax issue #12868).
"""

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rst_optax import _checks, _coin, _decisions
from rst_optax._rst import RSTState


def _as_rst_state(node: Any) -> RSTState | None:
  """``node`` as an :class:`RSTState`, if it is one or a mapping of its fields.

  ``flax.nnx.state`` lays an optimizer's ``RSTState`` out as a mapping from
  field names to variables (an empty ``base_state`` is left out).
  """
  if isinstance(node, RSTState):
    return node
  if isinstance(node, Mapping) and all(
      field in node for field in ('count', 'key', 'sam_steps')):
    return RSTState(node['count'], node['key'], node['sam_steps'],
                    node.get('base_state'))
  return None


def _rst_states(tree: Any) -> list[RSTState]:
  """The :class:`RSTState` objects found in ``tree`` (see `_as_rst_state`)."""
  nodes = jax.tree.leaves(
      tree, is_leaf=lambda x: _as_rst_state(x) is not None)
  return [s for s in map(_as_rst_state, nodes) if s is not None]


def _count_arrays(states: list[RSTState]) -> list[jax.Array]:
  """The ``count`` arrays of ``states``, as arrays this process can read."""
  arrays = []
  for state in states:
    for leaf in jax.tree.leaves(state.count):  # NNX wraps it in a Variable.
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)
      arrays.append(leaf)
  return arrays


class HostDispatch:
  """Runs a train step with RST's branch chosen on the host (no ``lax.cond``).

  Wraps ``train_step(..., take_sam: bool)``, a plain (not yet jitted) function
  that calls ``tx.update(..., take_sam=take_sam)`` once, in ``jax.jit`` with
  ``take_sam`` static, so it compiles at most twice (once per branch). Each
  call runs it with the decision of the current step, from
  :func:`rst_optax.iter_decisions` with the schedule and seed of ``tx``, read
  from the transformation itself, and moves to the next step. The run takes
  exactly the branches, and gives the same results, as the in-graph
  ``lax.cond`` of ``rst``; pass ``jit=flax.nnx.jit`` for NNX objects.

  Pick it where control flow costs: on XLA:CPU a convolution's gradient inside
  ``lax.cond`` runs 10-100x slower than outside (jax issue #12868); see
  :func:`recommended_dispatch`. The decisions need no device-to-host transfer.

  .. warning::
    The host counts calls; ``rst`` counts its ``update`` calls. Every
    ``check_every`` calls, HostDispatch compares the two, off the hot path:
    it keeps the ``RSTState.count`` that a call returned, starts its copy to
    the host, and reads it ``check_every`` calls later. If they differ it
    raises a RuntimeError. This catches wrappers that skip or repeat
    ``rst``'s update, such as ``optax.MultiSteps(rst(...))`` or
    ``optax.apply_if_finite(rst(...))``, which host dispatch does not
    support: wrap the *base* optimizer instead, as in
    ``rst(optax.apply_if_finite(base_tx, n))``, or use the in-graph coin.

  Args:
    train_step: ``train_step(*args, take_sam, **kwargs)``; ``take_sam`` is
      passed by keyword, as a Python bool. It returns (or, with NNX,
      updates in place) the optimizer state holding ``tx``'s
      :class:`RSTState`, which the periodic step check reads.
    tx: the transformation returned by :func:`rst_optax.rst`, whose
      ``update`` ``train_step`` calls; its schedule and seed decide the
      branches.
    start: the first step; ``int(opt_state.count)`` to resume a run.
    chunk_size: decisions computed at a time (see
      :func:`rst_optax.iter_decisions`).
    take_sam_argname: the name of ``train_step``'s decision argument.
    check_every: compare ``rst``'s step count with the host's every this
      many calls (see the warning above); ``0`` or ``None`` turns the
      check off.
    jit: the function that jits ``train_step``: ``jax.jit``, or for example
      ``flax.nnx.jit`` when ``train_step`` takes NNX objects. It must accept
      ``static_argnames``, except ``equinox.filter_jit``, which holds the
      Python bool ``take_sam`` static by itself.
    **jit_kwargs: passed to ``jit`` (``donate_argnums``, other
      ``static_argnames``, shardings, ...).

  Raises:
    TypeError: when built, if ``train_step`` is not callable or does not
      take ``take_sam_argname`` as a keyword argument, ``tx`` is not the
      transformation returned by :func:`rst_optax.rst` (a wrapper around it
      is refused too), ``jit`` is not callable, ``take_sam_argname`` is not a
      parameter name, or ``start``, ``chunk_size`` or ``check_every`` is not
      an int. When called, if ``take_sam`` is passed, or the periodic check
      finds no :class:`RSTState` in ``train_step``'s output or arguments.
    ValueError: when built, if ``start`` is outside [0, 2**31 - 1],
      ``chunk_size < 1``, ``check_every < 0``, or ``tx``'s schedule is not a
      valid probability. When called, if the schedule is NaN at the step.
    RuntimeError: when called, if ``rst``'s step count drifted from the
      host's (see the warning above), or past the int32 step limit.

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
    >>> step = rst_optax.HostDispatch(train_step, tx)
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
      tx: Any,
      *,
      start: int = 0,
      chunk_size: int = 4096,
      take_sam_argname: str = 'take_sam',
      check_every: int | None = 100,
      jit: Callable[..., Callable[..., Any]] = jax.jit,
      **jit_kwargs: Any,
  ):
    """Wraps ``train_step``; the arguments are described on the class."""
    if not callable(train_step):
      raise TypeError(
          f'HostDispatch: `train_step` must be callable; got {train_step!r}.')
    config = _coin.config_of(tx)
    if config is None:
      raise TypeError(
          'HostDispatch: `tx` must be the transformation returned by '
          'rst_optax.rst (HostDispatch reads its schedule and seed), not a '
          'wrapper around it such as optax.MultiSteps, optax.apply_if_finite '
          f'or optax.chain; got {tx!r}.')
    if not callable(jit):
      raise TypeError(f'HostDispatch: `jit` must be callable; got {jit!r}.')
    if not (isinstance(take_sam_argname, str)
            and take_sam_argname.isidentifier()):
      raise TypeError('HostDispatch: `take_sam_argname` must be a parameter '
                      f'name (a str); got {take_sam_argname!r}.')
    _check_takes_keyword(train_step, take_sam_argname)
    self.step = _checks.step('HostDispatch', 'start', start, 0)
    chunk_size = _checks.integer('HostDispatch', 'chunk_size', chunk_size, 1)
    self._check_every = (
        0 if check_every is None else
        _checks.integer('HostDispatch', 'check_every', check_every, 0))
    _decisions.check_schedule('HostDispatch', config.schedule)
    self._decisions = _decisions.stream(
        'HostDispatch', config.schedule, config.seed, self.step, chunk_size)
    self._key_data = np.asarray(
        jax.random.key_data(_coin.as_key(config.seed)))
    self._argname = take_sam_argname
    self._next: bool | None = None
    self._calls = 0
    self._pending: tuple[int, list[jax.Array]] | None = None
    self.sam_steps = 0
    traces = [0]
    self._traces = traces

    @functools.wraps(train_step)
    def counted(*args, **kwargs):
      traces[0] += 1
      return train_step(*args, **kwargs)

    static = jit_kwargs.pop('static_argnames', ())
    static = (static,) if isinstance(static, str) else tuple(static)
    if getattr(jit, '__module__', '').startswith('equinox'):
      # equinox.filter_jit takes no static_argnames: it holds every non-array
      # argument, as the Python bool take_sam, static by itself.
      self.jitted = jit(counted, **jit_kwargs)
    else:
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
    check = self._check_every and self._calls % self._check_every == 0
    if check:
      self._compare_pending()
    out = self.jitted(*args, **kwargs, **{self._argname: take_sam})
    self._next = None
    self.step += 1
    self._calls += 1
    self.sam_steps += take_sam
    if check:
      self._pending = (self.step, self._returned_counts(out, args, kwargs))
    return out

  def _returned_counts(self, out: Any, args: Any, kwargs: Any
                       ) -> list[jax.Array]:
    """The RSTState counts after a call, their copy to the host started.

    From ``train_step``'s output, else from the objects among its arguments
    that it updates in place (an ``nnx.Optimizer``, whose count is held in a
    variable rather than an array). Reading them waits for nothing now.
    """
    states = _rst_states(out) or [
        s for s in _rst_states((args, kwargs))
        if not isinstance(s.count, (jax.Array, np.ndarray))]
    counts = [c for c in _count_arrays(states)
              if not (isinstance(c, jax.Array) and c.is_deleted())]
    if not counts:
      raise TypeError(
          'HostDispatch: found no RSTState (the state of rst_optax.rst) in '
          "train_step's output or arguments, so the periodic check of its "
          'step count cannot run: return the optimizer state from train_step, '
          'or pass check_every=0.')
    # A copy on the device, as the next call may donate the state's buffers.
    counts = [jnp.copy(c) for c in counts]
    for count in counts:
      count.copy_to_host_async()
    return counts

  def _compare_pending(self) -> None:
    """Raises if the counts kept at the last check step drifted."""
    if self._pending is None:
      return
    expected, counts = self._pending
    self._pending = None
    for count in counts:
      got = int(np.asarray(count))
      if got != expected:
        raise RuntimeError(
            f"HostDispatch: rst's step count was {got} after step "
            f'{expected - 1}, where HostDispatch expected {expected}: the '
            "host's decisions no longer follow rst's own coin. The likely "
            'cause is a wrapper that skips or repeats the update of rst, '
            'such as optax.MultiSteps(rst(...)) or '
            'optax.apply_if_finite(rst(...)), which host dispatch does not '
            'support: wrap the base optimizer instead, rst(optax.MultiSteps('
            'base_tx, k)) or rst(optax.apply_if_finite(base_tx, n)), or use '
            'the in-graph coin. Other causes: train_step calls tx.update '
            'other than once, or the state is not at `start` (resume with '
            'start=int(opt_state.count)).')

  def check_state(self, opt_state: Any) -> None:
    """Checks that ``opt_state``'s RST state is at :attr:`step`, with our seed.

    Off the hot path on purpose: it reads the step count back from the device,
    which waits for the steps in flight. Call it where you sync anyway (at
    logging or checkpoints, or once after resuming).

    Args:
      opt_state: an optimizer state holding one or more :class:`RSTState`.

    Raises:
      ValueError: if no :class:`RSTState` is found, its ``count`` differs from
        :attr:`step`, or its key is not that of ``tx``'s ``seed``.
    """
    found = _rst_states(opt_state)
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
            "HostDispatch.check_state: the optimizer state's key is not that "
            "of `tx`'s seed; was the state made by another rst?")


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
