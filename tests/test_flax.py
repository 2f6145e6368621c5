"""Flax integration: NNX and Linen train steps with rst, BatchNorm included.

Each Flax step is checked against the same computation written in plain JAX
(a Dense-BatchNorm-ReLU-Dense net, G-RST with SGD), including the BatchNorm
running statistics, which must come from the first (unperturbed) pass only.
"""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _bn_problem import EPS, LAM, LR, MOMENTUM, RHO, STEPS, assert_close, make_tx
from _bn_problem import batches as _batches
from _bn_problem import decisions as _decisions
from flax import nnx

import rst_optax
from rst_optax import flax_utils

# The plain-JAX reference.


def ref_loss(p, x, y):
  h = x @ p['w1'] + p['b1']
  mean = h.mean(0)
  var = (h * h).mean(0) - mean * mean
  h = (h - mean) / jnp.sqrt(var + EPS) * p['scale'] + p['bias']
  out = jax.nn.relu(h) @ p['w2'] + p['b2']
  return jnp.mean((out - y) ** 2), (mean, var)


@jax.jit(static_argnames='take_sam')
def ref_step(p, stats, x, y, take_sam):
  """One G-RST step with SGD, by hand; stats from the first pass only."""
  (_, (mean, var)), g = jax.value_and_grad(ref_loss, has_aux=True)(p, x, y)
  if take_sam:
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, v: w + RHO * v / (norm + 1e-12), p, g)
    g_sam = jax.grad(lambda q: ref_loss(q, x, y)[0])(perturbed)
    g = jax.tree.map(lambda a, b: (1 - LAM) * a + LAM * b, g, g_sam)
  p = jax.tree.map(lambda w, v: w - LR * v, p, g)
  stats = (MOMENTUM * stats[0] + (1 - MOMENTUM) * mean,
           MOMENTUM * stats[1] + (1 - MOMENTUM) * var)
  return p, stats


@jax.jit
def ref_perturbed_stats(p, x, y):
  """The batch statistics of the SAM pass, which must not leak."""
  g = jax.grad(lambda q: ref_loss(q, x, y)[0])(p)
  norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, v: w + RHO * v / (norm + 1e-12), p, g)
  return ref_loss(perturbed, x, y)[1]


def ref_run(p, stats, take_sams):
  xs, ys = _batches()
  for t, take_sam in enumerate(take_sams):
    p, stats = ref_step(p, stats, xs[t], ys[t], bool(take_sam))
  return p, stats


# NNX.


class NNXNet(nnx.Module):

  def __init__(self, rngs, dropout=0.0):
    self.l1 = nnx.Linear(3, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=MOMENTUM, epsilon=EPS,
                            use_running_average=False, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.l2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(x)))))


def nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def nnx_ref_params(model):
  return {'w1': model.l1.kernel[...], 'b1': model.l1.bias[...],
          'scale': model.bn.scale[...], 'bias': model.bn.bias[...],
          'w2': model.l2.kernel[...], 'b2': model.l2.bias[...]}


def _arrays(state):
  """NumPy copies of a state's arrays (PRNG keys as their key data)."""
  def to_numpy(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.array(x)
  return jax.tree.map(to_numpy, flax_utils._as_pure(state))


def nnx_train_step(model, optimizer, x, y, take_sam=None):
  grad_fn = flax_utils.nnx_grad_fn(nnx_loss, model, x, y)
  grads = nnx.grad(nnx_loss)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn, take_sam=take_sam)


