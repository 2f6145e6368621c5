"""The argument checks (`rst_optax._checks`) as users meet them: 16-bit
numbers, the coin's key and step, PRNG keys among the parameters, the
messages for single-array parameters, whole-shape comparisons, and the check
that an ``axis_name`` is bound."""

import decimal
import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

import rst_optax
from rst_optax import _checks

SIXTEEN_BITS = [jnp.bfloat16, jnp.float16]


def in_graph_decisions(tx, steps):
  """Which of ``steps`` jitted updates of ``tx`` took the SAM branch."""
  params = jnp.zeros(3)

  def body(state, _):
    before = state.sam_steps
    _, state = tx.update(jnp.ones(3), state, params,
                         grad_fn=lambda p: -jnp.ones(3))
    return state, state.sam_steps > before

  _, took = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(
      tx.init(params))
  return np.asarray(took)


# 16-bit numbers (bfloat16's NumPy kind is 'V', not 'f').


@pytest.mark.parametrize('dtype', SIXTEEN_BITS, ids=['bfloat16', 'float16'])
@pytest.mark.parametrize('name, value', [('schedule', 0.5), ('rho', 0.05),
                                         ('lam', 2.0)])
def test_16_bit_scalars_are_numbers(dtype, name, value):
  params = jnp.ones(3)
  for number in (dtype(value), jnp.asarray(value, dtype),
                 np.asarray(value, dtype)):
    assert _checks._is_real_scalar(number)
    tx = rst_optax.rst(optax.sgd(0.1), **({'schedule': 1.0} | {name: number}))
    updates, state = jax.jit(lambda w, s, tx=tx: tx.update(
        w, s, w, grad_fn=lambda p: 2 * p))(params, tx.init(params))
    assert jnp.all(jnp.isfinite(updates)) and int(state.count) == 1


@pytest.mark.parametrize('dtype', SIXTEEN_BITS, ids=['bfloat16', 'float16'])
def test_16_bit_schedules_draw_the_coin_of_decisions(dtype):
  """A schedule returning a 16-bit scalar, and a 16-bit constant: the
  in-graph coin takes the host-side decisions."""
  steps = 200
  returning = lambda t: jnp.where(t < 100, 0.25, 0.75).astype(dtype)
  for schedule in (returning, dtype(0.7)):
    tx = rst_optax.rst(optax.identity(), schedule=schedule, rho=1.0, seed=5)
    took = in_graph_decisions(tx, steps)
    np.testing.assert_array_equal(
        took, rst_optax.decisions(schedule, 5, 0, steps))
    assert 0 < took.sum() < steps
  _checks.schedule_value('rst', 'schedule', jax.ShapeDtypeStruct((), dtype))


@pytest.mark.parametrize('value', [True, np.bool_(False), jnp.asarray(True),
                                   jnp.complex64(1), jax.random.key(0),
                                   jnp.ones(2, jnp.bfloat16)])
def test_bools_complex_keys_and_vectors_are_still_not_numbers(value):
  assert not _checks._is_real_scalar(value)
  with pytest.raises(TypeError, match='must return a real scalar'):
    _checks.schedule_value('rst', 'schedule', value)


# The coin's key and step: checked by dtype and shape, when tracing.


@pytest.mark.parametrize('step', [0.7, np.float32(3.0), jnp.asarray(3.0),
                                  True, np.bool_(True), jnp.asarray(True),
                                  jnp.arange(2), '3'])
def test_coin_refuses_a_step_that_is_not_an_integer(step):
  with pytest.raises(TypeError, match='coin: `step` must be an int'):
    rst_optax.coin(jax.random.key(0), step, 0.5)


@pytest.mark.parametrize('step', [-1, 2**31, np.int64(-3)])
def test_coin_refuses_a_step_outside_the_int32_count(step):
  with pytest.raises(ValueError, match='coin: `step`'):
    rst_optax.coin(jax.random.key(0), step, 0.5)


