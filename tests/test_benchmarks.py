"""The benchmark scripts run end to end on tiny settings: plumbing, not timing.

Nothing here asserts a time or a ratio; the tests check what each script
runs, counts and writes.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rst_optax
from benchmarks import accuracy, scaling, step_cost

# End-to-end script runs: `make test` runs them at the pinned versions;
# the lowest-version and Python 3.13 stages skip them (the library's own
# tests run there), which keeps CI's three suites within its time.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b'\x89PNG\r\n\x1a\n'


def test_step_cost_rows_counts_and_compile_table(tmp_path, capsys):
  # Reuse with cond only, to keep compilation short: the accelerator's
  # --quick run covers host dispatch with reuse.
  report = step_cost.main([
      '--models', 'mlp', '--probs', '0.5', '--reuse-probs', '0.5',
      '--reuse-modes', 'cond', '--rounds', '2', '--steps', '3', '--warmup',
      '1', '--compile-repeats', '1', '--out', str(tmp_path)])

  (result,) = report['results']
  rows = {r['config']: r for r in result['rows']}
  assert list(rows) == ['base', 'sam opaque', 'rst p=0', 'rst p=1',
                        'cond p=0.5', 'host p=0.5', 'cond p=0.5 reuse']
  # The timed windows: steps 1 + 3 (first step, warm-up) to 1 + 3 * 3.
  planned = rst_optax.decisions(0.5, step_cost.SEED, 0, 10)
  assert rows['host p=0.5']['sam_fraction'] == planned[4:].mean()
  assert rows['cond p=0.5']['sam_fraction'] == planned[4:].mean()
  assert rows['rst p=1']['sam_fraction'] == 1 and rows['base']['sam_fraction'] == 0
  reuse = rows['cond p=0.5 reuse']
  assert reuse['sam_fraction'] == planned[4:].mean()
  assert reuse['without_reuse'] == 'cond p=0.5' and reuse['reuse'] == 0.7
  assert rows['cond p=0.5']['without_reuse'] is None
  # Two rounds: the median time is the mean, so all steps together give the
  # ratio of the two medians.
  assert reuse['pooled_ratio_to_without_reuse'] == pytest.approx(
      reuse['ms_per_step'] / reuse['without_reuse_ms_per_step'])
  low, high = reuse['ratio_to_without_reuse_ci95']
  assert low <= reuse['ratio_to_without_reuse'] <= high
  assert rows['host p=0.5']['compilations'] == len(set(planned.tolist())) == 2
  assert all(rows[name]['compilations'] == 1 for name in rows
             if name != 'host p=0.5')
  assert all(r['steps_timed'] == 6 for r in rows.values())

  compiled = {r['config']: r for r in result['compile']}
  assert list(compiled) == ['base', 'sam opaque', 'cond p=0.5', 'host p=0.5',
                            'cond p=0.5 reuse']
  assert [r['executables'] for r in compiled.values()] == [1, 1, 1, 2, 1]
  n_params = result['parameters']
  assert n_params == 40 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
  for r in compiled.values():
    assert r['compile_s'] > 0 and r['trace_s'] > 0
    # Arguments hold the parameters (float32) at least once.
    assert r['memory_bytes']['argument'] >= 4 * n_params
  # Reuse: the arguments hold one float32 parameter-sized buffer more (the
  # state), and so does the state itself.
  extra = compiled['cond p=0.5 reuse']['extra_memory_bytes']
  assert compiled['cond p=0.5 reuse']['without_reuse'] == 'cond p=0.5'
  assert extra['argument'] == 4 * n_params
  assert extra['output'] >= 4 * n_params
  assert compiled['cond p=0.5']['extra_memory_bytes'] is None
  state = result['reuse_state']
  assert state['parameter_bytes'] == state['extra_bytes'] == 4 * n_params
  assert state['extra_over_parameters'] == 1
  assert state['buffer_dtypes'] == ['float32'] and result['reuse_alpha'] == 0.7
  goals = {g['goal']: g for g in report['goals']}
  assert 'cond temp memory <= SAM opaque' in goals
  assert any(g.startswith('host (both executables) compiles') for g in goals)
  assert goals['reuse: the optimizer state holds exactly one parameter-sized '
               'buffer more']['met']
  # The reuse time goal is the CNN's; the MLP's ratio is reported only.
  assert not any('without reuse' in g for g in goals)
  out = capsys.readouterr().out
  assert '| cond p=0.5 reuse | 0.50 |' in out  # the reuse table
  assert f'| optimizer state | RSTState | – | +{4 * n_params:,} (1.00x) |' in out

  saved = json.loads((tmp_path / 'step_cost.json').read_text())
  assert saved['results'][0]['compile'] == result['compile']
  assert len(saved['machine']['load_average_start']) == 3
  assert (tmp_path / 'step_cost.png').read_bytes()[:8] == PNG


class FakeConfig:
  """A configuration whose every window takes ``seconds`` per step."""

  def __init__(self, name, seconds, reference=None):
    self.name, self.seconds, self.reference = name, seconds, reference
    self.mode, self.p = name.split()[0], 0.5
    self.reuse = 0.7 if reference else 0.0
    self.times, self.fractions = [], []
    self.taken, self.count, self.compilations = np.zeros(8, bool), 0, 1

  def run(self, batch, steps):
    del batch
    self.count += steps
    return self.seconds.pop(0), 0.0


def test_reuse_rows_are_timed_against_the_same_schedule_without_reuse():
  # Per round: base 1 ms; host 2 then 4 ms; with reuse 3 then 5 ms.
  configs = [FakeConfig(name, seconds) for name, seconds in (
      ('base', [1, 1]), ('sam opaque', [2, 2]), ('rst p=1', [2, 2]),
      ('host p=0.5', [2, 4]))]
  configs.append(FakeConfig('host p=0.5 reuse', [3, 5], 'host p=0.5'))
  rng = np.random.default_rng(0)
  ratios = step_cost.time_rounds(configs, None, 1, 2, 0, rng)
  rows = {r['config']: r for r in step_cost.summarize(configs, ratios, 1, 2,
                                                      0.0, rng)}

  reuse = rows['host p=0.5 reuse']
  assert reuse['ratio_to_without_reuse'] == pytest.approx((3 / 2 + 5 / 4) / 2)
  assert reuse['pooled_ratio_to_without_reuse'] == pytest.approx(8 / 6)
  assert reuse['without_reuse_ms_per_step'] == 1e3 * 3
  assert reuse['without_reuse'] == 'host p=0.5' and reuse['reuse'] == 0.7
  assert rows['host p=0.5']['ratio_to_without_reuse'] is None


def fake_result(model, ratios, mixture=1.0):
  """A step-cost result with host rows at p = 0.2 and 0.5, reuse at
  ``ratios`` to them, and every reuse row 9x the mixture."""
  rows = []
  for p, ratio in zip((0.2, 0.5), ratios, strict=True):
    rows.append({'config': f'host p={p:g}', 'mode': 'host', 'p': p,
                 'without_reuse': None, 'ratio_to_mixture': mixture,
                 'ratio_ci95': [mixture, mixture],
                 'ratio_to_mixture_amortized': mixture})
    rows.append({'config': f'host p={p:g} reuse', 'mode': 'host', 'p': p,
                 'reuse': 0.7, 'without_reuse': f'host p={p:g}',
                 'ratio_to_mixture': 9.0, 'ratio_ci95': [9.0, 9.0],
                 'ratio_to_mixture_amortized': 9.0,
                 'ratio_to_without_reuse': ratio,
                 'ratio_to_without_reuse_ci95': [ratio, ratio],
                 'pooled_ratio_to_without_reuse': ratio})
  return {'model': model, 'rows': rows, 'reuse_state': {
      'parameter_bytes': 40, 'extra_bytes': 40, 'extra_over_parameters': 1.0,
      'buffer_dtypes': ['float32']}}


def test_reuse_goals_hold_the_cnn_to_three_percent_and_one_buffer():
  met, missed = (step_cost.reuse_goals(fake_result('cnn', ratios), 'host')
                 for ratios in ((1.01, 1.03), (1.02, 1.04)))
  assert [g['met'] for g in met] == [True, True]
  assert [g['met'] for g in missed] == [False, True]
  assert missed[0]['goal'] == ('host reuse=0.7: step time <= 1.03x the same '
                               'schedule without reuse at every p')
  assert missed[0]['measured'].startswith('max 1.040 at p=0.5')
  # The MLP: no time goal; the state's goal on every model.
  (state,) = step_cost.reuse_goals(fake_result('mlp', (2.0, 2.0)), 'host')
  assert state['met'] and 'one parameter-sized buffer' in state['goal']
  result = fake_result('cnn', (1.0, 1.0))
  result['reuse_state']['extra_bytes'] = 80
  assert not step_cost.reuse_goals(result, 'host')[-1]['met']
  # The mixture goal reads the rows without reuse only.
  (mixture, _) = step_cost.mixture_goals(fake_result('cnn', (1.0, 1.0), 1.04),
                                         'host')
  assert mixture['met'] and mixture['measured'].startswith('max 1.040')


def test_each_reuse_row_gets_its_schedule_without_reuse():
  args = step_cost.parse_args(['--probs', '0.5', '--reuse-probs', '0.2',
                               '--reuse-modes', 'host', '--reuse', '0.3'])
  spec = step_cost.MODELS['mlp']._replace(module=step_cost.MLP(width=4))
  configs, _, _ = step_cost.build_configs(spec, args)

  by_name = {c.name: c for c in configs}
  assert list(by_name) == ['base', 'sam opaque', 'rst p=0', 'rst p=1',
                           'cond p=0.5', 'host p=0.2', 'host p=0.5',
                           'host p=0.2 reuse']
  reuse = by_name['host p=0.2 reuse']
  assert reuse.reference == 'host p=0.2' and reuse.reuse == 0.3
  assert reuse.mode == 'host' and reuse.p == 0.2
  np.testing.assert_array_equal(reuse.taken, by_name['host p=0.2'].taken)
  assert isinstance(reuse.state[2], rst_optax.RSTReuseState)
  assert isinstance(by_name['host p=0.2'].state[2], rst_optax.RSTState)
  assert all(c.reference is None for c in configs if c is not reuse)


@pytest.mark.parametrize('window', [None, 3])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_reuse_state_size_is_one_parameter_sized_buffer(dtype, window):
  params = {'w': jnp.zeros((3, 5), dtype), 'b': jnp.zeros(5, dtype)}
  base = optax.sgd(0.1, momentum=0.9)
  states = [optax.chain(optax.identity(), rst_optax.rst(
      base, 0.5, reuse=reuse, reuse_window=window if reuse else None)).init(
          params) for reuse in (0, 0.7)]

  size = step_cost.reuse_state_size(params, *states)
  itemsize = jnp.dtype(dtype).itemsize
  # With a window, the state holds the last SAM step too (one int32).
  last = 0 if window is None else 4
  assert size['parameter_bytes'] == size['extra_bytes'] - last == 20 * itemsize
  assert size['extra_over_parameters'] == 1 + last / (20 * itemsize)
  assert size['buffer_dtypes'] == size['parameter_dtypes'] == [dtype]
  # The state without reuse: count, sam_steps (int32), the key (2 uint32)
  # and SGD's momentum, in the parameters' dtype.
  assert size['state_bytes'] == 4 * 4 + 20 * itemsize
  assert size['reuse_state_bytes'] == size['state_bytes'] + 20 * itemsize + last
  assert step_cost.tree_bytes(jax.eval_shape(lambda: params)) == 20 * itemsize


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
  for folder in (tmp_path, tmp_path / 'again'):
    page = (folder / 'scaling.md').read_text()
    assert '| mlp width 8 | 490 |' in page and '## Goals' in page


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
                         'cond p=0.5', 'host p=0.5', 'host p=0.5 reuse'}
    # One executable per branch taken; a cond step compiles once, whatever
    # the dtype (the state keeps its dtypes from step to step).
    for name in ('host p=0.5', 'host p=0.5 reuse'):
      assert rows[name]['compilations'] == rows[name]['branches_taken']
    assert rows['cond p=0.5']['compilations'] == 1
    assert [r['executables'] for r in result['compile']] == [1, 1, 1, 2, 2]
    assert all(np.isfinite(r['ms_per_step']) for r in rows.values())
    # Reuse: in the recommended mode (host on CPU), against host p=0.5; the
    # state (parameters stay float32 in bfloat16 compute) one buffer larger.
    reuse = rows['host p=0.5 reuse']
    assert reuse['without_reuse'] == 'host p=0.5'
    assert np.isfinite(reuse['ratio_to_without_reuse'])
    state = result['reuse_state']
    assert state['extra_bytes'] == state['parameter_bytes'] == 4 * result[
        'parameters']
    assert result['compile'][-1]['extra_memory_bytes']['argument'] == state[
        'extra_bytes']
  verdict = report['dispatch']
  assert verdict['recommended_dispatch'] == 'host'
  assert sum(verdict['wins'].values()) == 2  # two models x one p
  tables = (out / 'accelerator.md').read_text()
  assert tables.count('| host p=0.5 |') == 4  # step-cost and compile tables
  # The reuse tables: step cost, reuse, compile and extra memory.
  assert tables.count('| host p=0.5 reuse |') == 8
  assert tables.count('| optimizer state | RSTState |') == 2
  goals = [g['goal'] for g in report['goals']]
  assert sum('the same schedule without reuse' in g for g in goals) == 2
  assert sum('one parameter-sized buffer' in g for g in goals) == 2
  assert (out / 'accelerator.png').read_bytes()[:8] == PNG
  assert 'recommended_dispatch() here: host' in done.stdout


@pytest.mark.parametrize('name, main', [('step_cost', step_cost.main),
                                        ('scaling', scaling.main),
                                        ('accuracy', accuracy.main)])
def test_the_results_pages_are_what_the_report_writes_from_the_json(
    name, main, tmp_path):
  """benchmarks/README.md links benchmarks/results/<name>.md for the full
  tables: each is written from the saved JSON by ``--from-json``, and the
  committed page is what that writes today (no hand edits, none stale)."""
  main(['--from-json', os.path.join(ROOT, 'benchmarks', 'results',
                                    f'{name}.json'), '--out', str(tmp_path)])
  written = (tmp_path / f'{name}.md').read_text(encoding='utf-8')
  with open(os.path.join(ROOT, 'benchmarks', 'results', f'{name}.md'),
            encoding='utf-8') as f:
    assert written == f.read()
  with open(os.path.join(ROOT, 'benchmarks', 'results', f'{name}.json')) as f:
    saved = json.load(f)
  if name == 'step_cost':  # every row of every model, with its time
    for result in saved['results']:
      for row in result['rows']:
        assert f"| {row['config']} | {row['ms_per_step']:.3f} |" in written
    assert written.count('| mlp | ') + written.count('| cnn | ') == len(
        saved['goals'])
  elif name == 'scaling':
    for size in saved['sizes']:
      assert f"| {size['model']} | {size['parameters']:,} |" in written
  else:
    for config, row in saved['summary'].items():
      assert (f"| {config} | " in written
              and f"{100 * row['test_acc']['mean']:.2f} ± " in written)
