"""Runs RST on 8 simulated CPU devices and saves the results for test_sharding.

Run by tests/test_sharding.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``:

  python tests/_sharded_worker.py OUT.npz

Each run trains the problem of ``_dist_problem`` for ``STEPS`` steps and saves
its final parameters and the branch each device took at each step:

- ``jit_data``: ``jax.jit`` with ``NamedSharding``, batch sharded over 8
  devices, parameters replicated (JAX's default Explicit mesh axes).
- ``jit_model``: a (4, 2) mesh of Auto axes, batch sharded over ``data``, the
  parameters sharded over ``model``.
- ``smap_global`` / ``smap_local``: ``jax.shard_map`` (``check_vma=True``)
  with ``axis_name='data'`` and ``perturbation='global'`` / ``'local'``.
- ``pmap_global``: ``jax.pmap`` with ``axis_name='data'``, if JAX offers it.
- ``local4_static`` / ``local4_cond``: ``shard_map`` on 4 of the devices with
  ``perturbation='local'`` at p = 1, the branch fixed when tracing
  (``take_sam=True``, as host dispatch does) or drawn in a ``cond``.
- ``jit_data_reuse``, ``smap_global_reuse``, ``smap_local_reuse``: the
  same as ``jit_data`` and ``smap_*`` with ``reuse=REUSE``; the shard_map
  runs also save each device's reuse direction (``NAME/buffers/KEY``).
- ``smap_global_reuse_window``: ``smap_global_reuse`` with ``reuse_window=
  WINDOW`` at p = ``WINDOW_SCHEDULE``, where the window bounds some steps;
  it also saves each device's last SAM step (``NAME/last_sam_step``).

Every run saves ``NAME/params/KEY`` (the final parameters), ``NAME/replicas/
KEY`` (each device's own copy, stacked on a leading axis) and ``NAME/flags``
(steps x devices: the branch each device took; one column for ``jax.jit``).
"""

import sys

import _dist_problem as prob
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rst_optax

N_DEVICES = 8
REUSE = 0.7
WINDOW, WINDOW_SCHEDULE = 1, 0.25


def _record(results, name, params, replicas, flags):
  """Saves final params, per-device replicas (stacked) and per-step flags."""
  for key, value in params.items():
    results[f'{name}/params/{key}'] = np.asarray(value)
  for key, value in replicas.items():
    results[f'{name}/replicas/{key}'] = np.asarray(value)
  results[f'{name}/flags'] = np.asarray(flags, bool)


def run_jit(results, name, mesh, param_specs, reuse=None):
  """jax.jit with the batch sharded over ``data`` and params as specified."""
  with jax.set_mesh(mesh):
    _run_jit(results, name, mesh, param_specs, reuse)


def _run_jit(results, name, mesh, param_specs, reuse=None):
  tx = prob.make_tx(reuse=reuse)
  x, y = prob.make_data()
  shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  params = {k: shard(v, param_specs[k]) for k, v in prob.make_params().items()}
  state = jax.jit(tx.init)(params)
  step = jax.jit(lambda p, s, xb, yb: prob.global_step(tx, p, s, xb, yb))
  flags = []
  for t in range(prob.STEPS):
    params, new_state = step(params, state, shard(x[t], P('data')),
                             shard(y[t], P('data')))
    flags.append(int(prob.took_sam(state, new_state)))
    state = new_state
  for key, value in params.items():
    results[f'{name}/shard_shape/{key}'] = np.array(
        value.addressable_shards[0].data.shape)
  _record(results, name, params, jax.tree.map(lambda a: a[None], params),
          np.asarray(flags)[:, None])


def per_device_step(tx, perturbation, params, state, x, y, take_sam=None):
  """One step on one device's shard of the batch, inside shard_map or pmap."""
  # At replicated params, jax.grad under shard_map (check_vma=True) would sum
  # the gradient over devices; at varying params it is this device's own.
  g = prob.grad(jax.lax.pcast(params, 'data', to='varying'), x, y)
  if perturbation == 'global':
    g = jax.lax.pmean(g, 'data')  # the first gradient, averaged by the user
  updates, new_state = tx.update(g, state, params, take_sam=take_sam,
                                 grad_fn=lambda p: prob.grad(p, x, y))
  return (optax.apply_updates(params, updates), new_state,
          prob.took_sam(state, new_state))


