"""RST on 8 simulated CPU devices equals RST on one device.

The 8-device runs happen in one subprocess (tests/_sharded_worker.py) started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, since this pytest
process has already initialized JAX with one device; the single-device
references run here, and so do the ``jax.vmap(axis_name=...)`` runs at the
end, which simulate the devices within one.
"""

import functools
import os
import pathlib
import subprocess
import sys

import _dist_problem as prob
import _jaxpr
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rst_optax

WORKER = pathlib.Path(__file__).with_name('_sharded_worker.py')
N_DEVICES = 8
# Sharded reductions sum in another order than one device: agree to float32
# rounding, accumulated over STEPS steps of training.
TOL = {'rtol': 1e-5, 'atol': 1e-6}


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
  out = tmp_path_factory.mktemp('sharded') / 'results.npz'
  flags = os.environ.get('XLA_FLAGS', '')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      f'{flags} --xla_force_host_platform_device_count={N_DEVICES}'))
  # A collective that hangs (devices in different branches) ends in timeout.
  proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  with np.load(out) as results:
    return dict(results)


@pytest.fixture(scope='module')
def single_device():
  return prob.run_single_device()


def params_of(results, name):
  prefix = f'{name}/params/'
  return {k[len(prefix):]: v for k, v in results.items()
          if k.startswith(prefix)}


@functools.cache
def expected_decisions():
  return rst_optax.decisions(prob.SCHEDULE, prob.SEED, 0, prob.STEPS)


def test_reference_run_takes_both_branches(single_device):
  _, flags = single_device
  np.testing.assert_array_equal(flags, expected_decisions())
  assert 0 < flags.sum() < prob.STEPS


@pytest.mark.parametrize('name', ['jit_data', 'jit_model'])
def test_jit_with_named_sharding_equals_one_device(sharded, single_device,
                                                   name):
  want_params, want_flags = single_device
  got = params_of(sharded, name)
  assert got.keys() == want_params.keys()
  for key in got:
    np.testing.assert_allclose(got[key], want_params[key], **TOL, err_msg=key)
  np.testing.assert_array_equal(sharded[f'{name}/flags'][:, 0], want_flags)


