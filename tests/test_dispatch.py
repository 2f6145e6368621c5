"""Host dispatch and the host-side decisions: HostDispatch, decisions,
iter_decisions, recommended_dispatch."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import rst_optax
from rst_optax import _decisions, schedules

SEED = 3
STEPS = 24
KEY_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')


def _loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] - y) ** 2)


def _problem():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {
      'w1': jax.random.normal(k1, (8, 16)) / 3.0,
      'b1': jnp.zeros(16),
      'w2': jax.random.normal(k2, (16, 2)) / 4.0,
  }
  batch = (jax.random.normal(k3, (32, 8)), jax.random.normal(k4, (32, 2)))
  return params, batch


def _tx(schedule, seed=SEED):
  return rst_optax.rst(optax.sgd(0.05, momentum=0.9), schedule, rho=0.1,
                       lam=2.0, seed=seed)


def _train_step(tx, wrap=lambda tx: tx):
  """A train step calling ``wrap(tx).update`` once."""
  outer = wrap(tx)

  def train_step(params, opt_state, batch, take_sam=None):
    grads = jax.grad(_loss)(params, batch)
    updates, opt_state = outer.update(
        grads, opt_state, params, take_sam=take_sam,
        grad_fn=lambda p: jax.grad(_loss)(p, batch))
    return optax.apply_updates(params, updates), opt_state
  return train_step


def _run(step, params, opt_state, batch, steps):
  for _ in range(steps):
    params, opt_state = step(params, opt_state, batch)
  return params, opt_state


SCHEDULES = {
    'constant': 0.5,
    'linear': schedules.linear(0.1, 0.9, total_steps=STEPS),
}


# HostDispatch: the same run as the in-graph coin, two executables.


@pytest.mark.parametrize('name', SCHEDULES)
def test_host_and_cond_trajectories_are_identical(name):
  schedule = SCHEDULES[name]
  taken = rst_optax.decisions(schedule, SEED, 0, STEPS)
  assert 0 < taken.sum() < STEPS  # Both branches occur in the run.
  params, batch = _problem()
  tx = _tx(schedule)
  train_step = _train_step(tx)

  cond = _run(jax.jit(train_step), params, tx.init(params), batch, STEPS)
  host_step = rst_optax.HostDispatch(train_step, tx, check_every=5)
  host = _run(host_step, params, tx.init(params), batch, STEPS)

  # Bit-identical: the same ops run in both modes on XLA:CPU.
  chex.assert_trees_all_equal(cond, host)
  assert host_step.step == STEPS
  assert host_step.sam_steps == int(host[1].sam_steps) == taken.sum()


def test_host_dispatch_reads_schedule_and_seed_from_tx():
  # Another rst with another schedule and seed: its own decisions are taken.
  schedule = schedules.linear(0.9, 0.1, total_steps=STEPS)
  tx = _tx(schedule, seed=SEED + 7)
  params, batch = _problem()
  step = rst_optax.HostDispatch(_train_step(tx), tx)
  taken = []
  state = tx.init(params)
  for _ in range(STEPS):
    taken.append(step.take_sam)
    params, state = step(params, state, batch)
  assert taken == rst_optax.decisions(schedule, SEED + 7, 0, STEPS).tolist()
  assert taken != rst_optax.decisions(schedule, SEED, 0, STEPS).tolist()
  assert step.sam_steps == int(state.sam_steps)


def _other_rst_steps():
  """Train steps that reach an rst of another coin than ``_tx(0.5)``'s."""
  other = _tx(0.3)  # the same seed, another schedule
  plain = _train_step(other)

  def by_closure(params, opt_state, batch, take_sam):
    return plain(params, opt_state, batch, take_sam)

  def by_partial(tx, params, opt_state, batch, take_sam):
    return _train_step(tx)(params, opt_state, batch, take_sam)

  return other, {
      'closure': plain,
      'nested-closure': by_closure,
      'partial': functools.partial(by_partial, other),
  }


