"""Host dispatch: RST's branch decided on the host, one executable per branch.

The decision of step ``t`` is a pure function of ``(schedule, seed, t)``
(:func:`rst_optax.coin`), both read from the ``rst`` transformation itself, so
the host knows it ahead of time without reading anything back from the
device. A train step jitted with ``take_sam`` static then compiles once per
branch, two executables in all, and neither holds a ``cond`` between the
branches: the base step has no control flow from ``rst``, and the SAM step
only, on CPU, the ``jax.lax.cond`` on a scalar that picks how the
perturbation's norm is computed, with no gradient inside. On XLA:CPU this
avoids a large slowdown of convolution gradients inside ``jax.lax.cond`` (jax
issue #12868).
"""

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rst_optax import _checks, _coin, _decisions
from rst_optax._rst import STATE_TYPES, RSTReuseState, RSTState, RSTWindowState

# Any state of rst.
_AnyState = RSTState | RSTReuseState | RSTWindowState


def _as_rst_state(node: Any) -> _AnyState | None:
  """``node`` as an :class:`RSTState` (or :class:`RSTReuseState`,
  :class:`RSTWindowState`), if it is one or a mapping of its fields.

  ``flax.nnx.state`` lays an optimizer's ``RSTState`` out as a mapping from
  field names to variables (an empty ``base_state`` is left out).
  """
  if isinstance(node, STATE_TYPES):
    return node
  if isinstance(node, Mapping) and all(
      field in node for field in ('count', 'key', 'sam_steps')):
    return RSTState(node['count'], node['key'], node['sam_steps'],
                    node.get('base_state'))
  return None


def _rst_states(tree: Any) -> list[_AnyState]:
  """The :class:`RSTState` objects found in ``tree`` (see `_as_rst_state`)."""
  nodes = jax.tree.leaves(
      tree, is_leaf=lambda x: _as_rst_state(x) is not None)
  return [s for s in map(_as_rst_state, nodes) if s is not None]


def _field_arrays(states: list[_AnyState], field: str) -> list[jax.Array]:
  """The ``field`` (``'count'`` or ``'key'``) arrays of ``states``, one per
  state, as arrays this process can read."""
  arrays = []
  for state in states:
    # NNX wraps it in a Variable.
    for leaf in jax.tree.leaves(getattr(state, field)):
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)
      arrays.append(leaf)
  return arrays


def _coin_configs(value: Any) -> list[_coin.CoinConfig]:
  """The coin of ``value`` if it is an ``rst`` transformation, or of its
  ``tx`` attribute (a Flax ``TrainState``, an ``nnx.Optimizer``)."""
  found = []
  for candidate in (value, _attribute(value, 'tx')):
    config = _coin.config_of(candidate)
    if config is not None:
      found.append(config)
  return found


def _attribute(value: Any, name: str) -> Any:
  try:
    return getattr(value, name, None)
  except Exception:  # noqa: BLE001 - a property that fails: nothing there.
    return None


def _name(fn: Any) -> str:
  return getattr(fn, '__qualname__', None) or repr(fn)


def _referenced(fn: Any, depth: int = 2) -> list[tuple[str, Any]]:
  """The values ``fn`` refers to by name, as ``(name, value)``: its closure
  variables and the globals it reads, the arguments of a
  ``functools.partial``, and, ``depth - 1`` levels down, those of the
  functions among them."""
  found: list[tuple[str, Any]] = []
  seen: set[int] = set()

  def visit(f: Any, level: int) -> None:
    if id(f) in seen or level == 0:
      return
    seen.add(id(f))
    if isinstance(f, functools.partial):
      found.extend((f'an argument of functools.partial({_name(f.func)})',
                    v) for v in (*f.args, *f.keywords.values()))
      visit(f.func, level)
      return
    f = getattr(f, '__func__', f)  # a bound method
    if not inspect.isfunction(f):
      return
    try:
      names = inspect.getclosurevars(f)
    except (TypeError, ValueError):
      return
    for name, value in {**names.globals, **names.nonlocals}.items():
      found.append((f'{_name(f)} refers to `{name}`, which', value))
      if inspect.isfunction(value) or isinstance(value, functools.partial):
        visit(value, level - 1)

  visit(fn, depth)
  return found


def _check_same_coin(config: _coin.CoinConfig,
                     values: list[tuple[str, Any]]) -> None:
  """Raises if one of ``values``, given as ``(description, value)``, is (or
  holds) an ``rst`` transformation whose coin is not ``config``'s."""
  for where, value in values:
    for other in _coin_configs(value):
      if not _coin.same_coin(config, other):
        raise ValueError(
            'HostDispatch: `tx` is not the rst transformation that '
            f'train_step uses: {where} is (or holds, as `.tx`) an rst with '
            'another schedule or seed, so the decisions HostDispatch reads '
            "from `tx` would not be that rst's coin. Pass the transformation "
            'whose update train_step calls as `tx`.')


# A check in flight: the step expected, and the counts and keys read back.
_Pending = tuple[int, tuple[list[jax.Array], list[jax.Array]]]


