"""The examples run end to end on tiny data, on CPU."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import rst_optax
from examples import cifar10_resnet, mnist1d_demo, toy_2d
from rst_optax import schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # end to end; `make test` runs it
def test_mnist1d_demo_runs_every_method_and_counts_passes(tmp_path, capsys):
  out = tmp_path / 'out'
  result = mnist1d_demo.main([
      '--seeds', '1', '--epochs', '2', '--num-samples', '500',
      '--val-size', '100', '--batch-size', '50', '--out', str(out),
      '--compile-cache', 'none', '--no-progress'])

  steps = 2 * (300 // 50)  # 400 train samples - 100 validation, 2 epochs
  sam_steps = int(rst_optax.decisions(0.5, 0, 0, steps).sum())
  assert 0 < sam_steps < steps
  runs = {r['method']: r for r in result['runs']}
  assert set(runs) == {'sgd', 'sam', 'rst', 'grst'}
  assert runs['sgd']['passes'] == steps
  assert runs['sam']['passes'] == 2 * steps
  assert runs['rst']['passes'] == runs['grst']['passes'] == steps + sam_steps
  assert runs['rst']['lam'] == 1.0 and runs['grst']['lam'] == pytest.approx(2.0)
  assert runs['rst']['dispatch'] == 'host'  # recommended on CPU
  assert runs['rst']['compilations'] == 2  # one executable per branch
  assert runs['sam']['compilations'] == runs['sgd']['compilations'] == 1
  for run in runs.values():
    assert 0.0 <= run['test_acc'] <= 1.0
    assert math.isfinite(run['last_batch_loss'])
    assert len(run['curve']) == 2 and run['curve'][-1][0] == run['passes']

  saved = json.loads((out / 'results.json').read_text())
  assert set(saved['summary']) == set(runs)
  assert '| G-RST |' in (out / 'results.md').read_text()
  assert (out / 'mnist1d.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert '| G-RST |' in capsys.readouterr().out


@pytest.mark.parametrize('family', schedules.FAMILIES)
def test_mnist1d_demo_schedule_flag_gives_the_family_with_mean_p(family):
  args = mnist1d_demo.parse_args(['--schedule', family, '--p', '0.25'])
  tx, schedule, lam = mnist1d_demo.make_tx('grst', args, 400, seed=0)
  assert schedules.mean_probability(schedule, 400) == pytest.approx(
      0.25, abs=2e-3)
  assert lam == pytest.approx(schedules.matching_lam(schedule, 400))
  want = schedules.family(family, 0.25, 400)
  steps = range(0, 400, 9)
  np.testing.assert_allclose([schedule(t) for t in steps],
                             [want(t) for t in steps])


@pytest.mark.slow  # end to end; `make test` runs it
def test_cifar10_resnet_runs_a_few_steps_on_tiny_data(tmp_path):
  rng = np.random.default_rng(0)
  data = tmp_path / 'tiny.npz'
  np.savez(data, x_train=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
           y_train=rng.integers(0, 10, 40),
           x_test=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8),
           y_test=rng.integers(0, 10, 10))
  steps = 3
  sam_steps = int(rst_optax.decisions(0.5, 0, 0, steps).sum())
  assert sam_steps > 0  # the SAM branch runs
  out = tmp_path / 'out'
  # A subprocess, to lower XLA's optimization level: ResNet-18's train step
  # compiles in seconds instead of tens of seconds on 2 CPU cores.
  env = dict(os.environ, XLA_FLAGS='--xla_backend_optimization_level=0 '
             '--xla_llvm_disable_expensive_passes=true')
  subprocess.run(
      [sys.executable, os.path.join(ROOT, 'examples', 'cifar10_resnet.py'),
       '--data', str(data), '--method', 'grst', '--dispatch', 'cond',
       '--epochs', '1', '--batch-size', '8', '--width', '4',
       '--max-steps', str(steps), '--out', str(out), '--no-progress'],
      env=env, check=True, timeout=300, cwd=ROOT)

  saved = json.loads((out / 'grst_seed0.json').read_text())
  final = saved['final']
  assert final['step'] == steps and saved['settings']['total_steps'] == 5
  assert final['sam_steps'] == sam_steps
  assert final['passes'] == steps + sam_steps
  assert math.isfinite(final['loss']) and 0.0 <= final['test_acc'] <= 1.0


def test_cifar10_resnet_says_how_to_get_missing_data(tmp_path):
  with pytest.raises(SystemExit, match='cifar-10-python.tar.gz'):
    cifar10_resnet.main(['--data', str(tmp_path / 'missing')])


def test_the_periodic_schedule_flag_needs_p_of_one_over_k():
  with pytest.raises(SystemExit):
    mnist1d_demo.parse_args(['--schedule', 'periodic', '--p', '0.3'])
  args = mnist1d_demo.parse_args(['--schedule', 'periodic', '--p', '0.2'])
  _, schedule, lam = mnist1d_demo.make_tx('grst', args, 100, seed=0)
  assert lam == pytest.approx(5.0)
  assert [float(schedule(t)) for t in range(5)] == [0, 0, 0, 0, 1]


def test_toy_2d_without_matplotlib_names_the_extra_and_exits(
    monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import raises
  with pytest.raises(SystemExit) as exit_info:
    toy_2d.main(['--steps', '1'])
  assert 'pip install ".[examples]"' in str(exit_info.value.code)
  assert capsys.readouterr().out == ''  # it stops before any work


@pytest.mark.slow  # end to end; `make test` runs it
def test_toy_2d_sgd_stays_sharp_while_sam_and_rst_reach_the_flat_minimum(
    tmp_path, capsys):
  out = tmp_path / 'toy_2d.png'
  results = toy_2d.main(['--out', str(out)])
  sgd, sam, rst = (results[name] for name in toy_2d.optimizers(0.1, 0.1, 0))
  np.testing.assert_allclose(sgd['end'], toy_2d.SHARP, atol=0.05)
  np.testing.assert_allclose(sam['end'], toy_2d.FLAT, atol=0.05)
  np.testing.assert_allclose(rst['end'], toy_2d.FLAT, atol=0.05)
  # The pit's curvature is 50, the basin's largest 1.5.
  assert sgd['top_hessian_eigenvalue'] > 40
  assert sam['top_hessian_eigenvalue'] < 2 and rst['top_hessian_eigenvalue'] < 2
  steps = 1500
  assert sgd['gradient_evaluations'] == steps
  assert sam['gradient_evaluations'] == 2 * steps
  sam_steps = int(rst_optax.decisions(0.5, 0, 0, steps).sum())
  assert rst['gradient_evaluations'] == steps + sam_steps
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'ends at' in capsys.readouterr().out