@pytest.mark.parametrize('key, error', [
    (0, TypeError), (np.int32(3), TypeError), (jnp.asarray(3), TypeError),
    (0.5, TypeError), (jax.random.split(jax.random.key(0), 2), TypeError),
    (np.zeros(3, np.uint32), ValueError),
])
def test_coin_refuses_a_key_that_is_not_one_prng_key(key, error):
  with pytest.raises(error, match='coin: .*`key`'):
    rst_optax.coin(key, 3, 0.5)


def test_coin_takes_the_keys_and_steps_rst_uses():
  key = jax.random.key(7)
  want = [bool(jax.random.bernoulli(jax.random.fold_in(key, t), 0.5))
          for t in range(16)]
  assert [bool(rst_optax.coin(key, t, 0.5)) for t in range(16)] == want
  assert [bool(rst_optax.coin(jax.random.PRNGKey(7), np.int64(t), 0.5))
          for t in range(16)] == want
  traced = jax.jit(jax.vmap(lambda t: rst_optax.coin(key, t, 0.5)))
  assert np.asarray(traced(jnp.arange(16, dtype=jnp.int32))).tolist() == want
  assert np.asarray(traced(jnp.arange(16, dtype=jnp.uint8))).tolist() == want


def test_the_coin_checks_add_nothing_to_the_graph():
  """The checks read dtypes and shapes only: the traced coin is the bare
  draw."""
  key = jax.random.key(0)
  coin = jax.make_jaxpr(lambda k, t: rst_optax.coin(k, t, 0.5))(
      key, jnp.int32(3))
  bare = jax.make_jaxpr(lambda k, t: jax.random.bernoulli(
      jax.random.fold_in(k, t), jnp.clip(jnp.asarray(0.5, jnp.float32), 0.0,
                                         1.0)))(key, jnp.int32(3))
  assert [e.primitive for e in coin.eqns] == [e.primitive for e in bare.eqns]


# PRNG keys among the parameters.


@pytest.mark.parametrize('where', ['params', 'updates'])
def test_a_typed_key_among_the_parameters_is_refused_by_name(where):
  keyed = {'w': jnp.ones(3), 'rng': jax.random.key(0)}
  plain = {'w': jnp.ones(3), 'rng': jnp.zeros([])}
  tx = rst_optax.rst(optax.sgd(0.1))
  match = (rf"rst: every leaf of `{where}` must have a real floating dtype; "
           r"the leaf at \['rng'\] is a PRNG key")
  if where == 'params':  # refused as soon as init sees it
    with pytest.raises(TypeError, match=match):
      tx.init(keyed)
    return
  with pytest.raises(TypeError, match=match):
    tx.update(keyed, tx.init(plain), plain, grad_fn=lambda p: p)


# Single-array parameters: the root is named, the loss recognised.


def test_single_array_grad_fn_messages_name_the_root_and_the_loss():
  params = jnp.ones(5)
  loss_fn = lambda w: jnp.sum(w ** 2)
  tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r'at \(the root\) got \(\) for \(5,\)'
                     '. It looks like the loss itself'):
    tx.update(params, state, params, grad_fn=loss_fn)
  with pytest.raises(ValueError, match=r'at \(the root\) got \(4,\) for '
                     r'\(5,\)\.$'):
    tx.update(params, state, params, grad_fn=lambda w: jnp.ones(4))
  with pytest.raises(TypeError, match=r'leaf at \(the root\) is int32\.$'):
    tx.update(params, state, params,
              grad_fn=lambda w: jnp.ones(5, jnp.int32))


def test_a_scalar_parameter_with_an_integer_gradient_gets_no_loss_hint():
  params = jnp.ones([])
  tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0)
  with pytest.raises(TypeError) as info:
    tx.update(params, tx.init(params), params,
              grad_fn=lambda w: jnp.ones([], jnp.int32))
  assert 'looks like' not in str(info.value)


# Whole shapes, not ranks.


@pytest.mark.parametrize('shape', [(1,), (5, 1), (1, 5)])
def test_shapes_are_compared_whole(shape):
  params = {'w': jnp.ones(5)}
  wrong = {'w': jnp.ones(shape)}
  tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"rst: `updates` must have the shapes "
                     rf"of `params`; at \['w'\] got \({shape[0]},"):
    tx.update(wrong, state, params, grad_fn=lambda p: p)
  with pytest.raises(ValueError, match=r"rst: `grad_fn\(params\)` must have "
                     r"the shapes of `params`; at \['w'\]"):
    tx.update(params, state, params, grad_fn=lambda p: wrong)