@pytest.mark.parametrize('how', ['closure', 'nested-closure', 'partial'])
def test_host_dispatch_refuses_an_rst_other_than_tx(how):
  other, steps = _other_rst_steps()
  with pytest.raises(ValueError, match='HostDispatch: `tx` is not the rst '
                     'transformation that train_step uses.*another schedule'):
    rst_optax.HostDispatch(steps[how], _tx(0.5))
  with pytest.raises(ValueError, match='another schedule or seed'):
    rst_optax.HostDispatch(steps[how], _tx(0.3, seed=SEED + 1))
  # The same rst, or another with the same schedule and seed: accepted.
  rst_optax.HostDispatch(steps[how], other)
  rst_optax.HostDispatch(steps[how], _tx(0.3))


@pytest.mark.parametrize('step', [16, 100, 255])
def test_host_dispatch_compares_the_first_256_steps_of_the_schedules(step):
  """Two schedules that differ at one step among the first 256 draw other
  coins: HostDispatch refuses the pair."""
  other = _tx(lambda t: jnp.where(t == step, 0.9, 0.5))
  with pytest.raises(ValueError, match='another schedule or seed'):
    rst_optax.HostDispatch(_train_step(other), _tx(0.5))


def test_host_dispatch_refuses_a_train_state_of_another_rst():
  from rst_optax import flax_utils

  params, batch = _problem()

  def train_step(state, batch, take_sam):
    grads = jax.grad(_loss)(state.params, batch)
    return state.apply_gradients(
        grads=grads, take_sam=take_sam,
        grad_fn=lambda p: jax.grad(_loss)(p, batch))

  state = flax_utils.TrainState.create(apply_fn=None, params=params,
                                       tx=_tx(0.3))
  step = rst_optax.HostDispatch(train_step, _tx(0.5))
  with pytest.raises(ValueError, match="train_step's argument 0 is .*an rst "
                     'with another schedule or seed'):
    step(state, batch)
  assert step.step == 0
  same = rst_optax.HostDispatch(train_step, _tx(0.3))
  assert int(same(state, batch).step) == same.step == 1


def test_the_periodic_check_catches_the_state_of_another_seed():
  """An rst that HostDispatch cannot see (in a list): its key is read."""
  hidden = [_tx(0.5, seed=SEED + 1)]

  def train_step(params, opt_state, batch, take_sam):
    return _train_step(hidden[0])(params, opt_state, batch, take_sam)

  params, batch = _problem()
  step = rst_optax.HostDispatch(train_step, _tx(0.5), check_every=2)
  with pytest.raises(RuntimeError, match="key in rst's state is not that of "
                     "`tx`'s seed"):
    _run(step, params, hidden[0].init(params), batch, STEPS)
  assert step.step == 2


def test_host_dispatch_compiles_once_per_branch(compilations):
  params, batch = _problem()
  tx = _tx(0.5)
  with compilations() as counts:
    step = rst_optax.HostDispatch(_train_step(tx), tx)
    _run(step, params, tx.init(params), batch, STEPS)
  assert 0 < step.sam_steps < STEPS
  assert counts['train_step'] == step.compilations == 2


def test_host_dispatch_compiles_once_with_one_branch(compilations):
  # p = 0 for the first STEPS steps: only the base branch runs.
  tx = _tx(schedules.piecewise(0.0, 1.0, boundary=STEPS))
  params, batch = _problem()
  with compilations() as counts:
    step = rst_optax.HostDispatch(_train_step(tx), tx)
    _run(step, params, tx.init(params), batch, STEPS)
  assert step.sam_steps == 0
  assert counts['train_step'] == step.compilations == 1


def test_in_graph_cond_compiles_once(compilations):
  params, batch = _problem()
  tx = _tx(0.5)
  with compilations() as counts:
    _, state = _run(jax.jit(_train_step(tx)), params, tx.init(params), batch,
                    STEPS)
  assert 0 < int(state.sam_steps) < STEPS
  assert counts['train_step'] == 1


