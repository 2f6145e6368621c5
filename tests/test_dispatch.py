"""Tests of host dispatch: HostDispatch, iter_decisions, recommended_dispatch."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rst_optax
from rst_optax import _coin, schedules

SEED = 3
STEPS = 24


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


def _tx(schedule):
  return rst_optax.rst(optax.sgd(0.05, momentum=0.9), schedule, rho=0.1,
                       lam=2.0, seed=SEED)


def _train_step(tx):
  def train_step(params, opt_state, batch, take_sam=None):
    grads = jax.grad(_loss)(params, batch)
    updates, opt_state = tx.update(
        grads, opt_state, params, take_sam=take_sam,
        grad_fn=lambda p: jax.grad(_loss)(p, batch))
    return optax.apply_updates(params, updates), opt_state
  return train_step


def _run(step, params, opt_state, batch, steps):
  for _ in range(steps):
    params, opt_state = step(params, opt_state, batch)
  return params, opt_state


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


SCHEDULES = {
    'constant': 0.5,
    'linear': schedules.linear(0.1, 0.9, total_steps=STEPS),
}


@pytest.mark.parametrize('name', SCHEDULES)
def test_host_and_cond_trajectories_are_identical(name):
  schedule = SCHEDULES[name]
  taken = rst_optax.decisions(schedule, SEED, 0, STEPS)
  assert 0 < taken.sum() < STEPS  # Both branches occur in the run.
  params, batch = _problem()
  tx = _tx(schedule)
  train_step = _train_step(tx)

  cond = _run(jax.jit(train_step), params, tx.init(params), batch, STEPS)
  host_step = rst_optax.HostDispatch(train_step, schedule, SEED)
  host = _run(host_step, params, tx.init(params), batch, STEPS)

  # Bit-identical: the same ops run in both modes on XLA:CPU.
  _assert_trees_equal(cond, host)
  assert host_step.step == STEPS
  assert host_step.sam_steps == int(host[1].sam_steps) == taken.sum()


def test_host_dispatch_compiles_once_per_branch():
  schedule = 0.5
  params, batch = _problem()
  tx = _tx(schedule)
  step = rst_optax.HostDispatch(_train_step(tx), schedule, SEED)
  state = tx.init(params)
  params, state = _run(step, params, state, batch, STEPS)
  assert 0 < step.sam_steps < STEPS
  assert step.compilations == 2
  assert step.jitted._cache_size() == 2


def test_host_dispatch_compiles_once_with_one_branch():
  # p = 0 for the first STEPS steps: only the base branch runs.
  schedule = schedules.piecewise(0.0, 1.0, boundary=STEPS)
  params, batch = _problem()
  tx = _tx(schedule)
  step = rst_optax.HostDispatch(_train_step(tx), schedule, SEED)
  _run(step, params, tx.init(params), batch, STEPS)
  assert step.sam_steps == 0
  assert step.compilations == 1


def test_in_graph_cond_compiles_once():
  schedule = 0.5
  params, batch = _problem()
  tx = _tx(schedule)
  traces = []
  train_step = _train_step(tx)

  @jax.jit
  def step(params, opt_state, batch):
    traces.append(None)
    return train_step(params, opt_state, batch)

  _, state = _run(step, params, tx.init(params), batch, STEPS)
  assert 0 < int(state.sam_steps) < STEPS
  assert len(traces) == 1


def test_resume_with_start_continues_the_run():
  schedule = schedules.linear(0.2, 0.8, total_steps=STEPS)
  params, batch = _problem()
  tx = _tx(schedule)
  train_step = _train_step(tx)
  first = rst_optax.HostDispatch(train_step, schedule, SEED)
  half = _run(first, params, tx.init(params), batch, STEPS // 2)
  full = _run(first, *half, batch, STEPS - STEPS // 2)

  resumed = rst_optax.HostDispatch(
      train_step, schedule, SEED, start=int(half[1].count))
  assert resumed.step == STEPS // 2
  resumed.check_state(half[1])
  decisions = []
  params, state = half
  for _ in range(STEPS - STEPS // 2):
    decisions.append(resumed.take_sam)
    params, state = resumed(params, state, batch)

  expected = rst_optax.decisions(schedule, SEED, STEPS // 2, STEPS)
  assert decisions == expected.tolist()
  _assert_trees_equal(full, (params, state))


def test_check_state_rejects_a_wrong_step_or_seed():
  schedule = 0.5
  params, batch = _problem()
  tx = _tx(schedule)
  state = _run(rst_optax.HostDispatch(_train_step(tx), schedule, SEED),
               params, tx.init(params), batch, 3)[1]
  # Found when nested, e.g. in optax.chain or a larger training state.
  rst_optax.HostDispatch(_train_step(tx), schedule, SEED, start=3).check_state(
      {'opt': (optax.EmptyState(), state)})
  with pytest.raises(ValueError, match='start=int'):
    rst_optax.HostDispatch(_train_step(tx), schedule, SEED).check_state(state)
  with pytest.raises(ValueError, match='seed'):
    rst_optax.HostDispatch(
        _train_step(tx), schedule, SEED + 1, start=3).check_state(state)
  with pytest.raises(ValueError, match='no RSTState'):
    rst_optax.HostDispatch(_train_step(tx), schedule, SEED).check_state(
        optax.sgd(0.1).init(params))


def test_iter_decisions_equals_decisions_across_chunks():
  schedule = schedules.trigonometric(0.0, 1.0, total_steps=50)
  got = list(itertools.islice(
      rst_optax.iter_decisions(schedule, SEED, start=5, chunk_size=16), 45))
  assert got == rst_optax.decisions(schedule, SEED, 5, 50).tolist()
  assert all(type(d) is bool for d in got)


def test_iter_decisions_computes_chunk_by_chunk(monkeypatch):
  calls = []
  decisions = _coin.decisions

  def recording(schedule, seed, start, stop):
    calls.append((start, stop))
    return decisions(schedule, seed, start, stop)

  monkeypatch.setattr(_coin, 'decisions', recording)
  it = rst_optax.iter_decisions(0.5, SEED, start=4, chunk_size=10)
  assert calls == []  # Lazy: nothing computed before the first item.
  list(itertools.islice(it, 11))
  assert calls == [(4, 14), (14, 24)]


def test_host_dispatch_merges_static_argnames():
  params, batch = _problem()
  tx = _tx(0.5)
  train_step = _train_step(tx)

  def scaled_step(params, opt_state, batch, repeat, take_sam):
    for _ in range(repeat):  # `repeat` must be static to loop in Python.
      params, opt_state = train_step(params, opt_state, batch, take_sam)
    return params, opt_state

  step = rst_optax.HostDispatch(scaled_step, 0.5, SEED, static_argnames='repeat')
  _, state = step(params, tx.init(params), batch, repeat=2)
  assert int(state.count) == 2
  assert step.step == 1


def test_host_dispatch_step_does_not_advance_when_the_call_fails():
  step = rst_optax.HostDispatch(lambda x, take_sam: x + 1, 0.5, SEED)
  with pytest.raises(TypeError):
    step('not an array')
  assert (step.step, step.sam_steps) == (0, 0)


def test_recommended_dispatch(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert rst_optax.recommended_dispatch() == 'host'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert rst_optax.recommended_dispatch() == 'cond'


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(schedule=1.5), ValueError, '`schedule`'),
    (dict(schedule='0.5'), TypeError, '`schedule`'),
    (dict(seed='zero'), TypeError, '`seed`'),
    (dict(start=-1), ValueError, '`start`'),
    (dict(start=1.5), TypeError, '`start`'),
    (dict(chunk_size=0), ValueError, '`chunk_size`'),
])
def test_iter_decisions_and_host_dispatch_reject_bad_arguments(
    kwargs, error, match):
  args = dict(schedule=0.5, seed=0) | kwargs
  with pytest.raises(error, match=match):
    rst_optax.iter_decisions(**args)
  with pytest.raises(error, match=match):
    rst_optax.HostDispatch(lambda take_sam: None, **args)
  if 'seed' not in kwargs:  # The others name the function that was called.
    with pytest.raises(error, match='HostDispatch: '):
      rst_optax.HostDispatch(lambda take_sam: None, **args)


def test_host_dispatch_rejects_bad_train_steps():
  with pytest.raises(TypeError, match='`train_step` must be callable'):
    rst_optax.HostDispatch(None, 0.5, 0)
  with pytest.raises(TypeError, match='must accept `take_sam`'):
    rst_optax.HostDispatch(lambda params, state: None, 0.5, 0)
  with pytest.raises(TypeError, match='must accept `decide`'):
    rst_optax.HostDispatch(lambda x, take_sam: x, 0.5, 0,
                           take_sam_argname='decide')
  with pytest.raises(TypeError, match='`take_sam_argname`'):
    rst_optax.HostDispatch(lambda x, take_sam: x, 0.5, 0, take_sam_argname=1)
  step = rst_optax.HostDispatch(lambda x, take_sam: x, 0.5, 0)
  with pytest.raises(TypeError, match='do not pass `take_sam`'):
    step(1.0, take_sam=True)


def test_host_dispatch_with_nnx_jit():
  nnx = pytest.importorskip('flax.nnx')
  x, y = _problem()[1]
  loss = lambda model: jnp.mean((model(x) - y) ** 2)

  def make():
    model = nnx.Linear(8, 2, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, _tx(0.5), wrt=nnx.Param)

  def train_step(model, optimizer, take_sam=None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad_fn = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))
    optimizer.update(model, nnx.grad(loss)(model), grad_fn=grad_fn,
                     take_sam=take_sam)

  cond_model, cond_optimizer = make()
  host_model, host_optimizer = make()
  cond_step = nnx.jit(train_step)
  host_step = rst_optax.HostDispatch(train_step, 0.5, SEED, jit=nnx.jit)
  for _ in range(STEPS):
    cond_step(cond_model, cond_optimizer)
    host_step(host_model, host_optimizer)

  assert host_step.compilations == 2
  _assert_trees_equal(nnx.state(cond_model), nnx.state(host_model))
  host_step.check_state(host_optimizer.opt_state)
  assert int(cond_optimizer.opt_state.sam_steps[...]) == host_step.sam_steps