@pytest.mark.parametrize('dispatch', ['host', 'cond'])
def test_nnx_training_equals_plain_jax(dispatch):
  model = NNXNet(nnx.Rngs(0))
  p0 = nnx_ref_params(model)
  stats0 = (model.bn.mean[...], model.bn.var[...])
  tx = make_tx()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if dispatch == 'host':
    step = rst_optax.HostDispatch(nnx_train_step, tx, jit=nnx.jit,
                                  check_every=2)
  else:
    step = nnx.jit(nnx_train_step)
  xs, ys = _batches()
  decisions = _decisions()
  for t in range(STEPS):
    step(model, optimizer, xs[t], ys[t])

  p, (mean, var) = ref_run(p0, stats0, decisions)
  jax.tree.map(assert_close, nnx_ref_params(model), p)
  assert_close(model.bn.mean[...], mean)
  assert_close(model.bn.var[...], var)
  assert int(optimizer.opt_state.sam_steps[...]) == decisions.sum()


def test_nnx_batchnorm_stats_come_from_the_first_pass_only():
  model = NNXNet(nnx.Rngs(1))
  p0 = nnx_ref_params(model)
  stats0 = (model.bn.mean[...], model.bn.var[...])
  optimizer = nnx.Optimizer(model, make_tx(schedule=1.0), wrt=nnx.Param)
  xs, ys = _batches()
  nnx.jit(nnx_train_step)(model, optimizer, xs[0], ys[0])
  assert int(optimizer.opt_state.sam_steps[...]) == 1

  _, (mean, var) = ref_step(p0, stats0, xs[0], ys[0], take_sam=True)
  assert_close(model.bn.mean[...], mean)
  assert_close(model.bn.var[...], var)
  # The perturbed pass has other batch statistics, so a leak would show.
  leaked_mean = MOMENTUM * mean + (1 - MOMENTUM) * ref_perturbed_stats(
      p0, xs[0], ys[0])[0]
  assert np.max(np.abs(leaked_mean - mean)) > 1e-3
  assert np.max(np.abs(model.bn.mean[...] - leaked_mean)) > 1e-3


def test_nnx_grad_fn_leaves_the_model_untouched_and_reuses_its_state():
  model = NNXNet(nnx.Rngs(2), dropout=0.5)
  xs, ys = _batches()
  grad_fn = flax_utils.nnx_grad_fn(nnx_loss, model, xs[0], ys[0])
  grads = flax_utils._as_pure(nnx.grad(nnx_loss)(model, xs[0], ys[0]))  # first pass
  before = _arrays(nnx.state(model))

  g_again = grad_fn(flax_utils._as_pure(nnx.state(model, nnx.Param)))
  # Same dropout mask as the first pass: at unperturbed params the two
  # gradients agree; a grad_fn reading the model's current RNG state would not.
  jax.tree.map(assert_close, g_again, grads)
  jax.tree.map(np.testing.assert_array_equal, _arrays(nnx.state(model)), before)


def test_nnx_grad_fn_with_aux_is_the_gradient_without_aux():
  model = NNXNet(nnx.Rngs(3))
  xs, ys = _batches()
  params = flax_utils._as_pure(nnx.state(model, nnx.Param))
  plain = flax_utils.nnx_grad_fn(nnx_loss, model, xs[0], ys[0])(params)
  with_aux = flax_utils.nnx_grad_fn(
      lambda m, x, y: (nnx_loss(m, x, y), {'aux': jnp.ones(3)}), model, xs[0],
      ys[0], has_aux=True)(params)
  chex.assert_trees_all_equal(with_aux, plain)


def test_linen_grad_fn_with_aux_is_the_gradient_without_aux():
  params = {'w': jnp.array([1.0, -2.0])}
  loss = lambda p, x: jnp.sum(p['w'] ** 2 * x)
  plain = flax_utils.linen_grad_fn(loss, 3.0)(params)
  with_aux = flax_utils.linen_grad_fn(
      lambda p, x: (loss(p, x), jnp.zeros(4)), 3.0, has_aux=True)(params)
  chex.assert_trees_all_equal(with_aux, plain)
  np.testing.assert_array_equal(plain['w'], [6.0, -12.0])