def test_resume_with_start_continues_the_run():
  schedule = schedules.linear(0.2, 0.8, total_steps=STEPS)
  params, batch = _problem()
  tx = _tx(schedule)
  train_step = _train_step(tx)
  first = rst_optax.HostDispatch(train_step, tx, check_every=3)
  half = _run(first, params, tx.init(params), batch, STEPS // 2)
  full = _run(first, *half, batch, STEPS - STEPS // 2)

  resumed = rst_optax.HostDispatch(train_step, tx, start=int(half[1].count),
                                   check_every=3)
  assert resumed.step == STEPS // 2
  resumed.check_state(half[1])
  decisions = []
  params, state = half
  for _ in range(STEPS - STEPS // 2):
    decisions.append(resumed.take_sam)
    params, state = resumed(params, state, batch)

  expected = rst_optax.decisions(schedule, SEED, STEPS // 2, STEPS)
  assert decisions == expected.tolist()
  chex.assert_trees_all_equal(full, (params, state))


def test_check_state_rejects_a_wrong_step_or_seed():
  params, batch = _problem()
  tx = _tx(0.5)
  state = _run(rst_optax.HostDispatch(_train_step(tx), tx),
               params, tx.init(params), batch, 3)[1]
  # Found when nested, e.g. in optax.chain or a larger training state.
  rst_optax.HostDispatch(_train_step(tx), tx, start=3).check_state(
      {'opt': (optax.EmptyState(), state)})
  with pytest.raises(ValueError, match='start=int'):
    rst_optax.HostDispatch(_train_step(tx), tx).check_state(state)
  other = _tx(0.5, seed=SEED + 1)
  with pytest.raises(ValueError, match='seed'):
    rst_optax.HostDispatch(_train_step(other), other, start=3).check_state(
        state)
  with pytest.raises(ValueError, match='no RSTState'):
    rst_optax.HostDispatch(_train_step(tx), tx).check_state(
        optax.sgd(0.1).init(params))


# The periodic check of rst's step count.


def _nan_at(step):
  """A batch stream whose gradient is NaN at ``step`` only."""
  _, (x, y) = _problem()
  return [(x * (jnp.nan if t == step else 1.0), y) for t in range(STEPS)]


WRAPPERS = {
    # Its count moves every 2nd call: found at the first check after that.
    'multi_steps': (lambda tx: optax.MultiSteps(tx, every_k_schedule=2), None,
                    2),
    # Its count stays at the NaN step 1: the count returned by call 2 is off,
    # and is read at the next check, call 4.
    'apply_if_finite': (lambda tx: optax.apply_if_finite(tx, 5), 1, 4),
}


@pytest.mark.parametrize('wrap', WRAPPERS)
def test_host_dispatch_detects_wrappers_that_move_the_count(wrap):
  wrapper, nan_step, found_at = WRAPPERS[wrap]
  tx = _tx(0.5)
  params, _ = _problem()
  batches = _nan_at(nan_step)
  state = wrapper(tx).init(params)
  step = rst_optax.HostDispatch(_train_step(tx, wrapper), tx, check_every=2)
  with pytest.raises(RuntimeError, match=r'MultiSteps.*apply_if_finite'):
    for t in range(STEPS):
      params, state = step(params, state, batches[t])
  assert step.step == found_at


def test_the_count_check_is_on_by_default_every_100_calls():
  tx = _tx(0.5)
  wrapper = lambda tx: optax.MultiSteps(tx, every_k_schedule=2)
  params, batch = _problem()
  state = wrapper(tx).init(params)
  step = rst_optax.HostDispatch(_train_step(tx, wrapper), tx)
  with pytest.raises(RuntimeError, match='MultiSteps'):
    for _ in range(101):
      params, state = step(params, state, batch)
  assert step.step == 100  # The count of call 0, read at call 100.


def test_the_count_check_works_with_donated_state():
  tx = _tx(0.5)
  params, batch = _problem()
  step = rst_optax.HostDispatch(_train_step(tx), tx, check_every=2,
                                donate_argnums=(0, 1))
  _, state = _run(step, params, tx.init(params), batch, 7)
  assert int(state.count) == step.step == 7


@pytest.mark.parametrize('check_every', [0, None])
def test_the_count_check_can_be_turned_off(check_every):
  # Past call 100, where the default check would read call 0's count.
  tx = _tx(0.5)
  wrapped = optax.MultiSteps(tx, every_k_schedule=2)
  params, batch = _problem()
  step = rst_optax.HostDispatch(
      _train_step(tx, lambda tx: wrapped), tx, check_every=check_every)
  _run(step, params, wrapped.init(params), batch, 102)
  assert step.step == 102


def _twice(tx):
  """A train step that calls ``tx.update`` twice per step."""
  once = _train_step(tx)

  def train_step(params, opt_state, batch, take_sam=None):
    params, opt_state = once(params, opt_state, batch, take_sam)
    return once(params, opt_state, batch, take_sam)

  return train_step


def test_the_count_check_catches_a_count_that_runs_ahead():
  tx = _tx(0.5)
  params, batch = _problem()
  step = rst_optax.HostDispatch(_twice(tx), tx, check_every=2)
  with pytest.raises(RuntimeError, match=r"step count was 2 after step 0, "
                     'where HostDispatch expected 1.*other than once'):
    _run(step, params, tx.init(params), batch, STEPS)
  assert step.step == 2  # The count of call 0, read at call 2.


def test_the_count_check_reads_every_rst_state_in_the_output():
  """Two rst states (one with ``reuse``) of the same coin; only the second,
  updated twice per step, is off."""
  tx = _tx(0.5)
  reusing = rst_optax.rst(optax.sgd(0.05), 0.5, rho=0.1, seed=SEED,
                          reuse=0.5)
  once, twice = _train_step(tx), _twice(reusing)

  def train_step(params, states, batch, take_sam):
    new, first = once(params, states[0], batch, take_sam)
    _, second = twice(params, states[1], batch, take_sam)
    return new, (first, second)

  params, batch = _problem()
  states = (tx.init(params), reusing.init(params))
  assert isinstance(states[1], rst_optax.RSTReuseState)
  step = rst_optax.HostDispatch(train_step, tx, check_every=2)
  with pytest.raises(RuntimeError, match='step count was 2 after step 0'):
    _run(step, params, states, batch, STEPS)
  assert step.step == 2


def test_the_count_check_needs_the_state_in_the_output():
  tx = _tx(0.5)
  params, batch = _problem()
  train_step = _train_step(tx)
  step = rst_optax.HostDispatch(
      lambda p, s, b, take_sam: train_step(p, s, b, take_sam)[0], tx)
  with pytest.raises(TypeError, match='check_every=0'):
    step(params, tx.init(params), batch)
  rst_optax.HostDispatch(
      lambda p, s, b, take_sam: train_step(p, s, b, take_sam)[0], tx,
      check_every=0)(params, tx.init(params), batch)


def test_the_count_check_is_off_the_hot_path(monkeypatch):
  """Counts are read only at check steps, ``check_every`` calls after their
  copy to the host started."""
  tx = _tx(0.5)
  params, batch = _problem()
  reads = []
  step = rst_optax.HostDispatch(_train_step(tx), tx, check_every=4)
  compare = step._compare_pending

  def recording():
    reads.append((step.step, step._pending and step._pending[0]))
    compare()

  monkeypatch.setattr(step, '_compare_pending', recording)
  _run(step, params, tx.init(params), batch, 9)
  assert reads == [(0, None), (4, 1), (8, 5)]


# Bad arguments.


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(start=-1), ValueError, '`start`'),
    (dict(start=1.5), TypeError, '`start`'),
    (dict(start=2**31), ValueError, '`start`'),
    (dict(chunk_size=0), ValueError, '`chunk_size`'),
    (dict(check_every=-1), ValueError, '`check_every`'),
    (dict(check_every=True), TypeError, '`check_every`'),
])
def test_host_dispatch_rejects_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match='HostDispatch: ' + match):
    rst_optax.HostDispatch(lambda take_sam: None, _tx(0.5), **kwargs)


