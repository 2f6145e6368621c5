"""Shared fixtures: a tiny least-squares model, and a compilation counter."""

import collections
import contextlib
import logging
import re

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


_FINISHED = re.compile(r'Finished XLA compilation of (?:\w+\()?([^()\s]+)\)? in')


class _CompileCounter(logging.Handler):
  """Counts JAX's "Finished XLA compilation of jit(name)" log records."""

  def __init__(self, counts):
    super().__init__(level=logging.DEBUG)
    self.counts = counts

  def emit(self, record):
    match = _FINISHED.search(record.getMessage())
    if match:
      self.counts[match.group(1)] += 1


@contextlib.contextmanager
def count_compilations():
  """XLA compilations in the block, by function name, from JAX's compile log.

  Yields a ``collections.Counter`` from the jitted function's name (e.g.
  ``'train_step'`` for ``jax.jit(train_step)``) to the number of executables
  compiled for it inside the block, as optax's ``test_utils.log_compilations``
  reads them.
  """
  counts = collections.Counter()
  handler = _CompileCounter(counts)
  logger = logging.getLogger('jax')
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      yield counts
  finally:
    logger.removeHandler(handler)


@pytest.fixture
def compilations():
  """The :func:`count_compilations` context manager, for tests."""
  return count_compilations