def _wrong_aux_cases(loss):
  """(has_aux, loss_fn, message) for a loss_fn(first, x) of the helpers."""
  return [
      (True, loss, 'with `has_aux=True`, `loss_fn` must return a pair'),
      (False, lambda a, x: (loss(a, x), {'n': 1}),
       '`has_aux` is False: pass has_aux=True'),
  ]


@pytest.mark.parametrize('case', [0, 1])
def test_a_wrong_has_aux_is_named(case):
  # Linen: a loss of the parameters.
  params = {'w': jnp.array([1.0, -2.0])}
  loss = lambda p, x: jnp.sum(p['w'] ** 2 * x)
  has_aux, loss_fn, match = _wrong_aux_cases(loss)[case]
  with pytest.raises(TypeError, match='linen_grad_fn: .*' + re.escape(match)):
    flax_utils.linen_grad_fn(loss_fn, 3.0, has_aux=has_aux)(params)
  # NNX: a loss of the model.
  model = NNXNet(nnx.Rngs(3))
  xs, ys = _batches()
  params = flax_utils._as_pure(nnx.state(model, nnx.Param))
  has_aux, loss_fn, match = _wrong_aux_cases(
      lambda m, x: nnx_loss(m, x, ys[0]))[case]
  with pytest.raises(TypeError, match='nnx_grad_fn: .*' + re.escape(match)):
    flax_utils.nnx_grad_fn(loss_fn, model, xs[0], has_aux=has_aux)(params)


def test_nnx_grad_fn_with_another_wrt_than_the_optimizer_says_so():
  model = NNXNet(nnx.Rngs(4))
  optimizer = nnx.Optimizer(model, make_tx(schedule=1.0), wrt=nnx.Param)
  xs, ys = _batches()
  grads = nnx.grad(nnx_loss)(model, xs[0], ys[0])
  grad_fn = flax_utils.nnx_grad_fn(nnx_loss, model, xs[0], ys[0],
                                   wrt=nnx.Variable)
  with pytest.raises(ValueError, match=r'nnx_grad_fn: .*same `wrt` as '
                     r'nnx.Optimizer'):
    optimizer.update(model, grads, grad_fn=grad_fn)


# Linen.


class LinenNet(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM,
                     epsilon=EPS)(x)
    return nn.Dense(2)(nn.relu(x))


def linen_state(schedule=0.5):
  variables = LinenNet().init(jax.random.key(0), jnp.ones((1, 3)), train=False)
  return flax_utils.TrainState.create(
      apply_fn=LinenNet().apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=make_tx(schedule))


def linen_loss(params, batch_stats, x, y):
  out, updates = LinenNet().apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True,
      mutable=['batch_stats'])
  return jnp.mean((out - y) ** 2), updates['batch_stats']


def linen_train_step(state, x, y, take_sam=None):
  (_, batch_stats), grads = jax.value_and_grad(linen_loss, has_aux=True)(
      state.params, state.batch_stats, x, y)
  grad_fn = flax_utils.linen_grad_fn(linen_loss, state.batch_stats, x, y,
                                     has_aux=True)
  return state.apply_gradients(grads=grads, grad_fn=grad_fn, take_sam=take_sam,
                               batch_stats=batch_stats)


def linen_ref_params(params):
  return {'w1': params['Dense_0']['kernel'], 'b1': params['Dense_0']['bias'],
          'scale': params['BatchNorm_0']['scale'],
          'bias': params['BatchNorm_0']['bias'],
          'w2': params['Dense_1']['kernel'], 'b2': params['Dense_1']['bias']}


def linen_ref_stats(batch_stats):
  return batch_stats['BatchNorm_0']['mean'], batch_stats['BatchNorm_0']['var']


