"""Equinox integration: rst with an Equinox model, BatchNorm state included.

A Linear-BatchNorm-ReLU-Linear model with ``eqx.nn.State`` is trained with
G-RST and SGD, its branch decided by the in-graph coin (``eqx.filter_jit``) or
on the host (``HostDispatch(..., jit=eqx.filter_jit)``), and checked against
the same computation written in plain JAX, running statistics included: they
must come from the first (unperturbed) pass only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

eqx = pytest.importorskip('equinox')

from _bn_problem import EPS, LAM, LR, MOMENTUM, RHO, STEPS, assert_close, make_tx  # noqa: E402
from _bn_problem import batches as _batches  # noqa: E402
from _bn_problem import decisions as _decisions  # noqa: E402

import rst_optax  # noqa: E402
from rst_optax import equinox_utils  # noqa: E402

# The plain-JAX reference (Equinox's layout: a Linear's weight is (out, in)).


def ref_loss(p, x, y):
  h = x @ p['w1'].T + p['b1']
  mean = h.mean(0)
  var = ((h - mean) ** 2).mean(0)
  h = (h - mean) / jnp.sqrt(var + EPS) * p['scale'] + p['bias']
  out = jax.nn.relu(h) @ p['w2'].T + p['b2']
  return jnp.mean((out - y) ** 2), (mean, var)


def _perturbed(p, x, y):
  g = jax.grad(lambda q: ref_loss(q, x, y)[0])(p)
  norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g)))
  return jax.tree.map(lambda w, v: w + RHO * v / (norm + 1e-12), p, g)


def _ref_step(p, stats, x, y, take_sam):
  """One G-RST step with SGD, by hand; running stats from the first pass."""
  (_, (mean, var)), g = jax.value_and_grad(ref_loss, has_aux=True)(p, x, y)
  if take_sam:
    g_sam = jax.grad(lambda q: ref_loss(q, x, y)[0])(_perturbed(p, x, y))
    g = jax.tree.map(lambda a, b: (1 - LAM) * a + LAM * b, g, g_sam)
  p = jax.tree.map(lambda w, v: w - LR * v, p, g)
  stats = (MOMENTUM * stats[0] + (1 - MOMENTUM) * mean,
           MOMENTUM * stats[1] + (1 - MOMENTUM) * var)
  return p, stats


ref_step = jax.jit(_ref_step, static_argnames='take_sam')


# The Equinox model and train step, as a user writes them.


class Net(eqx.Module):
  l1: eqx.nn.Linear
  bn: eqx.nn.BatchNorm
  l2: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.l1 = eqx.nn.Linear(3, 8, key=k1)
    self.bn = eqx.nn.BatchNorm(8, 'batch', eps=EPS, momentum=MOMENTUM,
                               mode='batch')
    self.l2 = eqx.nn.Linear(8, 2, key=k2)

  def __call__(self, x, state):
    h, state = self.bn(self.l1(x), state)
    return self.l2(jax.nn.relu(h)), state


def loss_fn(model, state, x, y):
  out, state = jax.vmap(model, axis_name='batch', in_axes=(0, None),
                        out_axes=(0, None))(x, state)
  return jnp.mean((out - y) ** 2), state


def make_train_step(tx):
  def train_step(model, state, opt_state, x, y, take_sam=None):
    (_, new_state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
        model, state, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    # The perturbed pass starts from `state`, and its new state is dropped.
    grad_fn = equinox_utils.eqx_grad_fn(loss_fn, model, state, x, y,
                                        has_aux=True)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn,
                                   take_sam=take_sam)
    return eqx.apply_updates(model, updates), new_state, opt_state
  return train_step


def make_model(key=0):
  return eqx.nn.make_with_state(Net)(jax.random.key(key))


def ref_params(model):
  return {'w1': model.l1.weight, 'b1': model.l1.bias,
          'scale': model.bn.weight, 'bias': model.bn.bias,
          'w2': model.l2.weight, 'b2': model.l2.bias}


def running_stats(model, state):
  return state.get(model.bn.batch_state_index)


@pytest.mark.parametrize('dispatch', ['host', 'cond'])
def test_equinox_training_equals_plain_jax(dispatch):
  model, state = make_model()
  p, stats = ref_params(model), running_stats(model, state)
  tx = make_tx()
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  train_step = make_train_step(tx)
  if dispatch == 'host':
    step = rst_optax.HostDispatch(train_step, tx, jit=eqx.filter_jit)
  else:
    step = eqx.filter_jit(train_step)
  xs, ys = _batches()
  decisions = _decisions()
  for t in range(STEPS):
    model, state, opt_state = step(model, state, opt_state, xs[t], ys[t])
    p, stats = ref_step(p, stats, xs[t], ys[t], take_sam=bool(decisions[t]))

  jax.tree.map(assert_close, ref_params(model), p)
  jax.tree.map(assert_close, running_stats(model, state), stats)
  assert int(opt_state.count) == STEPS
  assert int(opt_state.sam_steps) == decisions.sum()
  if dispatch == 'host':  # one executable per branch, no lax.cond in either
    assert step.compilations == 2
    assert step.sam_steps == decisions.sum()


def test_batchnorm_state_comes_from_the_first_pass_only():
  model, state = make_model(key=1)
  p, stats = ref_params(model), running_stats(model, state)
  tx = make_tx(schedule=1.0)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  xs, ys = _batches()
  model, state, opt_state = eqx.filter_jit(make_train_step(tx))(
      model, state, opt_state, xs[0], ys[0])
  assert int(opt_state.sam_steps) == 1

  _, (mean, var) = ref_step(p, stats, xs[0], ys[0], take_sam=True)
  got_mean, got_var = running_stats(model, state)
  assert_close(got_mean, mean)
  assert_close(got_var, var)
  # The perturbed pass has other batch statistics, so a leak would show.
  perturbed_mean = ref_loss(_perturbed(p, xs[0], ys[0]), xs[0], ys[0])[1][0]
  leaked_mean = MOMENTUM * mean + (1 - MOMENTUM) * perturbed_mean
  assert np.max(np.abs(leaked_mean - mean)) > 1e-3
  assert np.max(np.abs(got_mean - leaked_mean)) > 1e-3


class Activated(eqx.Module):
  """A model with non-array leaves: a function and a Python int."""
  linear: eqx.nn.Linear
  activation: object
  power: int

  def __call__(self, x):
    return self.activation(self.linear(x)) ** self.power


def _activated_model():
  return Activated(eqx.nn.Linear(3, 2, key=jax.random.key(4)), jnp.tanh, 2)


def _activated_loss(model, x):
  return jnp.mean(jax.vmap(model)(x))


def test_grad_fn_is_filter_grad_and_sees_only_arrays():
  model = _activated_model()
  x = _batches()[0][0]
  params, static = eqx.partition(model, eqx.is_inexact_array)
  seen = []

  def by_hand(p):  # the docs' grad_fn, written with eqx.combine
    seen.append(jax.tree.leaves(p))
    return eqx.filter_grad(_activated_loss)(eqx.combine(p, static), x)

  tx = rst_optax.rst(optax.sgd(LR), schedule=1.0, rho=RHO)
  grads = eqx.filter_grad(_activated_loss)(model, x)
  helper = equinox_utils.eqx_grad_fn(_activated_loss, model, x)
  u_hand, _ = tx.update(grads, tx.init(params), params, grad_fn=by_hand)
  u_helper, _ = tx.update(grads, tx.init(params), params, grad_fn=helper)
  jax.tree.map(assert_close, u_helper, u_hand)
  assert len(seen) == 1 and len(seen[0]) == 2  # weight and bias only
  assert all(isinstance(leaf, jax.Array) for leaf in seen[0])

  # At other parameters, the gradient of the model that has them.
  moved = jax.tree.map(lambda w: w + 0.5, params)
  want = eqx.filter_grad(_activated_loss)(eqx.combine(moved, static), x)
  jax.tree.map(assert_close, helper(moved), want)
  assert jax.tree.structure(helper(moved)) == jax.tree.structure(params)


def test_eqx_grad_fn_with_aux_is_the_gradient_without_aux():
  model = _activated_model()
  x = _batches()[0][0]
  params = eqx.filter(model, eqx.is_inexact_array)
  with_aux = equinox_utils.eqx_grad_fn(
      lambda m, x: (_activated_loss(m, x), 'aux'), model, x, has_aux=True)
  plain = equinox_utils.eqx_grad_fn(_activated_loss, model, x)
  jax.tree.map(assert_close, with_aux(params), plain(params))


def test_eqx_grad_fn_with_other_parameters_says_so():
  model = _activated_model()
  x = _batches()[0][0]
  grad_fn = equinox_utils.eqx_grad_fn(_activated_loss, model, x)
  with pytest.raises(ValueError, match='eqx_grad_fn: .*filter_spec'):
    grad_fn({'w': jnp.ones(3)})


def test_filter_spec_and_kwargs_reach_the_perturbed_pass():
  """Only the weight is trained (a filter_spec that leaves the bias out), and
  the loss's keyword argument is the one given: the SAM step's gradient is
  that of the model with the perturbed weight, the bias as it was."""
  model = _activated_model()
  x = _batches()[0][0]

  def loss_fn(model, x, *, scale=1.0):
    return scale * _activated_loss(model, x) + jnp.sum(model.linear.bias ** 2)

  spec = jax.tree.map(lambda _: False, model)
  spec = eqx.tree_at(lambda m: m.linear.weight, spec, replace=True)
  params, static = eqx.partition(model, spec)
  assert params.linear.bias is None
  grad_fn = equinox_utils.eqx_grad_fn(loss_fn, model, x, filter_spec=spec,
                                      scale=3.0)
  grad = lambda p: jax.grad(lambda q: loss_fn(eqx.combine(q, static), x,
                                              scale=3.0))(p)
  tx = rst_optax.rst(optax.sgd(LR), schedule=1.0, rho=RHO)
  updates, _ = tx.update(grad(params), tx.init(params), params,
                         grad_fn=grad_fn)
  g = grad(params).linear.weight
  moved = eqx.tree_at(lambda m: m.linear.weight, params,
                      params.linear.weight + RHO * g / jnp.linalg.norm(g))
  assert_close(updates.linear.weight, -LR * grad(moved).linear.weight)
  # scale=1.0 (the default) or the bias trained would give another step.
  unscaled = jax.grad(lambda q: loss_fn(eqx.combine(q, static), x))(moved)
  assert np.max(np.abs(unscaled.linear.weight - grad(moved).linear.weight)
                ) > 1e-3


@pytest.mark.parametrize('has_aux, returns, match', [
    (True, lambda m, x: _activated_loss(m, x),
     r'eqx_grad_fn: with `has_aux=True`, `loss_fn` must return a pair'),
    (False, lambda m, x: (_activated_loss(m, x), {'n': 1}),
     r'eqx_grad_fn: .*`has_aux` is False: pass has_aux=True'),
    (False, lambda m, x: jax.vmap(m)(x),
     r'eqx_grad_fn: `loss_fn` must return the loss as a real floating scalar'),
])
def test_a_wrong_has_aux_is_named(has_aux, returns, match):
  model = _activated_model()
  x = _batches()[0][0]
  grad_fn = equinox_utils.eqx_grad_fn(returns, model, x, has_aux=has_aux)
  with pytest.raises(TypeError, match=match):
    grad_fn(eqx.filter(model, eqx.is_inexact_array))
  with pytest.raises(TypeError, match='eqx_grad_fn: `has_aux` must be a bool'):
    equinox_utils.eqx_grad_fn(returns, model, x, has_aux='yes')


def test_equinox_example_runs_both_dispatch_modes_alike():
  from examples import equinox_example

  result = equinox_example.main(steps=20, log_every=0)
  assert result['host']['compilations'] == 2
  want = rst_optax.decisions(equinox_example.SCHEDULE, equinox_example.SEED,
                             0, 20).sum()
  for mode in ('cond', 'host'):
    assert result[mode]['sam_steps'] == want
    assert result[mode]['final_loss'] < result[mode]['first_loss']
  jax.tree.map(assert_close, result['cond']['params'], result['host']['params'])
