"""The BatchNorm problem the Flax and Equinox tests share with plain JAX.

A Dense-BatchNorm-ReLU-Dense net trained with G-RST and SGD for a few steps
on fixed random batches, whose coin takes both branches.
"""

import jax
import numpy as np
import optax

import rst_optax

LR, RHO, LAM, MOMENTUM, EPS = 0.1, 0.3, 2.0, 0.9, 1e-5
SEED, STEPS = 3, 6


def batches():
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (STEPS, 16, 3)) * 2.0 + 0.5
  y = jax.random.normal(ky, (STEPS, 16, 2))
  return x, y


def decisions():
  d = rst_optax.decisions(0.5, SEED, 0, STEPS)
  assert d.any() and not d.all()  # both branches occur in the run
  return d


def make_tx(schedule=0.5):
  return rst_optax.rst(optax.sgd(LR), schedule, rho=RHO, lam=LAM, seed=SEED)


def assert_close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-6)