@pytest.mark.parametrize('dispatch', ['host', 'cond'])
def test_linen_training_equals_plain_jax(dispatch):
  state = linen_state()
  p0, stats0 = linen_ref_params(state.params), linen_ref_stats(state.batch_stats)
  if dispatch == 'host':
    step = rst_optax.HostDispatch(linen_train_step, state.tx, check_every=2)
  else:
    step = jax.jit(linen_train_step)
  xs, ys = _batches()
  decisions = _decisions()
  for t in range(STEPS):
    state = step(state, xs[t], ys[t])

  p, (mean, var) = ref_run(p0, stats0, decisions)
  jax.tree.map(assert_close, linen_ref_params(state.params), p)
  assert_close(linen_ref_stats(state.batch_stats)[0], mean)
  assert_close(linen_ref_stats(state.batch_stats)[1], var)
  assert int(state.step) == STEPS
  assert int(state.opt_state.sam_steps) == decisions.sum()


def test_linen_batchnorm_stats_come_from_the_first_pass_only():
  state = linen_state(schedule=1.0)
  p0, stats0 = linen_ref_params(state.params), linen_ref_stats(state.batch_stats)
  xs, ys = _batches()
  state = linen_train_step(state, xs[0], ys[0])
  assert int(state.opt_state.sam_steps) == 1

  _, (mean, var) = ref_step(p0, stats0, xs[0], ys[0], take_sam=True)
  assert_close(linen_ref_stats(state.batch_stats)[0], mean)
  assert_close(linen_ref_stats(state.batch_stats)[1], var)
  leaked_mean = MOMENTUM * mean + (1 - MOMENTUM) * ref_perturbed_stats(
      p0, xs[0], ys[0])[0]
  assert np.max(np.abs(linen_ref_stats(state.batch_stats)[0] - leaked_mean)) > 1e-3


def test_linen_train_state_forwards_extra_args_and_replaces_fields():
  def update(updates, state, params=None, *, scale):
    del params
    return jax.tree.map(lambda g: -scale * g, updates), state

  tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  state = flax_utils.TrainState.create(
      apply_fn=None, params={'w': jnp.ones(2)}, tx=tx, batch_stats={'m': 0.0})
  new = state.apply_gradients(grads={'w': jnp.array([1.0, 2.0])}, scale=3.0,
                              batch_stats={'m': 5.0})
  np.testing.assert_array_equal(new.params['w'], [-2.0, -5.0])
  assert new.batch_stats == {'m': 5.0}
  assert int(new.step) == 1
  assert new.tx is tx  # Given back as it was, to be called again.
  again = new.apply_gradients(grads={'w': jnp.array([1.0, 1.0])}, scale=1.0)
  np.testing.assert_array_equal(again.params['w'], [-3.0, -6.0])


@pytest.mark.parametrize('reuse', [None, 0.5])
def test_a_grad_fn_returning_nnx_variables_is_named_with_the_fix(reuse):
  """nnx.grad's output holds nnx.Param variables; nnx.Optimizer passes rst
  plain arrays. The error says so, and what to use, without tree dumps."""
  model = NNXNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, rst_optax.rst(optax.sgd(0.1), schedule=1.0, reuse=reuse),
      wrt=nnx.Param)
  xs, ys = _batches()
  grads = nnx.grad(nnx_loss)(model, xs[0], ys[0])

  def raw_grad_fn(params):
    del params
    return nnx.grad(nnx_loss)(model, xs[0], ys[0])  # nnx.Param leaves

  with pytest.raises(ValueError) as error:
    optimizer.update(model, grads, grad_fn=raw_grad_fn)
  message = str(error.value)
  assert message.startswith('rst: `grad_fn(params)` holds flax.nnx variables '
                            '(an nnx.Param at ')
  pure = flax_utils._as_pure.__name__  # as_pure, or pure before its rename
  assert f'nnx.{pure}(grads)' in message
  assert 'rst_optax.flax_utils.nnx_grad_fn' in message
  assert 'PyTreeDef' not in message and len(message) < 500
  # The fix it names works.
  optimizer.update(model, grads,
                   grad_fn=lambda p: flax_utils._as_pure(raw_grad_fn(p)))
  assert int(optimizer.opt_state.sam_steps[...]) == 1