@pytest.mark.parametrize('tx', [
    optax.sgd(0.1),
    optax.MultiSteps(_tx(0.5), every_k_schedule=2),
    optax.apply_if_finite(_tx(0.5), 3),
    optax.chain(optax.clip(1.0), _tx(0.5)),
    optax.inject_hyperparams(rst_optax.rst)(optax.sgd(0.1), schedule=0.5),
    0.5,
])
def test_host_dispatch_needs_an_rst_transformation(tx):
  with pytest.raises(TypeError, match='HostDispatch: `tx` must be the '
                     'transformation returned by rst_optax.rst'):
    rst_optax.HostDispatch(lambda take_sam: None, tx)


def test_host_dispatch_rejects_bad_train_steps():
  tx = _tx(0.5)
  with pytest.raises(TypeError, match='`train_step` must be callable'):
    rst_optax.HostDispatch(None, tx)
  with pytest.raises(TypeError, match='must accept `take_sam`'):
    rst_optax.HostDispatch(lambda params, state: None, tx)
  with pytest.raises(TypeError, match='must accept `decide`'):
    rst_optax.HostDispatch(lambda x, take_sam: x, tx, take_sam_argname='decide')
  with pytest.raises(TypeError, match='`take_sam_argname`'):
    rst_optax.HostDispatch(lambda x, take_sam: x, tx, take_sam_argname=1)
  step = rst_optax.HostDispatch(lambda x, take_sam: x, tx)
  with pytest.raises(TypeError, match='do not pass `take_sam`'):
    step(1.0, take_sam=True)


