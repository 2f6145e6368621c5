"""Shared fixtures: a tiny least-squares model whose gradients are known."""

import jax
import jax.numpy as jnp
import pytest


def make_problem(key=0, n=32, d=5):
  """A linear least-squares problem: params, loss_fn(params) and its grad."""
  kx, ky, kw = jax.random.split(jax.random.key(key), 3)
  x = jax.random.normal(kx, (n, d))
  y = jax.random.normal(ky, (n,))
  params = {'w': jax.random.normal(kw, (d,)), 'b': jnp.array(0.3, jnp.float32)}

  def loss_fn(p):
    pred = x @ p['w'] + p['b']
    return 0.5 * jnp.mean((pred - y) ** 2) + 0.1 * jnp.sum(p['w'] ** 4)

  return params, loss_fn


@pytest.fixture
def problem():
  return make_problem()