class HostDispatch:
  """Runs a train step with RST's branch chosen on the host, not by a ``cond``.

  Wraps ``train_step(..., take_sam: bool)``, a plain (not yet jitted) function
  that calls ``tx.update(..., take_sam=take_sam)`` once, in ``jax.jit`` with
  ``take_sam`` static, so it compiles at most twice (once per branch). Each
  call runs the current step's decision, from :func:`rst_optax.iter_decisions`
  with ``tx``'s schedule and seed, with no device-to-host transfer. The run
  takes exactly the branches of ``rst``'s in-graph ``lax.cond``, and agrees
  with it to floating-point rounding. Pick it where control flow costs: on
  XLA:CPU a convolution's gradient inside ``lax.cond`` runs 10-100x slower
  (:func:`recommended_dispatch`). Every ``check_every`` calls it checks, off
  the hot path, that ``rst``'s step count moved with the host's, which
  catches wrappers that skip or repeat ``rst``'s update
  (``optax.MultiSteps(rst(...))``, ``optax.apply_if_finite(rst(...))``: wrap
  the *base* optimizer instead). What it checks and refuses:
  :doc:`dispatch`.

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
      many calls; ``0`` or ``None`` turns the check off.
    jit: the function that jits ``train_step``: ``jax.jit``, or for example
      ``flax.nnx.jit`` for NNX objects. It must accept ``static_argnames``,
      except ``equinox.filter_jit``, which holds ``take_sam`` static itself.
    **jit_kwargs: passed to ``jit`` (``donate_argnums``, other
      ``static_argnames``, shardings, ...).

  Raises:
    TypeError, ValueError, RuntimeError: for a bad argument when built, a
      NaN p(t) or a different ``rst`` when called, or a step count that
      drifted from the host's: see :ref:`hostdispatch-errors`.

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
    _check_same_coin(config, _referenced(train_step))
    self._config = config
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
    self._pending: _Pending | None = None
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
    """Runs ``train_step(*args, **kwargs, take_sam=<decision>)`` and steps on.

    Raises:
      ValueError: if p(t) is NaN at this step (the step does not advance),
        or, at the first call, an argument is (or holds as ``.tx``) an
        ``rst`` whose schedule or seed differs from ``tx``'s.
      RuntimeError: at a periodic check, if ``rst``'s step count or key in
        the state a call returned ``check_every`` calls ago is not the
        host's (see the warnings above).
    """
    if self._argname in kwargs:
      raise TypeError(
          f'HostDispatch: do not pass `{self._argname}`; HostDispatch decides '
          'it from the schedule and seed (call .jitted to choose yourself).')
    take_sam = self.take_sam
    if self._calls == 0:  # once: the arguments' rst, as TrainState.tx
      _check_same_coin(self._config, [
          (f"train_step's argument {i}", v) for i, v in enumerate(args)] + [
          (f"train_step's argument `{k}`", v) for k, v in kwargs.items()])
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
                       ) -> tuple[list[jax.Array], list[jax.Array]]:
    """The RSTState counts and keys after a call, their copy to the host
    started.

    From ``train_step``'s output, else from the objects among its arguments
    that it updates in place (an ``nnx.Optimizer``, whose count is held in a
    variable rather than an array). Reading them waits for nothing now.
    """
    states = _rst_states(out) or [
        s for s in _rst_states((args, kwargs))
        if not isinstance(s.count, (jax.Array, np.ndarray))]
    live = lambda c: not (isinstance(c, jax.Array) and c.is_deleted())
    counts = [c for c in _field_arrays(states, 'count') if live(c)]
    keys = [k for k in _field_arrays(states, 'key') if live(k)]
    if not counts:
      raise TypeError(
          'HostDispatch: found no RSTState (the state of rst_optax.rst) in '
          "train_step's output or arguments, so the periodic check of its "
          'step count cannot run: return the optimizer state from train_step, '
          'or pass check_every=0.')
    # A copy on the device, as the next call may donate the state's buffers.
    counts = [jnp.copy(c) for c in counts]
    keys = [jnp.copy(k) for k in keys]
    for array in (*counts, *keys):
      array.copy_to_host_async()
    return counts, keys

  def _compare_pending(self) -> None:
    """Raises if the counts kept at the last check step drifted."""
    if self._pending is None:
      return
    expected, (counts, keys) = self._pending
    self._pending = None
    for key in keys:
      if not self._is_our_key(np.asarray(key)):
        raise RuntimeError(
            "HostDispatch: the key in rst's state is not that of `tx`'s "
            'seed: train_step updates a state made by another rst (another '
            "seed), so the host's decisions do not follow its coin. Pass the "
            'transformation whose update train_step calls as `tx`.')
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
      if not self._is_our_key(keys):
        raise ValueError(
            "HostDispatch.check_state: the optimizer state's key is not that "
            "of `tx`'s seed; was the state made by another rst?")


  def _is_our_key(self, keys: np.ndarray) -> bool:
    """Whether ``keys`` (key data, possibly stacked) is that of our seed."""
    return keys.shape[-1:] == self._key_data.shape[-1:] and bool(
        np.all(keys == self._key_data))


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