def test_host_dispatch_merges_static_argnames():
  params, batch = _problem()
  tx = _tx(0.5)
  train_step = _train_step(tx)

  def scaled_step(params, opt_state, batch, repeat, take_sam):
    for _ in range(repeat):  # `repeat` must be static to loop in Python.
      params, opt_state = train_step(params, opt_state, batch, take_sam)
    return params, opt_state

  step = rst_optax.HostDispatch(scaled_step, tx, static_argnames='repeat',
                                check_every=0)
  _, state = step(params, tx.init(params), batch, repeat=2)
  assert int(state.count) == 2
  assert step.step == 1


def test_host_dispatch_step_does_not_advance_when_the_call_fails():
  step = rst_optax.HostDispatch(lambda x, take_sam: x + 1, _tx(0.5))
  with pytest.raises(TypeError):
    step('not an array')
  assert (step.step, step.sam_steps) == (0, 0)


def test_host_dispatch_with_nnx_jit(compilations):
  nnx = pytest.importorskip('flax.nnx')
  x, y = _problem()[1]
  loss = lambda model: jnp.mean((model(x) - y) ** 2)
  tx = _tx(0.5)

  def make():
    model = nnx.Linear(8, 2, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  def train_step(model, optimizer, take_sam=None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad_fn = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))
    optimizer.update(model, nnx.grad(loss)(model), grad_fn=grad_fn,
                     take_sam=take_sam)

  cond_model, cond_optimizer = make()
  host_model, host_optimizer = make()
  cond_step = nnx.jit(train_step)
  # The count check reads the optimizer, updated in place, every 4 calls.
  with compilations() as counts:
    host_step = rst_optax.HostDispatch(train_step, tx, jit=nnx.jit,
                                       check_every=4)
    for _ in range(STEPS):
      host_step(host_model, host_optimizer)
  for _ in range(STEPS):
    cond_step(cond_model, cond_optimizer)

  assert counts['train_step'] == host_step.compilations == 2
  chex.assert_trees_all_equal(nnx.state(cond_model), nnx.state(host_model))
  host_step.check_state(host_optimizer.opt_state)
  assert int(cond_optimizer.opt_state.sam_steps[...]) == host_step.sam_steps


# decisions and iter_decisions.


def test_decisions_is_the_coin_written_out():
  schedule = schedules.linear(0.1, 0.9, total_steps=STEPS)
  want = [bool(jax.random.bernoulli(
      jax.random.fold_in(jax.random.key(SEED), t), schedule(t)))
          for t in range(4, STEPS)]
  assert rst_optax.decisions(schedule, SEED, 4, STEPS).tolist() == want
  assert 0 < sum(want) < len(want)


@pytest.mark.parametrize('impl', KEY_IMPLS)
def test_decisions_equal_the_coin_of_every_key_implementation(impl):
  key = jax.random.key(SEED, impl=impl)
  coin = jax.jit(lambda t: rst_optax.coin(key, t, 0.5))
  want = [bool(coin(jnp.int32(t))) for t in range(48)]
  assert rst_optax.decisions(0.5, key, 0, 48).tolist() == want
  assert list(itertools.islice(
      rst_optax.iter_decisions(0.5, key, chunk_size=7), 48)) == want


@pytest.mark.parametrize('impl', KEY_IMPLS)
def test_rst_keeps_the_key_implementation(impl):
  """In-graph branches are ``coin(key, t)`` step by step, for every key
  implementation, and host dispatch takes the same ones."""
  key = jax.random.key(SEED, impl=impl)
  tx = _tx(0.5, seed=key)
  params, batch = _problem()
  step = jax.jit(_train_step(tx))
  state = tx.init(params)
  taken = []
  for _ in range(48):
    before = int(state.sam_steps)
    params, state = step(params, state, batch)
    taken.append(int(state.sam_steps) > before)
  coin = jax.jit(lambda t: rst_optax.coin(key, t, 0.5))
  assert taken == [bool(coin(jnp.int32(t))) for t in range(48)]
  host = rst_optax.HostDispatch(_train_step(tx), tx)
  assert [next(host._decisions) for _ in range(48)] == taken


