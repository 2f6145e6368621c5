"""Two processes on loopback train RST on one global mesh and agree exactly.

Each process runs tests/_multiprocess_worker.py with 2 CPU devices;
``jax.distributed.initialize`` (gloo CPU collectives) makes one mesh of 4
devices. The test starts both processes on a free port and kills them if they
do not finish in time.
"""

import os
import pathlib
import socket
import subprocess
import sys

import _dist_problem as prob
import numpy as np
import pytest

import rst_optax

WORKER = pathlib.Path(__file__).with_name('_multiprocess_worker.py')
TIMEOUT_S = 180
RUNS = ('jit', 'shard_map')

pytestmark = pytest.mark.slow  # still run by `make test`


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def processes(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  port = free_port()
  outs = [tmp / f'process{i}.npz' for i in range(2)]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(i), str(port), str(out)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for i, out in enumerate(outs)]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    pytest.fail(f'the two processes did not finish in {TIMEOUT_S} s')
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, log in zip(procs, logs, strict=True):
    assert proc.returncode == 0, log[-4000:]
  results = []
  for out in outs:
    with np.load(out) as result:
      results.append(dict(result))
  return results


def test_each_process_holds_its_own_devices_of_one_mesh(processes):
  assert [int(r['process_index']) for r in processes] == [0, 1]
  devices = [set(r['local_devices'].tolist()) for r in processes]
  assert len(devices[0]) == len(devices[1]) == 2
  assert not devices[0] & devices[1]


@pytest.mark.parametrize('run', RUNS)
def test_processes_make_the_coin_decisions(processes, run):
  want = rst_optax.decisions(prob.SCHEDULE, prob.SEED, 0, prob.STEPS)
  assert 0 < want.sum() < prob.STEPS  # both branches occur
  for result in processes:
    np.testing.assert_array_equal(result[f'{run}/flags'], want)


@pytest.mark.parametrize('run', RUNS)
def test_processes_end_with_identical_parameters(processes, run):
  reference, _ = prob.run_single_device()
  for key in reference:
    first, second = (r[f'{run}/params/{key}'] for r in processes)
    np.testing.assert_array_equal(first, second, err_msg=key)
    # And they are the single-device run, to float32 reduction-order rounding.
    np.testing.assert_allclose(first, reference[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
