"""Coming from `optax.contrib.sam` (docs/migrating.md): what the page claims.

`rst(base_tx, schedule=1.0, rho=r)` is `optax.contrib.sam(base_tx,
optax.chain(optax.contrib.normalize(), optax.sgd(r)), sync_period=2,
opaque_mode=True)`: the same trajectory with SGD, and the same single step,
to round-off, with Adam. A `grad_fn` of two arguments, as opaque mode takes,
is refused with the one-argument form.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import rst_optax

RHO = 0.05


def mlp_problem(key=0, n=64, d=6, width=16):
  """A small tanh MLP on random regression data, in 4 batches."""
  kx, ky, k1, k2 = jax.random.split(jax.random.key(key), 4)
  x = jax.random.normal(kx, (n, d))
  y = jnp.sin(x @ jax.random.normal(ky, (d,)))
  params = {'w1': jax.random.normal(k1, (d, width)) / jnp.sqrt(d),
            'b1': jnp.zeros(width),
            'w2': jax.random.normal(k2, (width,)) / jnp.sqrt(width)}

  def loss_fn(p, batch):
    bx, by = batch
    return jnp.mean((jnp.tanh(bx @ p['w1'] + p['b1']) @ p['w2'] - by) ** 2)

  batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
  return params, loss_fn, batches


def the_pair(base_tx):
  """`rst` at p = 1 and the `optax.contrib.sam` configuration the page names."""
  ours = rst_optax.rst(base_tx, schedule=1.0, rho=RHO)
  theirs = optax.contrib.sam(
      base_tx, optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      sync_period=2, opaque_mode=True)
  return ours, theirs


def test_sgd_trajectory_equals_optax_contrib_sam_opaque_over_100_steps():
  params, loss_fn, batches = mlp_problem()
  ours, theirs = the_pair(optax.sgd(0.05, momentum=0.9))

  @jax.jit
  def step_ours(p, s, batch):
    grad_fn = lambda q: jax.grad(loss_fn)(q, batch)
    u, s = ours.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  @jax.jit
  def step_theirs(p, s, batch):
    grad_fn = lambda q, _: jax.grad(loss_fn)(q, batch)  # opaque mode's form
    u, s = theirs.update(grad_fn(p, 0), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  p_ours = p_theirs = params
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  start = loss_fn(params, batches[0])
  for t in range(100):
    batch = batches[t % len(batches)]
    p_ours, s_ours = step_ours(p_ours, s_ours, batch)
    p_theirs, s_theirs = step_theirs(p_theirs, s_theirs, batch)
    chex.assert_trees_all_close(p_ours, p_theirs, rtol=1e-5, atol=1e-6)
  assert int(s_ours.count) == int(s_ours.sam_steps) == 100
  assert loss_fn(p_ours, batches[0]) < 0.5 * start  # it did train


def with_opt_state(state, opt_state):
  """``optax.contrib.sam``'s state with another ``opt_state``: a NamedTuple
  in recent Optax, a chex dataclass in 0.2.5 (the lowest we support)."""
  if hasattr(state, '_replace'):
    return state._replace(opt_state=opt_state)
  return state.replace(opt_state=opt_state)


def test_adam_each_step_equals_optax_contrib_sam_opaque_from_the_same_state():
  params, loss_fn, batches = mlp_problem(key=1)
  ours, theirs = the_pair(optax.adam(1e-2))
  @jax.jit
  def both_steps(p, s_ours, batch):
    grad_fn = lambda q: jax.grad(loss_fn)(q, batch)
    g = grad_fn(p)
    # optax.contrib.sam's state at the same point: Adam's state from rst's.
    s_theirs = with_opt_state(theirs.init(p), s_ours.base_state)
    u_theirs, s_theirs = theirs.update(g, s_theirs, p,
                                       grad_fn=lambda q, _: grad_fn(q))
    u_ours, s_ours = ours.update(g, s_ours, p, grad_fn=grad_fn)
    return u_ours, s_ours, u_theirs, s_theirs

  p, s_ours = params, ours.init(params)
  for t in range(30):
    u_ours, s_ours, u_theirs, s_theirs = both_steps(
        p, s_ours, batches[t % len(batches)])
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(s_ours.base_state, s_theirs.opt_state,
                                rtol=1e-5, atol=1e-7)
    p = optax.apply_updates(p, u_ours)


def two_args(p, _):
  return p


class Model:
  def grads(self, p):
    return p


@pytest.mark.parametrize('grad_fn', [
    lambda p, _: p,  # optax.contrib.sam's opaque-mode form
    two_args,
    lambda: None,  # no argument at all
    lambda p, *, batch: p,  # a keyword-only argument without a default
    jax.grad(lambda p, batch: jnp.sum(p * batch)),  # the batch not closed over
], ids=['opaque-mode-lambda', 'function', 'no-argument', 'keyword-only',
        'jax-grad-of-two'])
@pytest.mark.parametrize('dispatch', ['cond', 'static'])
def test_a_grad_fn_that_needs_other_than_one_argument_is_refused(
    grad_fn, dispatch):
  tx = rst_optax.rst(optax.sgd(0.1))
  params = jnp.ones(3)
  take_sam = True if dispatch == 'static' else None
  with pytest.raises(TypeError, match='rst: `grad_fn` must take one '
                     'positional argument') as info:
    jax.make_jaxpr(lambda s: tx.update(params, s, params, grad_fn=grad_fn,
                                       take_sam=take_sam))(tx.init(params))
  assert info.match(r'grad_fn=lambda p: jax\.grad\(loss_fn\)\(p, batch\)')


@pytest.mark.parametrize('grad_fn', [
    lambda p: p,
    lambda p, batch=None: p,  # further arguments with defaults
    lambda *args: args[0],
    lambda p, *rest, **kwargs: p,
    functools.partial(two_args, _=None),
    functools.partial(lambda batch, p: p, None),
    Model().grads,  # a bound method
    jax.grad(lambda p: jnp.sum(p ** 2)),
    jax.jit(lambda p: p),
    jax.tree_util.Partial(two_args, _=None),
    jnp.negative,  # a ufunc-like object, whatever its signature says
], ids=['lambda', 'default', 'star-args', 'star-args-kwargs', 'partial-kw',
        'partial-positional', 'bound-method', 'jax-grad', 'jax-jit',
        'tree-util-partial', 'jnp-function'])
def test_one_argument_callables_pass_the_arity_check(grad_fn):
  tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0)
  params = jnp.ones(3)
  updates, state = tx.update(params, tx.init(params), params, grad_fn=grad_fn)
  assert int(state.sam_steps) == 1 and updates.shape == (3,)


def test_a_callable_without_a_signature_is_not_refused():
  class NoSignature:
    __signature__ = 'not a signature'  # inspect.signature raises TypeError

    def __call__(self, p):
      return p

  tx = rst_optax.rst(optax.sgd(0.1), schedule=1.0)
  params = jnp.ones(3)
  _, state = tx.update(params, tx.init(params), params,
                       grad_fn=NoSignature())
  assert int(state.sam_steps) == 1