def test_decisions_reaches_the_last_step():
  assert rst_optax.decisions(1.0, 0, 2**31 - 2, 2**31 - 1).tolist() == [True]
  assert rst_optax.decisions(1.0, 0, 2**31 - 1, 2**31 - 1).tolist() == []
  with pytest.raises(ValueError, match='decisions: `stop`'):
    rst_optax.decisions(1.0, 0, 2**31 - 2, 2**31)


def test_iter_decisions_equals_decisions_across_chunks():
  schedule = schedules.trigonometric(0.0, 1.0, total_steps=50)
  got = list(itertools.islice(
      rst_optax.iter_decisions(schedule, SEED, start=5, chunk_size=16), 45))
  assert got == rst_optax.decisions(schedule, SEED, 5, 50).tolist()
  assert all(type(d) is bool for d in got)


def test_iter_decisions_computes_chunk_by_chunk(monkeypatch):
  calls = []
  draw = _decisions._draw_chunk

  def recording(schedule, seed, start, stop):
    calls.append((start, stop))
    return draw(schedule, seed, start, stop)

  monkeypatch.setattr(_decisions, '_draw_chunk', recording)
  it = rst_optax.iter_decisions(0.5, SEED, start=4, chunk_size=10)
  assert calls == []  # Lazy: nothing computed before the first item.
  list(itertools.islice(it, 11))
  assert calls == [(4, 14), (14, 24)]


def test_iter_decisions_ends_at_the_step_limit():
  it = rst_optax.iter_decisions(1.0, 0, start=2**31 - 3, chunk_size=2)
  assert list(it) == [True, True]


VECTOR = lambda t: jnp.full(3, 0.5)
NAN_AT_3 = lambda t: jnp.where(t == 3, jnp.nan, 0.5)


def _host_dispatch(schedule):
  """A HostDispatch whose rst has ``schedule``, run past its first 4 steps."""
  step = rst_optax.HostDispatch(lambda take_sam: None, _tx(schedule),
                                check_every=0)
  for _ in range(4):
    step()


HOST_SIDE = {
    'decisions': lambda s: rst_optax.decisions(s, 0, 0, 8),
    'iter_decisions': lambda s: list(itertools.islice(
        rst_optax.iter_decisions(s, 0), 8)),
    'HostDispatch': _host_dispatch,
    'mean_probability': lambda s: schedules.mean_probability(s, 8),
    'matching_lam': lambda s: schedules.matching_lam(s, 8),
}


@pytest.mark.parametrize('fn', HOST_SIDE)
def test_host_side_functions_refuse_a_vector_schedule(fn):
  with pytest.raises(TypeError, match=f'{fn}: .*`schedule`.* must return a '
                     'real scalar'):
    HOST_SIDE[fn](VECTOR)


@pytest.mark.parametrize('fn', HOST_SIDE)
def test_host_side_functions_raise_on_nan_probability(fn):
  with pytest.raises(ValueError, match=f'{fn}: `schedule` returned NaN at '
                     'step 3'):
    HOST_SIDE[fn](NAN_AT_3)


def test_iter_decisions_raises_at_the_nan_step_itself():
  nan_at_5 = lambda t: jnp.where(t == 5, jnp.nan, 0.5)
  it = rst_optax.iter_decisions(nan_at_5, SEED, start=2)  # one chunk
  got = [next(it) for _ in range(3)]
  assert got == rst_optax.decisions(0.5, SEED, 2, 5).tolist()
  for _ in range(2):  # and again: it does not move past the step
    with pytest.raises(ValueError, match='iter_decisions: `schedule` '
                       'returned NaN at step 5'):
      next(it)


