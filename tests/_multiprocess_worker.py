"""One of two processes that train RST together on one global CPU mesh.

Run by tests/test_multiprocess.py, twice, on loopback:

  python tests/_multiprocess_worker.py PROCESS_ID PORT OUT.npz

Each process has ``LOCAL_DEVICES`` CPU devices; ``jax.distributed`` joins them
into one mesh of ``2 * LOCAL_DEVICES`` devices with gloo CPU collectives. Two
runs of ``_dist_problem`` follow, with the batch sharded over all devices of
both processes: ``jax.jit`` with ``NamedSharding`` (parameters replicated), and
``jax.shard_map`` with ``axis_name`` (the SAM branch's ``pmean`` crosses
processes). Each process saves its own copy of the final parameters and the
branch taken at each step.
"""

import sys

import _dist_problem as prob
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

NUM_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 60


def main(process_id, port, out_path):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.config.update('jax_num_cpu_devices', LOCAL_DEVICES)
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}', num_processes=NUM_PROCESSES,
      process_id=process_id, initialization_timeout=TIMEOUT_S)
  try:
    results = train()
  finally:
    jax.distributed.shutdown()
  np.savez(out_path, **results)


def local_value(x):
  """This process's copy of a replicated global array."""
  return np.asarray(x.addressable_data(0))


def train():
  assert jax.process_count() == NUM_PROCESSES
  assert jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  x, y = prob.make_data()

  def global_array(a, spec):
    # Every process holds the whole batch in NumPy and hands each of its own
    # devices that device's shard.
    return jax.make_array_from_callback(
        a.shape, NamedSharding(mesh, spec), lambda index: a[index])

  def shard_map_step(params, state, xb, yb):
    local = jax.lax.pcast(params, 'data', to='varying')
    g = jax.lax.pmean(prob.grad(local, xb, yb), 'data')
    updates, new_state = tx_axis.update(g, state, params,
                                        grad_fn=lambda p: prob.grad(p, xb, yb))
    return optax.apply_updates(params, updates), new_state

  tx = prob.make_tx()
  tx_axis = prob.make_tx(axis_name='data')
  steps = {
      'jit': (tx, jax.jit(
          lambda p, s, xb, yb: prob.global_step(tx, p, s, xb, yb),
          out_shardings=replicated)),
      'shard_map': (tx_axis, jax.jit(jax.shard_map(
          shard_map_step, mesh=mesh,
          in_specs=(P(), P(), P('data'), P('data')), out_specs=P()))),
  }
  results = {'process_index': np.array(jax.process_index()),
             'local_devices': np.array([d.id for d in jax.local_devices()])}
  for name, (transform, step) in steps.items():
    params = jax.tree.map(lambda a: global_array(a, P()), prob.make_params())
    state = jax.tree.map(lambda a: global_array(np.asarray(a), P()),
                         transform.init(prob.make_params()))
    sam_steps = [0]
    for t in range(prob.STEPS):
      params, state = step(params, state, global_array(x[t], P('data')),
                           global_array(y[t], P('data')))
      sam_steps.append(int(local_value(state.sam_steps)))
    for key, value in params.items():
      results[f'{name}/params/{key}'] = local_value(value)
    results[f'{name}/flags'] = np.diff(sam_steps).astype(bool)
  return results


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