# axis_name_bound: for rst(..., axis_name=...).


def _bound(x):
  _checks.axis_name_bound('rst', 'data')
  return x


@pytest.mark.parametrize('where', ['eager', 'jit', 'vmap-other-axis'])
def test_axis_name_bound_refuses_an_unbound_axis(where):
  run = {
      'eager': lambda: _bound(1.0),
      'jit': lambda: jax.jit(_bound)(1.0),
      'vmap-other-axis': lambda: jax.vmap(_bound, axis_name='batch')(
          jnp.ones(2)),
  }[where]
  with pytest.raises(ValueError, match=r"rst: `axis_name`='data' is not a "
                     'bound axis.*shard_map or jax.pmap.*jax.vmap'):
    run()


def test_axis_name_bound_accepts_a_bound_axis_at_no_cost():
  mesh = jax.make_mesh((1,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  spec = PartitionSpec()
  jax.jit(jax.shard_map(_bound, mesh=mesh, in_specs=spec, out_specs=spec))(
      1.0)
  jax.pmap(_bound, axis_name='data')(jnp.ones(1))
  jaxpr = jax.make_jaxpr(jax.vmap(_bound, axis_name='data'))(jnp.ones(2))
  assert not jaxpr.eqns  # nothing traced


# Number types JAX cannot take, callables where a number belongs, and
# schedules of the wrong arity: refused by name when rst is built.

NUMBER_ARGS = ['schedule', 'rho', 'lam', 'reuse', 'eta', 'eps']


@pytest.mark.parametrize('name', NUMBER_ARGS)
@pytest.mark.parametrize('value', [fractions.Fraction(1, 2),
                                   decimal.Decimal('0.5')], ids=str)
def test_fractions_and_decimals_are_refused_by_name(name, value):
  with pytest.raises(TypeError, match=rf'rst: `{name}` must be .*got '
                     rf'{type(value).__name__}.*pass float\(value\)'):
    rst_optax.rst(optax.sgd(0.1), **{name: value})


@pytest.mark.parametrize('name', ['eta', 'eps'])
def test_a_callable_eps_or_eta_is_refused(name):
  with pytest.raises(TypeError, match=rf'rst: `{name}` must be a finite '
                     'number'):
    rst_optax.rst(optax.sgd(0.1), **{name: lambda t: 0.01})


@pytest.mark.parametrize('name', ['schedule', 'rho', 'lam', 'reuse'])
@pytest.mark.parametrize('schedule', [lambda t, extra: 0.5, lambda: 0.5,
                                      lambda *, count: 0.5],
                         ids=['two', 'none', 'keyword-only'])
def test_a_schedule_of_the_wrong_arity_is_refused_by_name(name, schedule):
  with pytest.raises(TypeError, match=rf'rst: the `{name}` schedule must take '
                     'one positional argument, the step count'):
    rst_optax.rst(optax.sgd(0.1), **{name: schedule})


def test_schedules_of_one_positional_argument_are_accepted():
  class Schedule:
    def __call__(self, count, scale=1.0):
      return 0.5 * scale

  for schedule in (lambda t: 0.5, lambda *a: 0.5, Schedule(),
                   functools.partial(lambda t, s: 0.5 * s, s=1.0),
                   optax.constant_schedule(0.5)):
    tx = rst_optax.rst(optax.sgd(0.1), schedule=schedule, rho=schedule,
                       lam=schedule, reuse=schedule)
    _, state = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)), jnp.zeros(3),
                         grad_fn=lambda p: p + 1, take_sam=True)
    assert int(state.sam_steps) == 1
  rst_optax.decisions(lambda t: 0.5, 0, 0, 4)
  with pytest.raises(TypeError, match='decisions: the `schedule` schedule '
                     'must take one positional argument'):
    rst_optax.decisions(lambda t, extra: 0.5, 0, 0, 4)