def test_host_dispatch_raises_at_the_nan_step_itself():
  calls = []
  tx = _tx(lambda t: jnp.where(t == 5, jnp.nan, 0.5))
  step = rst_optax.HostDispatch(lambda take_sam: calls.append(take_sam), tx,
                                check_every=0, jit=lambda f, **_: f)
  for _ in range(5):
    step()
  for _ in range(2):
    with pytest.raises(ValueError, match='HostDispatch: `schedule` returned '
                       'NaN at step 5'):
      step()
  assert step.step == len(calls) == 5
  assert calls == rst_optax.decisions(0.5, SEED, 0, 5).tolist()


def test_iter_decisions_at_the_end_of_the_int32_range():
  last = 2**31 - 1
  # A chunk size that does not divide the 7 steps left: 3 + 3 + 1.
  got = list(rst_optax.iter_decisions(0.5, SEED, start=last - 7,
                                      chunk_size=3))
  assert got == rst_optax.decisions(0.5, SEED, last - 7, last).tolist()
  assert 0 < sum(got) < 7
  # The default chunk size, 4096, past the steps left.
  got = list(rst_optax.iter_decisions(0.5, SEED, start=last - 100))
  assert got == rst_optax.decisions(0.5, SEED, last - 100, last).tolist()
  assert list(rst_optax.iter_decisions(0.5, SEED, start=last)) == []


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(schedule=1.5), ValueError, '`schedule`'),
    (dict(schedule='0.5'), TypeError, '`schedule`'),
    (dict(schedule=True), TypeError, '`schedule`'),
    (dict(seed='zero'), TypeError, '`seed`'),
    (dict(start=-1), ValueError, '`start`'),
    (dict(start=1.5), TypeError, '`start`'),
    (dict(start=2**31), ValueError, '`start`'),
    (dict(chunk_size=0), ValueError, '`chunk_size`'),
])
def test_iter_decisions_rejects_bad_arguments(kwargs, error, match):
  args = dict(schedule=0.5, seed=0) | kwargs
  with pytest.raises(error, match='iter_decisions: ' + match):
    rst_optax.iter_decisions(**args)


# recommended_dispatch.


@pytest.mark.parametrize('backend, mode', [
    ('cpu', 'host'), ('gpu', 'cond'), ('tpu', 'cond')])
def test_recommended_dispatch(monkeypatch, backend, mode):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert rst_optax.recommended_dispatch() == mode


def test_check_state_takes_no_rng_mapping_for_an_rst_state():
  """A mapping with some of RSTState's fields (a {'key': ...} RNG dict,
  nnx.Rngs laid out by nnx.state, with 'count' and 'key') is not one."""
  from flax import nnx

  params, _ = _problem()
  tx = _tx(0.5)
  step = rst_optax.HostDispatch(_train_step(tx), tx)
  rngs = nnx.state(nnx.Rngs(0, dropout=1))
  assert 'count' in rngs['dropout'] and 'key' in rngs['dropout']
  train_state = {'opt': tx.init(params), 'rng': {'key': jax.random.key(1)},
                 'nnx_rngs': rngs}
  step.check_state(train_state)
  with pytest.raises(ValueError, match='holds no RSTState'):
    step.check_state({'rng': {'key': jax.random.key(1)}, 'nnx_rngs': rngs})


def test_the_count_check_reads_a_functional_nnx_state():
  """``nnx.state`` lays the RSTState out as a mapping; the check finds it."""
  from flax import nnx

  from rst_optax import flax_utils

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  tx = rst_optax.rst(optax.sgd(0.1), schedule=0.5, seed=0)
  wrapped = optax.MultiSteps(tx, every_k_schedule=2)  # moves the count apart
  x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
  loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
  for inner, fails in ((tx, False), (wrapped, True)):
    optimizer = nnx.Optimizer(model, inner, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def train_step(state, take_sam, graphdef=graphdef):
      model, optimizer = nnx.merge(graphdef, state)
      grad_fn = flax_utils.nnx_grad_fn(loss_fn, model)
      grads = nnx.grad(loss_fn)(model)
      optimizer.update(model, grads, grad_fn=grad_fn, take_sam=take_sam)
      return nnx.state((model, optimizer))

    step = rst_optax.HostDispatch(train_step, tx, check_every=2)

    def run(state, step=step):
      for _ in range(8):
        state = step(state)

    if fails:
      with pytest.raises(RuntimeError, match='MultiSteps'):
        run(state)
    else:
      run(state)