def run_shard_map(results, name, mesh, perturbation, tx=None,
                  take_sam=None):
  """shard_map as a user writes it: replicated parameters and state in and out.

  A replicated array keeps one buffer per device, so each device carries its
  own replica from step to step; the replicas and the branch each device took
  are also returned stacked along ``data`` (``P('data')``) to compare them.
  """
  if tx is None:
    tx = prob.make_tx(axis_name='data', perturbation=perturbation)
  x, y = prob.make_data()

  def body(params, state, xb, yb):
    params, state, took = per_device_step(tx, perturbation, params, state,
                                          xb, yb, take_sam)
    stacked = jax.tree.map(lambda a: a[None], (
        params, getattr(state, 'reuse_direction', {}),
        getattr(state, 'last_sam_step', None)))
    return params, state, stacked, took[None]

  step = jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
      out_specs=(P(), P(), P('data'), P('data'))))
  params = prob.make_params()
  state = tx.init(params)
  flags = []
  for t in range(prob.STEPS):
    params, state, (replicas, buffers, last), took = step(params, state,
                                                          x[t], y[t])
    flags.append(np.asarray(took))
  _record(results, name, params, replicas, flags)
  for key, value in buffers.items():
    results[f'{name}/buffers/{key}'] = np.asarray(value)
  if last is not None:
    results[f'{name}/last_sam_step'] = np.asarray(last)


def run_pmap(results, name):
  """jax.pmap with the parameters and state stacked, one replica per device."""
  tx = prob.make_tx(axis_name='data')
  x, y = prob.make_data()
  stack = lambda tree: jax.tree.map(
      lambda a: np.broadcast_to(a, (N_DEVICES,) + np.shape(a)), tree)
  split = lambda a: a.reshape((N_DEVICES, -1) + a.shape[1:])
  step = jax.pmap(lambda p, s, xb, yb: per_device_step(
      tx, 'global', p, s, xb, yb), axis_name='data')
  params = stack(prob.make_params())
  state = stack(tx.init(prob.make_params()))
  flags = []
  for t in range(prob.STEPS):
    params, state, took = step(params, state, split(x[t]), split(y[t]))
    flags.append(np.asarray(took))
  _record(results, name, {k: v[0] for k, v in params.items()}, params, flags)


def run_local_static_and_cond(results):
  """m-sharpness at p = 1 on 4 devices: the SAM branch fixed when tracing
  (``take_sam=True``) and the one a ``cond`` picks must be the same step."""
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((4,), ('data',), axis_types=(auto,),
                       devices=jax.devices()[:4])
  static = prob.make_tx(axis_name='data', perturbation='local')
  cond = rst_optax.rst(optax.sgd(0.1, momentum=0.9),
                       schedule=optax.constant_schedule(1.0), rho=prob.RHO,
                       lam=prob.LAM, seed=prob.SEED, axis_name='data',
                       perturbation='local')
  run_shard_map(results, 'local4_static', mesh, 'local', static, True)
  run_shard_map(results, 'local4_cond', mesh, 'local', cond)


def main(out_path):
  assert jax.device_count() == N_DEVICES, jax.devices()
  results = {}
  data = jax.make_mesh((N_DEVICES,), ('data',))
  replicated = dict.fromkeys(prob.make_params(), P())
  run_jit(results, 'jit_data', data, replicated)
  auto = jax.sharding.AxisType.Auto
  run_jit(results, 'jit_model',
          jax.make_mesh((4, 2), ('data', 'model'), axis_types=(auto, auto)),
          {'w1': P(None, 'model'), 'b1': P('model'), 'w2': P('model', None),
           'b2': P()})
  data = jax.make_mesh((N_DEVICES,), ('data',), axis_types=(auto,))
  for perturbation in ('global', 'local'):
    run_shard_map(results, f'smap_{perturbation}', data, perturbation)
    run_shard_map(results, f'smap_{perturbation}_reuse', data, perturbation,
                  prob.make_tx(axis_name='data', perturbation=perturbation,
                               reuse=REUSE))
  run_jit(results, 'jit_data_reuse', jax.make_mesh((N_DEVICES,), ('data',)),
          replicated, REUSE)
  run_shard_map(results, 'smap_global_reuse_window', data, 'global',
                prob.make_tx(WINDOW_SCHEDULE, axis_name='data', reuse=REUSE,
                             reuse_window=WINDOW))
  if hasattr(jax, 'pmap'):
    run_pmap(results, 'pmap_global')
  run_local_static_and_cond(results)
  np.savez(out_path, **results)


if __name__ == '__main__':
  main(sys.argv[1])
