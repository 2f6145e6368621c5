"""The benchmark scripts run end to end on tiny settings: plumbing, not timing.

Nothing here asserts a time or a ratio; the tests check what each script
runs, counts and writes.
"""

import json
import os
import subprocess
import sys

import numpy as np

import rst_optax
from benchmarks import scaling, step_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b'\x89PNG\r\n\x1a\n'


def test_step_cost_rows_counts_and_compile_table(tmp_path):
  report = step_cost.main([
      '--models', 'mlp', '--probs', '0.5', '--rounds', '2', '--steps', '3',
      '--warmup', '1', '--compile-repeats', '1', '--out', str(tmp_path)])

  (result,) = report['results']
  rows = {r['config']: r for r in result['rows']}
  assert list(rows) == ['base', 'sam opaque', 'rst p=0', 'rst p=1',
                        'cond p=0.5', 'host p=0.5']
  # The timed windows: steps 1 + 3 (first step, warm-up) to 1 + 3 * 3.
  planned = rst_optax.decisions(0.5, step_cost.SEED, 0, 10)
  assert rows['host p=0.5']['sam_fraction'] == planned[4:].mean()
  assert rows['cond p=0.5']['sam_fraction'] == planned[4:].mean()
  assert rows['rst p=1']['sam_fraction'] == 1 and rows['base']['sam_fraction'] == 0
  assert rows['host p=0.5']['compilations'] == len(set(planned.tolist())) == 2
  assert all(rows[name]['compilations'] == 1 for name in rows
             if name != 'host p=0.5')
  assert all(r['steps_timed'] == 6 for r in rows.values())

  compiled = {r['config']: r for r in result['compile']}
  assert list(compiled) == ['base', 'sam opaque', 'cond p=0.5', 'host p=0.5']
  assert [r['executables'] for r in compiled.values()] == [1, 1, 1, 2]
  n_params = result['parameters']
  assert n_params == 40 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
  for r in compiled.values():
    assert r['compile_s'] > 0 and r['trace_s'] > 0
    # Arguments hold the parameters (float32) at least once.
    assert r['memory_bytes']['argument'] >= 4 * n_params
  goals = {g['goal'] for g in report['goals']}
  assert 'cond temp memory <= SAM opaque' in goals
  assert any(g.startswith('host (both executables) compiles') for g in goals)

  saved = json.loads((tmp_path / 'step_cost.json').read_text())
  assert saved['results'][0]['compile'] == result['compile']
  assert len(saved['machine']['load_average_start']) == 3
  assert (tmp_path / 'step_cost.png').read_bytes()[:8] == PNG


def test_scaling_sweeps_the_sizes_and_writes_json_and_plot(tmp_path, capsys):
  report = scaling.main([
      '--mlp-widths', '8', '--cnn-widths', '4', '--seconds', '0',
      '--min-rounds', '2', '--max-rounds', '2', '--max-steps', '2',
      '--warmup', '0', '--out', str(tmp_path)])

  sizes = report['sizes']
  assert [s['model'] for s in sizes] == ['mlp width 8', 'cnn width 4']
  # Two hidden layers of 8 on 40 inputs, 10 outputs; 3 convolutions of 4.
  assert [s['parameters'] for s in sizes] == [
      40 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10,
      5 * 4 + 4 + 2 * (5 * 4 * 4 + 4) + 10 * 4 * 10 + 10]
  for s in sizes:
    assert s['rounds'] == 2 and 1 <= s['steps_per_round'] <= 2
    # Every timed window has its decisions planned (no empty window).
    assert all(np.isfinite(r['sam_fraction']) for r in s['rows'])
    rows = {r['config']: r for r in s['rows']}
    assert set(rows) == {'base', 'sam opaque', 'rst p=0', 'rst p=1',
                         'cond p=0.5', 'host p=0.5'}
    assert s['host_to_mixture'] == rows['host p=0.5']['ratio_to_mixture']
    assert s['p0_overhead'] == rows['rst p=0']['ratio_to_base']
    assert s['sam_over_base'] == rows['rst p=1']['ratio_to_base']
  assert [g['goal'].split(':')[0] for g in report['goals']] == ['mlp', 'cnn']

  saved = json.loads((tmp_path / 'scaling.json').read_text())
  assert saved['sizes'] == json.loads(json.dumps(sizes))
  assert len(saved['machine']['load_average_end']) == 3
  assert (tmp_path / 'scaling.png').read_bytes()[:8] == PNG
  assert '| mlp width 8 | 490 |' in capsys.readouterr().out

  # The plot and table again from the saved report, without timing anything.
  again = scaling.main(['--from-json', str(tmp_path / 'scaling.json'),
                        '--out', str(tmp_path / 'again')])
  assert again['sizes'] == saved['sizes']
  assert (tmp_path / 'again' / 'scaling.png').read_bytes()[:8] == PNG
  assert not (tmp_path / 'again' / 'scaling.json').exists()
  assert '| mlp width 8 | 490 |' in capsys.readouterr().out


def test_accelerator_quick_runs_the_plumbing_on_cpu(tmp_path):
  done = subprocess.run(
      [sys.executable, '-m', 'benchmarks.accelerator', '--quick', '--out',
       str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
      check=True)

  out = tmp_path / 'cpu-quick'
  report = json.loads((out / 'accelerator.json').read_text())
  assert report['quick'] and report['skipped'] == []
  assert [(r['model'], r['dtype']) for r in report['results']] == [
      ('resnet18', 'float32'), ('cnn2d', 'bfloat16')]
  for result in report['results']:
    rows = {r['config']: r for r in result['rows']}
    assert set(rows) == {'base', 'sam opaque', 'rst p=0', 'rst p=1',
                         'cond p=0.5', 'host p=0.5'}
    # One executable per branch taken; a cond step compiles once, whatever
    # the dtype (the state keeps its dtypes from step to step).
    assert rows['host p=0.5']['compilations'] == rows['host p=0.5'][
        'branches_taken']
    assert rows['cond p=0.5']['compilations'] == 1
    assert [r['executables'] for r in result['compile']] == [1, 1, 1, 2]
    assert all(np.isfinite(r['ms_per_step']) for r in rows.values())
  verdict = report['dispatch']
  assert verdict['recommended_dispatch'] == 'host'
  assert sum(verdict['wins'].values()) == 2  # two models x one p
  tables = (out / 'accelerator.md').read_text()
  assert tables.count('| host p=0.5 |') == 4  # step-cost and compile tables
  assert (out / 'accelerator.png').read_bytes()[:8] == PNG
  assert 'recommended_dispatch() here: host' in done.stdout