def test_jit_runs_shard_as_requested(sharded):
  """The batch-sharded run keeps parameters whole, the model-sharded run
  splits them over the 2-device ``model`` axis (so the norm is global)."""
  shape = lambda name, key: tuple(sharded[f'{name}/shard_shape/{key}'])
  assert shape('jit_data', 'w1') == (prob.DIM, prob.HIDDEN)
  assert shape('jit_model', 'w1') == (prob.DIM, prob.HIDDEN // 2)
  assert shape('jit_model', 'w2') == (prob.HIDDEN // 2, prob.CLASSES)


@pytest.mark.parametrize('name', ['smap_global', 'pmap_global'])
def test_axis_name_global_perturbation_equals_one_device(
    sharded, single_device, name):
  if f'{name}/flags' not in sharded:
    pytest.skip('jax.pmap is not offered by this JAX version')
  want_params, _ = single_device
  got = params_of(sharded, name)
  for key in want_params:
    np.testing.assert_allclose(got[key], want_params[key], **TOL, err_msg=key)


@pytest.mark.parametrize('name', ['smap_global', 'smap_local', 'pmap_global'])
def test_coin_is_replicated_and_replicas_stay_identical(sharded, name):
  """Every device draws the coin of (seed, t), never folded with its index,
  so all take the branch holding the ``pmean`` together (the worker finished:
  no hang) and their replicas of the parameters stay bit-identical."""
  if f'{name}/flags' not in sharded:
    pytest.skip('jax.pmap is not offered by this JAX version')
  flags = sharded[f'{name}/flags']
  assert flags.shape == (prob.STEPS, N_DEVICES)
  for device in range(N_DEVICES):
    np.testing.assert_array_equal(flags[:, device], expected_decisions())
  for key in prob.make_params():
    replicas = sharded[f'{name}/replicas/{key}']
    assert replicas.shape[0] == N_DEVICES
    for device in range(1, N_DEVICES):
      np.testing.assert_array_equal(replicas[device], replicas[0])


def m_sharpness_reference():
  """Per-device perturbation by hand: each shard perturbs with its own
  gradient and evaluates its own loss there; both gradients are averaged."""
  x, y = prob.make_data()
  params = prob.make_params()
  base = optax.sgd(0.1, momentum=0.9)
  base_state = base.init(params)
  per_device = jax.vmap(prob.grad, in_axes=(None, 0, 0))

  @jax.jit
  def step(params, base_state, xs, ys, take):
    g_dev = per_device(params, xs, ys)
    g = jax.tree.map(lambda a: a.mean(0), g_dev)

    def perturbed_grad(g_i, x_i, y_i):
      scale = prob.RHO / (optax.tree.norm(g_i) + 1e-12)
      return prob.grad(optax.tree.add_scale(params, scale, g_i), x_i, y_i)

    g_sam = jax.tree.map(lambda a: a.mean(0),
                         jax.vmap(perturbed_grad)(g_dev, xs, ys))
    mixed = jax.tree.map(lambda a, b: (1 - prob.LAM) * a + prob.LAM * b,
                         g, g_sam)
    direction = optax.tree.where(take, mixed, g)
    updates, base_state = base.update(direction, base_state, params)
    return optax.apply_updates(params, updates), base_state

  split = lambda a: a.reshape((N_DEVICES, -1) + a.shape[1:])
  for t, take in enumerate(expected_decisions()):
    params, base_state = step(params, base_state, split(x[t]), split(y[t]),
                              jnp.asarray(take))
  return params


def test_local_perturbation_is_per_device_m_sharpness(sharded,
                                                      single_device):
  want = m_sharpness_reference()
  got = params_of(sharded, 'smap_local')
  global_params, _ = single_device
  for key in want:
    np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=key)
  # And it is a different method from the global perturbation.
  assert not np.allclose(got['w1'], global_params['w1'], **TOL)


def test_local_static_sam_step_equals_the_cond_path(sharded):
  """On 4 devices at p = 1, ``take_sam=True`` (the branch fixed when tracing,
  as host dispatch runs it) perturbs each device along its own gradient,
  exactly as the ``cond`` path does."""
  static = params_of(sharded, 'local4_static')
  cond = params_of(sharded, 'local4_cond')
  assert static.keys() == cond.keys() == prob.make_params().keys()
  for key in static:
    np.testing.assert_allclose(static[key], cond[key], rtol=1e-6, atol=1e-7,
                               err_msg=key)
  assert sharded['local4_static/flags'].shape == (prob.STEPS, 4)
  assert sharded['local4_static/flags'].all()
  assert sharded['local4_cond/flags'].all()


# --- reuse (LookSAM) across devices -------------------------------------------

REUSE = 0.7  # as in _sharded_worker


@pytest.mark.parametrize('name', ['jit_data_reuse', 'smap_global_reuse'])
def test_reuse_across_devices_equals_one_device(sharded, name):
  want_params, want_flags = prob.run_single_device(reuse=REUSE)
  got = params_of(sharded, name)
  for key in want_params:
    np.testing.assert_allclose(got[key], want_params[key], **TOL, err_msg=key)
  plain, _ = prob.run_single_device()
  assert not np.allclose(want_params['w1'], plain['w1'], **TOL)
  assert 0 < want_flags.sum() < prob.STEPS


@pytest.mark.parametrize('name', ['smap_global_reuse', 'smap_local_reuse'])
def test_the_reuse_buffer_is_the_same_on_every_device(sharded, name):
  """The buffer comes from the averaged gradient and direction: every device
  keeps the same bits, and the replicas of the parameters stay equal."""
  flags = sharded[f'{name}/flags']
  for device in range(N_DEVICES):
    np.testing.assert_array_equal(flags[:, device], expected_decisions())
  for key in prob.make_params():
    for kind in ('buffers', 'replicas'):
      stacked = sharded[f'{name}/{kind}/{key}']
      assert stacked.shape[0] == N_DEVICES
      for device in range(1, N_DEVICES):
        np.testing.assert_array_equal(stacked[device], stacked[0])
    assert np.any(sharded[f'{name}/buffers/{key}'][0] != 0)


# --- jax.vmap(..., axis_name=...): the same collectives, in this process ----


def run_vmap(perturbation, reuse=None):
  """RST with ``axis_name`` under ``jax.vmap``: N_DEVICES simulated devices,
  each on its shard of the batch, with the parameters and state shared (not
  mapped), so the coin stays a ``cond``. Returns (params, flags), and checks
  at every step that all devices returned the same parameters and state."""
  tx = prob.make_tx(axis_name='data', perturbation=perturbation, reuse=reuse)
  x, y = prob.make_data()
  split = lambda a: a.reshape((N_DEVICES, -1) + a.shape[1:])

  def body(params, state, xb, yb):
    g = prob.grad(params, xb, yb)
    if perturbation == 'global':
      g = jax.lax.pmean(g, 'data')
    updates, new_state = tx.update(g, state, params,
                                   grad_fn=lambda p: prob.grad(p, xb, yb))
    return (optax.apply_updates(params, updates), new_state,
            prob.took_sam(state, new_state))

  mapped = jax.vmap(body, axis_name='data', in_axes=(None, None, 0, 0))
  params, state = prob.make_params(), tx.init(prob.make_params())
  jaxpr = jax.make_jaxpr(mapped)(params, state, split(x[0]), split(y[0]))
  assert _jaxpr.gradient_conds(jaxpr) == 1  # the branch is chosen in the graph
  step = jax.jit(mapped)
  flags = []
  for t in range(prob.STEPS):
    params, state, took = step(params, state, split(x[t]), split(y[t]))
    for leaf in jax.tree.leaves((params, state, took)):
      for device in range(1, N_DEVICES):
        np.testing.assert_array_equal(leaf[device], leaf[0])
    params, state = jax.tree.map(lambda a: a[0], (params, state))
    flags.append(np.asarray(took))
  if reuse is not None:
    assert np.any(np.asarray(state.reuse_direction['w1']) != 0)
  return params, np.stack(flags)


@pytest.mark.parametrize('perturbation,reuse', [
    ('global', None), ('local', None), ('global', REUSE)])
def test_vmap_axis_name_takes_the_coin_and_matches_the_references(
    single_device, perturbation, reuse):
  """Under ``jax.vmap(axis_name=...)`` the ``cond`` path runs (it used to
  crash inside ``jax.lax.pcast``): every device draws the same coin and
  keeps the same bits; global equals one device, local equals per-device
  m-sharpness, and reuse equals one device with reuse."""
  params, flags = run_vmap(perturbation, reuse)
  assert flags.shape == (prob.STEPS, N_DEVICES)
  np.testing.assert_array_equal(flags[:, 0], expected_decisions())
  if perturbation == 'local':
    want = m_sharpness_reference()
  elif reuse is None:
    want, _ = single_device
  else:
    want, _ = prob.run_single_device(reuse=reuse)
  for key in want:
    np.testing.assert_allclose(params[key], want[key], **TOL, err_msg=key)


def test_reuse_window_across_devices_equals_one_device(sharded):
  """With ``reuse_window`` under ``shard_map``: every device takes the coin's
  branches and keeps the same last SAM step and buffer, and the run equals
  one device with the same window (which differs from no window here)."""
  name = 'smap_global_reuse_window'
  schedule, window = 0.25, 1  # as in _sharded_worker
  plan = rst_optax.decisions(schedule, prob.SEED, 0, prob.STEPS)
  last = np.flatnonzero(plan)
  stale = [t for t in range(prob.STEPS) if not plan[t] and last[last < t].size
           and t - last[last < t][-1] > window]
  assert stale  # the window bounds some base steps
  flags = sharded[f'{name}/flags']
  for device in range(N_DEVICES):
    np.testing.assert_array_equal(flags[:, device], plan)
  np.testing.assert_array_equal(sharded[f'{name}/last_sam_step'],
                                np.full(N_DEVICES, last[-1]))
  for key in prob.make_params():
    for kind in ('buffers', 'replicas'):
      stacked = sharded[f'{name}/{kind}/{key}']
      for device in range(1, N_DEVICES):
        np.testing.assert_array_equal(stacked[device], stacked[0])
  want, _ = prob.run_single_device(reuse=REUSE, reuse_window=window,
                                   schedule=schedule)
  got = params_of(sharded, name)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=key)
  unbounded, _ = prob.run_single_device(reuse=REUSE, schedule=schedule)
  assert not np.allclose(want['w1'], unbounded['w1'], **TOL)
