"""The label-noise benchmark: noise, kinds, selection, report, plumbing."""

import json
import math

import numpy as np
import pytest

import rst_optax
from benchmarks.label_noise import cli, kinds, report, stats, train


def test_corrupt_labels_replaces_the_fraction_asked_and_only_it():
  y = np.arange(1000, dtype=np.int32) % 10
  noisy, replaced = train.corrupt_labels(y, 0.4, seed=3)
  assert replaced.sum() == 400
  np.testing.assert_array_equal(noisy[~replaced], y[~replaced])
  changed = (noisy != y).mean()
  assert 0.3 < changed <= 0.4  # a uniform draw hits the true class 1 in 10
  assert noisy.min() >= 0 and noisy.max() <= 9 and noisy.dtype == y.dtype
  again, _ = train.corrupt_labels(y, 0.4, seed=3)
  other, _ = train.corrupt_labels(y, 0.4, seed=4)
  np.testing.assert_array_equal(again, noisy)
  assert (other != noisy).any()
  clean, none = train.corrupt_labels(y, 0.0, seed=3)
  assert not none.any()
  np.testing.assert_array_equal(clean, y)


def configs(**overrides):
  args = cli.parse_args(['--p', '0.5,0.25'])
  for k, v in overrides.items():
    setattr(args, k, v)
  return {c.name: c for c in kinds.make_configs(args)}


def test_configurations_scale_rho_and_lam_as_named():
  total = 400
  by = configs()
  # the default kinds: all but the three with reuse, at each of the two p
  assert set(kinds.KINDS) - set(kinds.DEFAULT_KINDS) == {
      'reuse', 'reuse_fresh', 'looksam', 'looksam_warm1', 'looksam_warm5',
      'looksam_delay5', 'looksam_warm5_rho'}
  assert len(by) == 2 + 2 * len(kinds.DEFAULT_KINDS)
  for p, k in ((0.5, 2), (0.25, 4)):
    get = lambda kind, p=p: next(c for c in by.values()
                                 if c.kind == kind and c.p == p)
    assert get('rst_rho').rho_scale == pytest.approx(1 / p)
    assert get('every_k_rho').rho_scale == k
    assert get('rst').rho_scale == get('grst').rho_scale == 1.0
    for kind in ('rst', 'grst', 'linear', 'trigonometric', 'late', 'early',
                 'every_k_lam', 'every_k_rho'):
      schedule, _ = kinds.schedule_of(get(kind), total)
      assert rst_optax.schedules.mean_probability(schedule, total) == (
          pytest.approx(p, abs=2e-3)), kind
    grst = get('grst')
    assert kinds.lam_of(grst, kinds.schedule_of(grst, total)[0], total) == (
        pytest.approx(1 / p))
    every = get('every_k_lam')
    assert kinds.lam_of(every, kinds.schedule_of(every, total)[0], total) == k
    assert kinds.lam_of(get('rst'), 0.5, total) == 1.0


def test_every_k_takes_a_sam_step_exactly_every_k_steps():
  by = configs()
  every = next(c for c in by.values() if c.kind == 'every_k_rho' and c.p == 0.25)
  schedule, _ = kinds.schedule_of(every, 400)
  plan = rst_optax.decisions(schedule, seed=7, start=0, stop=12)
  assert plan.tolist() == [False, False, False, True] * 3


def test_early_and_late_phases_put_sam_at_either_end():
  by = configs()
  early = next(c for c in by.values() if c.kind == 'early' and c.p == 0.25)
  late = next(c for c in by.values() if c.kind == 'late' and c.p == 0.25)
  plan_e = rst_optax.decisions(kinds.schedule_of(early, 100)[0], 0, 0, 100)
  plan_l = rst_optax.decisions(kinds.schedule_of(late, 100)[0], 0, 0, 100)
  assert plan_e[:25].all() and not plan_e[25:].any()
  assert plan_l[75:].all() and not plan_l[:75].any()


def test_a_kind_is_one_entry_of_the_table(monkeypatch):
  # A periodic kind with reuse, as LookSAM will be: one entry, and the flags,
  # the configurations, the schedule and the grid follow from it.
  monkeypatch.setitem(kinds.KINDS, 'reuse_periodic', kinds.Kind(
      'every k, reuse', 'periodic', reuse=True))
  args = cli.parse_args(['--kinds', 'rst,reuse_periodic', '--p', '0.25'])
  by = {c.name: c for c in kinds.make_configs(args)}
  assert list(by) == ['SGD', 'SAM', 'RST p=0.25', 'every k, reuse p=0.25']
  new = by['every k, reuse p=0.25']
  assert new.k == 4 and new.rho_scale == 1.0
  assert kinds.lam_of(new, 0.25, 400) == 1.0
  plan = rst_optax.decisions(kinds.schedule_of(new, 400)[0], 0, 0, 8)
  assert plan.tolist() == [False, False, False, True] * 2
  # alpha: every pair for a kind with reuse, 0 alone for the others
  assert kinds.grid_of(new, (0.1, 0.2), alphas=(0.5, 1.0)) == [
      (0.1, 0.5), (0.2, 0.5), (0.1, 1.0), (0.2, 1.0)]
  assert kinds.grid_of(by['RST p=0.25'], (0.1, 0.2), alphas=(0.5,)) == [
      (0.1, 0.0), (0.2, 0.0)]
  assert kinds.grid_of(by['SGD'], (0.1, 0.2), alphas=(0.5,)) == [(0.0, 0.0)]
  with pytest.raises(SystemExit):  # a periodic kind needs p = 1/k
    cli.parse_args(['--kinds', 'reuse_periodic', '--p', '0.3'])


def test_the_reuse_kinds_are_named_and_scheduled():
  args = cli.parse_args(['--kinds', 'reuse,reuse_fresh,looksam', '--p', '0.2',
                         '--no-baselines'])
  by = {c.name: c for c in kinds.make_configs(args)}
  assert list(by) == ['RST + reuse p=0.2', 'RST + reuse <= k steps p=0.2',
                      'LookSAM (every k + reuse) p=0.2']
  looksam = by['LookSAM (every k + reuse) p=0.2']
  plan = rst_optax.decisions(kinds.schedule_of(looksam, 400)[0], 0, 0, 10)
  assert plan.tolist() == [False, False, False, False, True] * 2
  for config in by.values():
    assert kinds.spec(config.kind).reuse
    assert config.rho_scale == 1.0 and kinds.lam_of(config, 0.2, 400) == 1.0
    assert kinds.grid_of(config, (0.3,), alphas=(0.5,)) == [(0.3, 0.5)]


def test_reuse_schedules_of_the_warm_up_and_delay_kinds():
  import jax
  import jax.numpy as jnp
  import optax
  reuse, steps = kinds.reuse_schedule('looksam_warm5', 0.5, 35)
  assert steps == 175
  alphas = kinds.alpha_steps(reuse, 400)
  want = optax.linear_schedule(0.0, 0.5, 175)
  assert alphas.dtype == np.float32 and alphas[0] == 0.0
  at = jax.jit(want)
  np.testing.assert_array_equal(alphas, np.float32(
      [at(jnp.int32(t)) for t in range(400)]))
  np.testing.assert_allclose(alphas, [want(t) for t in range(400)],
                             rtol=1e-6)
  assert alphas[175:].tolist() == [0.5] * 225 and (np.diff(alphas) >= 0).all()
  reuse, steps = kinds.reuse_schedule('looksam_delay5', 0.5, 35)
  alphas = kinds.alpha_steps(reuse, 400)
  assert steps == 175 and alphas.tolist() == [0.0] * 175 + [0.5] * 225
  assert kinds.reuse_schedule('looksam', 0.5, 35) == (0.5, 0)
  assert kinds.rho_schedule('looksam_warm5', 0.3, 35) == (0.3, 0)
  rho, steps = kinds.rho_schedule('looksam_warm5_rho', 0.3, 35)
  alpha, _ = kinds.reuse_schedule('looksam_warm5_rho', 0.5, 35)
  assert steps == 175
  np.testing.assert_array_equal(
      kinds.alpha_steps(rho, 400),
      np.float32([jax.jit(optax.linear_schedule(0.0, 0.3, 175))(
          jnp.int32(t)) for t in range(400)]))
  assert kinds.alpha_steps(rho, 400)[175:].tolist() == [np.float32(0.3)] * 225
  assert kinds.alpha_steps(alpha, 400).tolist() == kinds.alpha_steps(
      kinds.reuse_schedule('looksam_warm5', 0.5, 35)[0], 400).tolist()
  assert kinds.alpha_steps(0.5, 3).tolist() == [0.5] * 3


def test_host_alphas_give_the_updates_of_rst_with_the_reuse_schedule():
  """``alpha_steps`` holds the very values ``rst(..., reuse=schedule)`` uses:
  ``rst`` reading them from a table updates bit for bit as with the schedule;
  the benchmark's train step, fed them per step from the host, updates as
  ``rst`` with the schedule up to rounding (a traced alpha against one folded
  into the program: a constant alpha differs as much)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from examples import mnist1d_demo as demo
  total, batch, lr = 30, 8, 0.1
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 40)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, 32).astype(np.int32))
  graphdef, params0 = nnx.split(demo.CNN(3, 40, nnx.Rngs(0)), nnx.Param)
  make_tx, train_step, _, loss_fn = train.build_trainer(graphdef, total, lr)
  reuse, _ = kinds.reuse_schedule('looksam_warm1', 0.5, 12)
  alphas = kinds.alpha_steps(reuse, total)
  assert 0 < alphas[5] < 0.5  # the warm-up is under way at the first reuse
  schedule = rst_optax.schedules.periodic(5)
  plan = rst_optax.decisions(schedule, 0, 0, total)
  base = optax.sgd(optax.cosine_decay_schedule(lr, total), momentum=0.9)

  def run_library(reuse):
    tx = rst_optax.rst(base, schedule, rho=0.3, reuse=reuse)

    @jax.jit
    def step(params, state, idx):
      xb, yb = x[idx], y[idx]
      grads = jax.grad(loss_fn)(params, xb, yb)
      updates, state = tx.update(
          grads, state, params, grad_fn=lambda w: jax.grad(loss_fn)(w, xb, yb))
      return optax.apply_updates(params, updates), state

    params, state = params0, tx.init(params0)
    for t in range(total):
      params, state = step(params, state, np.arange(t, t + batch) % 32)
    assert int(state.sam_steps) == int(plan.sum()) == 6
    return jax.tree.leaves(params)

  lib = run_library(reuse)
  table = jnp.asarray(alphas)
  for a, b in zip(lib, run_library(lambda count: table[count]), strict=True):
    np.testing.assert_array_equal(a, b)
  plain = run_library(0.0)
  host, state = params0, make_tx(schedule, 0.3, 1.0, 0, 0.5).init(params0)
  for t in range(total):
    host, state, _ = train_step(
        host, state, np.float32(0.3), np.float32(1.0), alphas[t], x, y,
        np.arange(t, t + batch) % 32, take_sam=bool(plan[t]), reusing=True)
  for a, b, c in zip(jax.tree.leaves(host), lib, plain, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(b - c).max() > 1e3 * np.abs(a - b).max()  # reuse shows


def test_every_k_needs_p_of_one_over_k():
  with pytest.raises(SystemExit):
    cli.parse_args(['--p', '0.3'])
  args = cli.parse_args(['--p', '0.3', '--kinds', 'rst,grst'])
  assert args.p == (0.3,)


def record(config, rho, seed, val, test, status='ok', kind='rst', passes=10,
           noise=0.2, alpha=None):
  """A run record; without ``alpha``, as the files written before it."""
  out = {'config': config, 'kind': kind, 'p': 0.5, 'rho_grid': rho,
         'rho': rho, 'lam': 1.0, 'seed': seed, 'noise': noise,
         'val_acc': val, 'test_acc': test, 'status': status,
         'passes': passes, 'wall_s': 1.0}
  return out if alpha is None else out | {'alpha': alpha}


def test_rho_is_chosen_on_validation_never_on_test():
  recs = []
  for seed in range(3):
    recs.append(record('RST', 0.1, seed, val=0.80, test=0.70))
    recs.append(record('RST', 0.4, seed, val=0.70, test=0.90))
  assert stats.choose(recs) == {(0.2, 'RST'): (0.1, 0.0)}


def test_alpha_is_chosen_with_rho_on_validation_and_shown():
  recs = []
  for seed in range(2):
    for rho, alpha, val in ((0.1, 0.0, 0.70), (0.1, 0.5, 0.80),
                            (0.2, 0.5, 0.75), (0.2, 1.0, 0.80)):
      recs.append(record('reuse', rho, seed, val, val - 0.1 * rho,
                         alpha=alpha))
  # (0.1, 0.5) and (0.2, 1.0) tie on validation: the smaller alpha wins.
  assert stats.choose(recs) == {(0.2, 'reuse'): (0.1, 0.5)}
  summary = stats.summarize(recs)
  row = summary['0.2']['rows']['reuse']
  assert (row['rho_grid'], row['alpha']) == (0.1, 0.5)
  assert row['test_acc']['mean'] == pytest.approx(0.79)
  tables = report.format_tables(summary)
  assert 'rho and α chosen on validation' in tables
  assert '| reuse | 0.1, α 0.5 | 79.00 ± 0.00 |' in tables
  sweep = report.format_sweep(summary)  # one line per alpha; 0: the name
  assert '| reuse | 69.0 (70.0) |  |' in sweep
  assert '| reuse α=0.5 | 79.0 (80.0) | 73.0 (75.0) |' in sweep
  assert '| reuse α=1 |  | 78.0 (80.0) |' in sweep
  assert set(stats.stability(summary)) == {'reuse', 'reuse α=0.5',
                                           'reuse α=1'}
  assert '| reuse α=1 | 1 | stable to 0.2; none diverged |' in (
      report.format_stability(summary))


def test_a_diverged_seed_counts_at_chance_in_the_choice():
  recs = [record('RST', 0.1, s, val=0.75, test=0.7) for s in range(2)]
  recs += [record('RST', 0.4, 0, val=0.95, test=0.9),
           record('RST', 0.4, 1, val=math.nan, test=math.nan, status='nan')]
  # 0.4: (0.95 + chance) / 2 = 0.525 < 0.75.
  assert stats.choose(recs) == {(0.2, 'RST'): (0.1, 0.0)}


def test_diverged_runs_are_counted_and_not_averaged_in():
  recs = []
  for seed in range(4):
    recs.append(record('SGD', 0.0, seed, 0.6, 0.60, kind='sgd', passes=10))
    recs.append(record('SAM', 0.2, seed, 0.8, 0.80, kind='sam', passes=20))
    bad = seed == 3
    recs.append(record('RST', 0.2, seed, math.nan if bad else 0.7,
                       math.nan if bad else 0.70,
                       status='nan' if bad else 'ok', passes=15))
  recs.append(record('RST', 0.1, 0, 0.1, 0.1, status='chance', passes=15))
  rows = stats.summarize(recs)['0.2']['rows']
  rst = rows['RST']
  assert rst['rho_grid'] == 0.2
  assert rst['diverged'] == 1 and rst['diverged_in_sweep'] == 2
  assert rst['test_acc']['n'] == 3
  assert rst['test_acc']['mean'] == pytest.approx(0.70)
  assert rst['gain_kept']['mean'] == pytest.approx(0.5)
  assert rst['gain_kept']['n'] == 3
  assert rst['passes_vs_SAM'] == pytest.approx(0.75)
  assert rows['SAM']['gain_kept']['mean'] == pytest.approx(1.0)
  assert rows['SGD']['gain_kept']['mean'] == pytest.approx(0.0)
  assert '| RST | 0.2 | 70.00 ± 0.00 |' in report.format_tables(
      stats.summarize(recs))


def test_a_run_at_chance_level_counts_as_diverged():
  assert stats.run_status(0.3, 0.9) == 'ok'
  assert stats.run_status(2.3, 0.11) == 'chance'
  assert stats.run_status(2.3, math.nan) == 'chance'
  assert stats.run_status(math.nan, 0.9) == 'nan'
  assert stats.run_status(math.inf, 0.9) == 'nan'


def test_gain_kept_is_paired_per_seed():
  sgd = [0.60, 0.70]
  sam = [0.80, 0.80]
  acc = [0.70, 0.75]  # keeps 0.5 of the gain on both seeds
  kept = stats.gain_kept(acc, sgd, sam)
  assert kept['mean'] == pytest.approx(0.15 / 0.3)
  assert kept['n'] == 2


def test_a_diverging_run_is_detected_and_stops(tmp_path):
  import jax
  from flax import nnx

  from examples import mnist1d_demo as demo
  rng = np.random.default_rng(0)
  data = {'x': rng.normal(size=(64, 40)).astype(np.float32),
          'y': rng.integers(0, 10, 64).astype(np.int32)}
  for split in ('val', 'test'):
    data[f'x_{split}'], data[f'y_{split}'] = data['x'][:16], data['y'][:16]
  graphdef, params = nnx.split(demo.CNN(4, 40, nnx.Rngs(0)), nnx.Param)
  params = jax.tree.map(jax.numpy.asarray, params)
  orders = [np.arange(64, dtype=np.int32).reshape(4, 16)] * 3
  trainer = train.build_trainer(graphdef, 12, lr=1e6)
  rec, final = train.train_one(trainer, params, data, data['y'], 1.0, 0.1, 1.0,
                            0, orders, 12)
  assert rec['status'] == 'nan' and final is None
  assert math.isnan(rec['test_acc']) and rec['steps'] == 4  # one epoch
  assert rec['passes'] == 24  # as planned: SAM, 12 steps
  trainer = train.build_trainer(graphdef, 12, lr=0.01)
  rec, final = train.train_one(trainer, params, data, data['y'], 0.5, 0.1, 2.0,
                            0, orders, 12)
  assert rec['status'] in ('ok', 'chance') and rec['steps'] == 12
  assert rec['sam_steps'] == int(rst_optax.decisions(0.5, 0, 0, 12).sum())
  assert len(final) == len(jax.tree.leaves(params))


def test_quick_run_end_to_end(tmp_path):
  out = tmp_path / 'out'
  result = cli.main(['--quick', '--kinds', 'grst,every_k_lam', '--out',
                    str(out), '--cache', str(tmp_path / 'cache')])
  steps = result['settings']['total_steps']
  assert steps == 4 * (300 // 50)
  by = {}
  for r in result['runs']:
    by.setdefault(r['config'], []).append(r)
  assert set(by) == {'SGD', 'SAM', 'G-RST p=0.5', 'every k, lam x k p=0.5'}
  assert len(by['SGD']) == 2 and len(by['SAM']) == 2 * 2  # seeds x radii
  assert {r['passes'] for r in by['SGD']} == {steps}
  assert {r['passes'] for r in by['SAM']} == {2 * steps}
  assert {r['passes'] for r in by['every k, lam x k p=0.5']} == {
      steps + steps // 2}
  for r in by['G-RST p=0.5']:
    planned = rst_optax.decisions(
        rst_optax.schedules.family('constant', 0.5, steps), r['seed'], 0,
        steps).sum()
    assert r['passes'] == steps + planned and r['lam'] == pytest.approx(2.0)
  assert all(0.19 < r['noise_replaced'] < 0.21 for r in result['runs'])
  saved = json.loads((out / 'label_noise_quick.json').read_text())
  assert set(saved['summary']['0.2']['rows']) == set(by)
  flat = saved['flatness']['0.2']['configs']
  assert {'SGD', 'SAM'} <= set(flat)
  for row in flat.values():
    assert row['lambda_max']['n'] >= 1 and row['eps_sharpness']['mean'] >= 0
  for png in ('label_noise_quick.png', 'label_noise_quick_flatness.png'):
    assert (out / png).read_bytes()[:4] == b'\x89PNG'
  assert not (out / 'label_noise_quick.partial.json').exists()


def test_a_job_runs_sam_at_its_own_radii_and_the_warm_up_apart(tmp_path):
  args = cli.parse_args([
      '--quick', '--kinds',
      'looksam,looksam_warm1,looksam_warm5,looksam_warm5_rho', '--alphas',
      '0.5', '--sam-rhos', '0.3', '--seed-list', '5,7', '--cache',
      str(tmp_path)])
  assert args.seed_list == (5, 7) and args.sam_rhos == (0.3,)
  no_sam = cli.parse_args(['--kinds', 'looksam', '--p', '0.2', '--no-sam'])
  assert [c.kind for c in kinds.make_configs(no_sam)] == ['sgd', 'looksam']
  records, finals, _ = train.run_job(args, 0.2, 5)
  sam = [r for r in records if r['config'] == 'SAM']
  assert [r['rho'] for r in sam] == [0.3]  # not the --rhos 0.05, 0.2
  assert {r['rho'] for r in records if r['kind'] == 'looksam'} == {0.05, 0.2}
  plain = finals[('LookSAM (every k + reuse) p=0.5', 0.2, 0.5)]
  warm = finals[('LookSAM, alpha warm-up 1 epoch p=0.5', 0.2, 0.5)]
  assert any(not np.array_equal(a, b) for a, b in zip(plain, warm,
                                                       strict=True))
  # the quick run is shorter than 5 epochs: both warm up all along, and
  # differ by the radius alone
  alpha_only = finals[('LookSAM, alpha warm-up 5 epochs p=0.5', 0.2, 0.5)]
  both = finals[('LookSAM, alpha and rho warm-up 5 epochs p=0.5', 0.2, 0.5)]
  assert any(not np.array_equal(a, b) for a, b in zip(alpha_only, both,
                                                       strict=True))


def test_saved_results_with_other_radii_are_pooled_and_chosen_again(tmp_path):
  def result(rhos, vals, command, seeds=(0, 1)):
    runs = [record('SGD', 0.0, s, 0.6, 0.6, kind='sgd') for s in seeds]
    for rho, val in zip(rhos, vals, strict=True):
      runs += [record('SAM', rho, s, val, val, kind='sam', passes=20)
               for s in seeds]
    return {'settings': {'noise': [0.2], 'seeds': len(seeds),
                         'command': command},
            'elapsed_s': 1.0, 'load_average': {'start': [1], 'end': [2]},
            'runs': runs, 'summary': stats.summarize(runs)}

  paths = []
  for i, (rhos, vals) in enumerate((((0.1, 0.4), (0.7, 0.75)),
                                    ((0.3, 0.1), (0.8, 0.0)))):
    paths.append(tmp_path / f'{i}.json')
    paths[-1].write_text(json.dumps(result(rhos, vals, f'run {i}')))
  merged = report.merge_results([str(p) for p in paths])
  assert merged['settings']['rhos'] == [0.1, 0.3, 0.4]
  assert len(merged['runs']) == 2 + 3 * 2  # SGD and SAM at 0.1 not repeated
  rows = merged['summary']['0.2']['rows']
  assert rows['SAM']['rho_grid'] == 0.3 and rows['SAM']['test_acc']['mean'] == (
      pytest.approx(0.8))
  # A part with other seeds extends the pool when it runs every radius...
  more = tmp_path / 'more.json'
  more.write_text(json.dumps(result((0.1, 0.3, 0.4), (0.7, 0.8, 0.75),
                                    'seeds 2, 3', seeds=(2, 3))))
  merged = report.merge_results([str(p) for p in paths] + [str(more)])
  assert merged['settings']['seed_list'] == [0, 1, 2, 3]
  assert merged['summary']['0.2']['rows']['SAM']['test_acc']['n'] == 4
  # ... and is refused, naming what is missing, when the pairing would break.
  more.write_text(json.dumps(result((0.3,), (0.8,), 'other', seeds=(2, 3))))
  with pytest.raises(ValueError, match=r'SAM .*radius 0.1.* seeds \[2, 3\]'):
    report.merge_results([str(p) for p in paths] + [str(more)])


def test_pooling_refuses_parts_of_another_model_and_names_each_recipe(
    tmp_path):
  runs = [record('SGD', 0.0, s, 0.6, 0.6, kind='sgd') for s in range(2)]
  common = {'noise': [0.2], 'seeds': 2, 'lr': 4e-3, 'n_train': 10,
            'n_val': 5, 'n_test': 5, 'width': 25, 'batch_size': 2,
            'epochs': 1, 'total_steps': 5, 'rhos': [], 'p': [0.2]}
  cnn = common | {'command': 'cnn'}  # older files have no --model: the CNN
  transformer = common | {'command': 'tf', 'model': 'transformer',
                          'weight_decay': 0.05, 'warmup_epochs': 2.0}
  paths = [tmp_path / 'cnn.json', tmp_path / 'tf.json']
  for path, settings in zip(paths, (cnn, transformer), strict=True):
    path.write_text(json.dumps({'settings': settings, 'elapsed_s': 1.0,
                                'load_average': {'start': [1], 'end': [2]},
                                'runs': runs}))
  with pytest.raises(ValueError, match='model differs.*cnn and transformer'):
    report.merge_results([str(p) for p in paths])
  assert 'SGD momentum 0.9' in report.title_of(cnn)
  title = report.title_of(transformer)
  assert 'AdamW (weight decay 0.05)' in title and 'SGD' not in title
  assert 'CNN' not in title


def test_the_report_writes_every_table_as_one_markdown_page(tmp_path):
  runs = [record('SGD', 0.0, s, 0.6, 0.6, kind='sgd') for s in range(2)]
  runs += [record('SAM', rho, s, 0.7 + rho, 0.71 + rho, kind='sam',
                  passes=20) for rho in (0.1, 0.2) for s in range(2)]
  runs += [record('RST p=0.5', 0.2, s, 0.65, 0.66 + s / 100, passes=15)
           for s in range(2)]
  parts = [{'file': 'a.json', 'command': 'part a', 'elapsed_s': 60.0,
            'load_average': {'start': [1.0], 'end': [2.0]}}]
  result = {'settings': {'noise': [0.2], 'seeds': 2, 'command': 'a',
                         'workers': 2, 'n_train': 10, 'n_val': 5,
                         'n_test': 5, 'width': 4, 'lr': 0.1,
                         'batch_size': 2, 'epochs': 1, 'total_steps': 5,
                         'rhos': [0.1, 0.2], 'p': [0.5]},
            'machine': {'cpu': 'test cpu', 'cores': 2, 'jax': 'x'},
            'elapsed_s': 60.0, 'parts': parts,
            'load_average': {'start': [1.0], 'end': [2.0]},
            'runs': runs, 'summary': stats.summarize(runs), 'flatness': {}}
  report.report(result, str(tmp_path), 'ln')
  page = (tmp_path / 'ln.md').read_text(encoding='utf-8')
  # The headline table, the sweep (every radius), stability and the run.
  assert report.format_tables(result['summary']) in page
  assert report.format_sweep(result['summary']) in page
  assert report.format_stability(result['summary']) in page
  assert '| RST p=0.5 | 0.2 | 66.50 ± 0.50 |' in page
  assert '| `a.json` | 1.0 | – | – | 1.00 → 2.00 |' in page
  assert '```sh\npart a\n```' in page
  assert 'test cpu, 2 cores' in page


def test_files_without_alpha_still_load_and_pool_with_new_ones(tmp_path):
  def part(runs, command):
    return {'settings': {'noise': [0.2], 'seeds': 2, 'command': command},
            'elapsed_s': 1.0, 'load_average': {'start': [1], 'end': [2]},
            'runs': runs}

  old = [record('SGD', 0.0, s, 0.6, 0.6, kind='sgd') for s in range(2)]
  old += [record('SAM', 0.2, s, 0.8, 0.8, kind='sam', passes=20)
          for s in range(2)]
  new = [r | {'alpha': 0.0} for r in old]  # the same runs, written anew
  new += [record('SAM', 0.4, s, 0.9, 0.9, kind='sam', passes=20, alpha=0.0)
          for s in range(2)]
  paths = [tmp_path / 'old.json', tmp_path / 'new.json']
  paths[0].write_text(json.dumps(part(old, 'old')))
  paths[1].write_text(json.dumps(part(new, 'new')))
  merged = report.merge_results([str(p) for p in paths])
  assert len(merged['runs']) == 4 + 2  # the same runs are not counted twice
  assert all(r['alpha'] == 0.0 for r in merged['runs'])
  sam = merged['summary']['0.2']['rows']['SAM']
  assert (sam['rho_grid'], sam['alpha']) == (0.4, 0.0)
  alone = report.merge_results([str(paths[0])])
  assert alone['summary']['0.2']['rows']['SAM']['alpha'] == 0.0


def test_a_part_without_baselines_has_no_sgd_sam_and_no_gain():
  args = cli.parse_args(['--p', '0.25', '--kinds', 'rst,grst',
                        '--no-baselines'])
  assert [c.kind for c in kinds.make_configs(args)] == ['rst', 'grst']
  recs = [record('RST', rho, s, val, test + 0.04 * s) for s in range(2)
          for rho, val, test in ((0.1, 0.7, 0.7), (0.4, 0.8, 0.78))]
  recs += [record('linear', 0.4, s, 0.8, 0.75 + 0.1 * s, kind='linear')
           for s in range(2)]
  summary = stats.summarize(recs)
  row = summary['0.2']['rows']['RST']
  assert row['rho_grid'] == 0.4 and 'gain_kept' not in row
  assert 'diff_vs_constant' not in row
  # paired with constant p (kind 'rst', same p) per seed: 0.75 - 0.78 and
  # 0.85 - 0.82 (unpaired, the spread would be 0.07, not 0.03)
  diff = summary['0.2']['rows']['linear']['diff_vs_constant']
  assert diff['mean'] == pytest.approx(0.0) and diff['std'] == pytest.approx(
      0.06 / np.sqrt(2))
  assert '| RST | 0.4 | 80.00 ± 2.00 | – | – |' in report.format_tables(summary)
  with pytest.raises(SystemExit):
    cli.parse_args(['--flat-radius', '0'])


def test_parts_with_other_budgets_pool_their_runs_and_flatness(tmp_path):
  def part(runs, flat, command, p):
    return {'settings': {'noise': [0.2], 'seeds': 2, 'p': p,
                         'kinds': ['rst'], 'flat_radius': 0.2,
                         'command': command},
            'elapsed_s': 60.0, 'load_average': {'start': [1], 'end': [2]},
            'runs': runs, 'summary': stats.summarize(runs),
            'flatness': {'0.2': {'radius': 0.2, 'configs': flat,
                                 'per_seed': {'0': {n: {} for n in flat}}}}}

  base = [record('SGD', 0.0, s, 0.6, 0.6, kind='sgd') for s in range(2)]
  base += [record('SAM', 0.2, s, 0.8, 0.8, kind='sam', passes=20)
           for s in range(2)]
  base += [record('RST p=0.5', 0.2, s, 0.7, 0.7, passes=15)
           for s in range(2)]
  low = [record('RST p=0.25', 0.4, s, 0.75, 0.65 + 0.1 * s, passes=12)
         for s in range(2)]
  paths = [tmp_path / 'a.json', tmp_path / 'b.json']
  paths[0].write_text(json.dumps(part(base, {'SGD': {'rho': 0}, 'SAM': {
      'rho': 0.2}}, 'a', [0.5])))
  paths[1].write_text(json.dumps(part(low, {'RST p=0.25': {'rho': 0.4},
                                            'SAM': {'rho': 9}}, 'b', [0.25])))
  merged = report.merge_results([str(p) for p in paths])
  assert merged['settings']['p'] == [0.25, 0.5]
  assert merged['elapsed_s'] == 120.0 and len(merged['parts']) == 2
  rows = merged['summary']['0.2']['rows']
  assert set(rows) == {'SGD', 'SAM', 'RST p=0.5', 'RST p=0.25'}
  # gain kept by the no-baseline part's configuration, against the other
  # part's SGD and SAM, paired per seed: (0.05 + 0.15) / (0.2 + 0.2).
  assert rows['RST p=0.25']['gain_kept']['mean'] == pytest.approx(0.5)
  assert rows['RST p=0.25']['passes_vs_SAM'] == pytest.approx(0.6)
  flat = merged['flatness']['0.2']['configs']
  assert list(flat) == ['SGD', 'SAM', 'RST p=0.25']
  assert flat['SAM']['rho'] == 0.2  # the first part's, not repeated
  assert flat['RST p=0.25']['measured_in'] == str(paths[1])
  other = part(low, {}, 'c', [0.25])
  other['settings']['flat_radius'] = 0.1
  paths[1].write_text(json.dumps(other))
  with pytest.raises(ValueError, match='flat_radius'):
    report.merge_results([str(p) for p in paths])


def test_the_stable_region_ends_below_the_first_divergence():
  recs = []
  for seed in range(2):
    for rho, bad in ((0.1, False), (0.2, seed == 0), (0.4, False)):
      recs.append(record('G-RST', rho, seed, math.nan if bad else 0.7,
                         math.nan if bad else 0.7,
                         status='nan' if bad else 'ok'))
    recs.append(record('RST', 0.1, seed, 0.7, 0.7))
  table = stats.stability(stats.summarize(recs))
  # 0.4 did not diverge, but it lies above the first divergence at 0.2.
  assert table['G-RST']['0.2'] == (0.1, 0.2, '1/2')
  assert table['RST']['0.2'] == (0.1, None, '')
  text = report.format_stability(stats.summarize(recs))
  assert '| G-RST | 1 | stable to 0.1; diverged from 0.2 (1/2) |' in text


def test_gain_kept_gives_no_error_bar_when_sams_gain_is_within_noise():
  sgd = [0.60, 0.60, 0.60]
  sam = [0.62, 0.60, 0.61]  # gain 0.01 ± 0.006: under three s.e.
  kept = stats.gain_kept([0.61, 0.61, 0.61], sgd, sam)
  assert kept['weak'] and math.isnan(kept['sem'])
  assert kept['mean'] == pytest.approx(1.0)
  strong = stats.gain_kept([0.7, 0.7, 0.7], sgd, [0.8, 0.81, 0.79])
  assert 'weak' not in strong and strong['sem'] > 0


def hand_bootstrap(acc, sgd, sam, n_boot=2000, seed=0):
  """The bootstrap scipy replaced: resamples of seeds, s.e. and how many
  resamples with a zero denominator it left out."""
  rng = np.random.default_rng(seed)
  boot, left_out = [], 0
  for _ in range(n_boot):
    i = rng.integers(0, len(acc), len(acc))
    den = np.mean(sam[i] - sgd[i])
    if den != 0:
      boot.append(np.mean(acc[i] - sgd[i]) / den)
    else:
      left_out += 1
  return np.diff(np.percentile(boot, [16, 84]))[0] / 2, left_out


def test_gain_kept_se_is_half_the_central_68pc_of_a_paired_bootstrap():
  rng = np.random.default_rng(1)
  seed_effect = rng.normal(0, 0.1, 8)  # shared by a seed's three runs
  sgd = 0.6 + seed_effect + rng.normal(0, 0.005, 8)
  sam = 0.8 + seed_effect + rng.normal(0, 0.01, 8)
  acc = 0.7 + seed_effect + rng.normal(0, 0.02, 8)
  kept = stats.gain_kept(acc, sgd, sam)
  assert kept['mean'] == pytest.approx(np.mean(acc - sgd) / np.mean(
      sam - sgd))
  # Resampled per seed (unpaired, the s.e. would be about twice as large).
  assert kept['sem'] == pytest.approx(hand_bootstrap(acc, sgd, sam)[0],
                                      rel=0.1)


def test_a_resample_without_sam_gain_is_left_out_of_the_interval():
  # Gains of 1/8 on 27 seeds and -1/4 on 3 (exact in binary): a resample
  # with 10 of the 3 has a denominator of exactly zero.
  sgd = np.full(30, 0.5)
  sam = np.array([0.625] * 27 + [0.25] * 3)
  acc = np.array([0.5625] * 27 + [0.5] * 3)
  expected, left_out = hand_bootstrap(acc, sgd, sam)
  assert left_out >= 1
  kept = stats.gain_kept(acc, sgd, sam)
  assert 'weak' not in kept
  assert kept['sem'] == pytest.approx(expected, rel=0.1)


def test_the_headline_shows_gain_difference_or_accuracy_as_data_allow(
    tmp_path):
  from benchmarks.label_noise import plots

  def block(sam_test):
    recs = [record('SGD', 0.0, s, 0.6, 0.6, kind='sgd')
            for s in range(3)]
    recs += [record('SAM', 0.2, s, 0.8, t, kind='sam', passes=20)
             for s, t in enumerate(sam_test)]
    recs += [record('RST p=0.5', 0.2, s, 0.7, 0.7, passes=15)
             for s in range(3)]
    return stats.summarize(recs)

  strong = block([0.8, 0.81, 0.79])
  weak = block([0.62, 0.60, 0.61])  # SAM's gain under three s.e.
  alone = stats.summarize([record('RST p=0.5', 0.2, s, 0.7, 0.7)
                           for s in range(3)])  # a part without baselines
  assert plots._measure(strong['0.2']) == 'gain'
  assert plots._measure(weak['0.2']) == 'diff'
  assert plots._measure(alone['0.2']) == 'acc'
  for name, summary in (('strong', strong), ('weak', weak), ('alone', alone)):
    plots.plot(summary, {}, tmp_path / f'{name}.png',
               tmp_path / f'{name}_flat.png', 'title')
    assert (tmp_path / f'{name}.png').read_bytes()[:4] == b'\x89PNG'
    assert not (tmp_path / f'{name}_flat.png').exists()


def test_recipes_are_compared_on_the_paired_sam_level_goal():
  def recipe(looksam_tests):
    recs = []
    for seed, test in enumerate(looksam_tests):
      recs += [record('SGD', 0.0, seed, 0.6, 0.60, kind='sgd', passes=10),
               record('SAM', 0.1, seed, 0.8, 0.80 + 0.01 * seed, kind='sam',
                      passes=20),
               record('LookSAM', 0.1, seed, 0.8, test, kind='looksam',
                      passes=12, alpha=0.5)]
    return stats.summarize(recs)

  near = recipe([0.80, 0.805, 0.83])  # paired diffs 0, -0.005, +0.01
  far = recipe([0.70, 0.71, 0.72])
  row = near['0.2']['rows']['LookSAM']
  assert report.sam_level(row)
  assert not report.sam_level(far['0.2']['rows']['LookSAM'])
  table = report.format_recipes([near, far], ['recipe 1', 'recipe 2'],
                                ['SAM', 'LookSAM'])
  lines = table.splitlines()
  assert lines[0].count('SAM-level') == 2 and len(lines) == 4
  assert lines[3].startswith('| 20% | LookSAM | 0.1, 0.5 | 81.17 ± 0.93 | '
                             '+0.17 ± 0.44 | yes | 0.1, 0.5 | 71.00 ± 0.58 |')
  assert lines[3].endswith('| no | **no** |')
  assert lines[2].endswith('| – |')  # SAM itself: nothing to agree on
  same = report.format_recipes([near, near], ['a', 'b'], ['LookSAM'])
  assert same.splitlines()[2].endswith('| yes | yes |')


def test_the_transformer_builds_and_one_adamw_step_trains_it():
  import jax
  from flax import nnx

  from benchmarks.label_noise import transformer
  model = transformer.Transformer(40, nnx.Rngs(0))
  assert len(model.blocks) == 2 and model.pos.shape == (8, 64)  # 8 patches
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 40)).astype(np.float32)
  y = rng.integers(0, 10, 16).astype(np.int32)
  assert model(x).shape == (16, 10)
  # tokens see their position: swapping two patches changes the logits
  swapped = x.reshape(16, 8, 5)[:, [1, 0, 2, 3, 4, 5, 6, 7]].reshape(16, 40)
  assert np.abs(model(x) - model(swapped)).max() > 1e-3
  graphdef, params = nnx.split(model, nnx.Param)
  make_tx, train_step, evaluate, _ = train.build_trainer(
      graphdef, 10, 1e-3, ('adamw', 0.05, 2))
  state = make_tx(0.5, 0.1, 1.0, 0).init(params)
  for t in range(3):  # warmup: the first step has lr 0, the next ones move
    new, state, loss = train_step(
        params, state, np.float32(0.1), np.float32(1.0), np.float32(0.0),
        jax.numpy.asarray(x), jax.numpy.asarray(y), np.arange(16),
        take_sam=True, reusing=False)
    moved = any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(new), strict=True))
    assert np.isfinite(float(loss)) and moved == (t > 0)
    params = new
  assert int(state.count) == 3 and int(state.sam_steps) == 3
  with pytest.raises(ValueError, match='Transformer: length 42'):
    transformer.Transformer(42, nnx.Rngs(0))


def test_the_model_flag_picks_the_network_and_the_base_optimizer():
  args = cli.parse_args([])
  assert args.model == 'cnn' and args.lr == 0.1
  assert train.recipe_of(args, 27) == ('sgd',)
  args = cli.parse_args(['--model', 'transformer', '--weight-decay', '0.1',
                         '--warmup-epochs', '2'])
  assert args.lr == 2e-3 and train.recipe_of(args, 27) == ('adamw', 0.1, 54)
  assert type(train.make_model(args, 40, 0)).__name__ == 'Transformer'
  with pytest.raises(SystemExit):  # AdamW's flags mean nothing for the CNN
    cli.parse_args(['--weight-decay', '0.1'])
  with pytest.raises(SystemExit):
    cli.parse_args(['--model', 'transformer', '--lr', '0'])


def test_the_cnn_keeps_sgd_with_momentum_and_its_cosine_bit_for_bit():
  import jax
  import optax
  ref = optax.sgd(optax.cosine_decay_schedule(0.1, 50), momentum=0.9)
  ours = train.base_optimizer(('sgd',), 50, 0.1)
  params = {'w': np.ones(5, np.float32)}
  a, b = ref.init(params), ours.init(params)
  for t in range(1, 6):
    g = {'w': np.arange(5, dtype=np.float32) * t}
    ua, a = ref.update(g, a, params)
    ub, b = ours.update(g, b, params)
    assert np.array_equal(ua['w'], ub['w'])
  lr = train.learning_rate(('sgd',), 50, 0.1, recipe_steps=100)
  assert float(lr(25)) == pytest.approx(0.05)  # shorter run: cosine over 50
  assert jax.tree.leaves(a) and train.recipe_of(
      cli.parse_args(['--lr', '0.05']), 27) == ('sgd',)


def test_fixed_budget_kinds_run_the_budgets_steps_with_compressed_schedules():
  args = cli.parse_args(['--kinds', 'sam_short,base_long', '--p', '0.2,0.5',
                         '--no-baselines'])
  by = {c.name: c for c in kinds.make_configs(args)}
  total = 1000
  steps = {name: kinds.steps_of(c, total) for name, c in by.items()}
  assert steps == {'SAM short p=0.2': 600, 'base long p=0.2': 1200,
                   'SAM short p=0.5': 750, 'base long p=0.5': 1500}
  for p in (0.2, 0.5):  # the same gradient evaluations as RST at p
    short, long = by[f'SAM short p={p:g}'], by[f'base long p={p:g}']
    assert rst_optax.decisions(kinds.schedule_of(short, 600)[0], 0, 0,
                               10).all()
    assert not rst_optax.decisions(kinds.schedule_of(long, 600)[0], 0, 0,
                                   10).any()
    assert 2 * steps[short.name] == kinds.steps_of(long, total) == round(
        (1 + p) * total)
  assert kinds.grid_of(by['base long p=0.2'], (0.1, 0.2)) == [(0.0, 0.0)]
  assert kinds.grid_of(by['SAM short p=0.2'], (0.1, 0.2)) == [(0.1, 0.0),
                                                              (0.2, 0.0)]
  # AdamW's warmup-cosine over 1000 steps (100 of warmup), run for 600: the
  # whole schedule compressed, peak at step 60 and zero at the run's end
  lr = train.learning_rate(('adamw', 0.05, 100), 600, 1e-3, recipe_steps=1000)
  assert float(lr(0)) == 0 and float(lr(60)) == pytest.approx(1e-3)
  assert float(lr(30)) == pytest.approx(5e-4)
  assert float(lr(600)) == pytest.approx(0.0, abs=1e-9)
  assert float(lr(330)) == pytest.approx(5e-4, rel=1e-3)  # mid-decay
  lr = train.learning_rate(('adamw', 0.05, 100), 1500, 1e-3, recipe_steps=1000)
  assert float(lr(150)) == pytest.approx(1e-3)


def test_fixed_budget_runs_take_their_own_number_of_steps(tmp_path):
  result = cli.main(['--quick', '--kinds', 'sam_short,base_long', '--out',
                     str(tmp_path / 'out'), '--cache', str(tmp_path / 'c'),
                     '--no-flatness', '--rhos', '0.05'])
  assert result['flatness'] == {}  # skipped, as asked
  steps = result['settings']['total_steps']
  by = {r['config']: r for r in result['runs'] if r['seed'] == 0}
  assert by['SAM']['steps'] == steps and by['SAM']['passes'] == 2 * steps
  short, long = by['SAM short p=0.5'], by['base long p=0.5']
  assert short['steps'] == short['sam_steps'] == round(0.75 * steps)
  assert long['steps'] == round(1.5 * steps) and long['sam_steps'] == 0
  assert short['passes'] == long['passes'] == round(1.5 * steps)


def test_the_budget_table_pits_the_best_on_validation_against_both():
  from benchmarks.label_noise import budget
  runs = []
  for seed in range(3):
    for config, kind, p, val, test in (
        ('SGD', 'sgd', 0.0, 0.6, 0.60), ('SAM', 'sam', 1.0, 0.8, 0.80),
        ('RST p=0.2', 'rst', 0.2, 0.7, 0.90),  # best on test, not on val
        ('LookSAM p=0.2', 'looksam', 0.2, 0.75, 0.78 + 0.01 * seed),
        ('SAM short p=0.2', 'sam_short', 0.2, 0.7, 0.75),
        ('base long p=0.2', 'base_long', 0.2, 0.6, 0.62)):
      runs.append(record(config, 0.0 if kind in ('sgd', 'base_long') else 0.1,
                         seed, val, test, kind=kind) | {'p': p, 'alpha': 0.0})
  result = {'runs': runs, 'summary': stats.summarize(runs)}
  (row,) = budget.budget_rows(result)['0.2']
  assert row['budget'] == pytest.approx(0.6)
  assert row['best']['config'] == 'LookSAM p=0.2'  # chosen on validation
  assert row['vs_short']['mean'] == pytest.approx(0.04)  # 0.79 - 0.75
  assert row['vs_long']['mean'] == pytest.approx(0.17)
  assert row['vs_short']['sem'] == pytest.approx(0.01 / np.sqrt(3))
  text = budget.format_budget({'0.2': [row]})
  assert '| 0.60 | LookSAM p=0.2 (0.1) |' in text and '+4.00 ±' in text
  # A configuration named by --ours gets a row of its own, marked.
  best, mine = budget.budget_rows(result, ours=('RST p=0.2',))['0.2']
  assert best['best']['config'] == 'LookSAM p=0.2' and best['chosen']
  assert mine['best']['config'] == 'RST p=0.2' and not mine['chosen']
  assert mine['vs_short']['mean'] == pytest.approx(0.15)  # 0.90 - 0.75
  assert '| 0.60 | RST p=0.2 † (0.1) |' in budget.format_budget(
      {'0.2': [best, mine]})
  # NAME@RHO,ALPHA holds it at that grid point, whatever validation chose.
  runs += [record('LookSAM p=0.2', 0.2, seed, 0.5, 0.70, kind='looksam')
           | {'p': 0.2, 'alpha': 0.0} for seed in range(3)]
  result = {'runs': runs, 'summary': stats.summarize(runs)}
  name = budget.pin(result, 'LookSAM p=0.2@0.2,0')
  assert name == 'LookSAM p=0.2 at ρ 0.2, α 0'
  rows = budget.budget_rows(result, ours=(name,))['0.2']
  assert [r['best']['config'] for r in rows] == ['LookSAM p=0.2', name]
  assert rows[1]['vs_short']['mean'] == pytest.approx(-0.05)  # 0.70 - 0.75
  with pytest.raises(ValueError, match='no run of .* radius 0.3'):
    budget.pin(result, 'LookSAM p=0.2@0.3,0')


def test_pooling_keeps_only_the_seeds_asked_for(tmp_path):
  def part(seeds, config, command):
    runs = [record(config, 0.1, s, 0.7, 0.7, kind='sam', passes=20)
            for s in seeds]
    return {'settings': {'noise': [0.2], 'seeds': len(seeds),
                         'command': command},
            'elapsed_s': 1.0, 'load_average': {'start': [1], 'end': [2]},
            'runs': runs}

  paths = [tmp_path / 'eight.json', tmp_path / 'many.json']
  paths[0].write_text(json.dumps(part(range(8), 'SAM', 'eight')))
  paths[1].write_text(json.dumps(part(range(24), 'SAM x', 'many')))
  with pytest.raises(ValueError, match=r'SAM .*seeds \[8, 9'):
    report.merge_results([str(p) for p in paths])
  merged = report.merge_results([str(p) for p in paths], seeds=range(8))
  assert merged['settings']['seed_list'] == list(range(8))
  assert len(merged['runs']) == 16


def test_the_reuse_share_probe_sees_sgd_follow_the_direction_and_adam_turn_it():
  from benchmarks.label_noise import reuse_share
  rng = np.random.default_rng(0)
  data = {'x': rng.normal(size=(256, 40)).astype(np.float32),
          'y': rng.integers(0, 10, 256).astype(np.int32)}
  # one step of reuse: SGD's extra displacement is exactly along -g_v (it is
  # linear in its input); Adam's per-coordinate scaling turns it
  (sgd,) = reuse_share.probe('cnn', 'sgd', (0.5,), 3, 1, 0.1, 0, data)
  (adam,) = reuse_share.probe('cnn', 'adamw', (0.5,), 3, 1, 0.1, 0, data)
  assert sgd['cos_with_direction'] == pytest.approx(1.0, abs=1e-4)
  assert adam['cos_with_direction'] < 0.99 and sgd['share'] > 0


def test_collapse_criterion_and_exact_upper_bound(tmp_path):
  import scipy.stats

  from benchmarks.label_noise import collapse
  assert collapse.upper_bound(0, 24) == pytest.approx(1 - 0.05 ** (1 / 24))
  assert collapse.upper_bound(0, 24) == pytest.approx(0.1173, abs=1e-4)
  for k in (1, 5):  # at the bound, k or fewer events have probability 5%
    bound = collapse.upper_bound(k, 24)
    assert scipy.stats.binom.cdf(k, 24, bound) == pytest.approx(0.05)
  assert collapse.upper_bound(3, 3) == 1.0
  base = {'kind': 'looksam', 'status': 'ok', 'test_acc': 0.7,
          'train_noisy_loss': 1.3}
  assert not collapse.collapsed(base, 0.5)
  assert collapse.collapsed(base | {'test_acc': 0.49}, 0.5)  # below SGD
  assert collapse.collapsed(base | {'train_noisy_loss': math.log(10) + 0.009},
                            0.0)
  assert not collapse.collapsed(base | {'train_noisy_loss': 2.29}, 0.0)
  assert collapse.collapsed(base | {'status': 'nan',
                                    'train_noisy_loss': float('nan')}, 0.0)
  sgd = base | {'kind': 'sgd'}
  assert not collapse.collapsed(sgd, 0.5)  # SGD is not compared to itself
  runs = []
  for seed in range(3):
    runs += [base | {'kind': 'sgd', 'config': 'SGD', 'rho': 0.0, 'seed': seed,
                     'test_acc': 0.5},
             base | {'kind': 'sam', 'config': 'SAM', 'rho': 0.3, 'seed': seed,
                     'test_acc': 0.7 + 0.01 * seed},
             base | {'config': 'LookSAM', 'rho': 0.3, 'alpha': 0.5,
                     'seed': seed, 'test_acc': (0.1, 0.75, 0.8)[seed],
                     'train_noisy_loss': (math.log(10), 1.2, 1.2)[seed]}]
  (tmp_path / 'collapse_r3_40_x.json').write_text(json.dumps({'runs': runs}))
  rows = {r['config']: r for r in collapse.summarize_cell(
      collapse.load_parts(str(tmp_path))[(3, 0.4)])}
  look = rows['LookSAM α=0.5']
  assert look['collapses'] == 1 and look['collapsed_seeds'] == [0]
  assert look['upper95'] == pytest.approx(collapse.upper_bound(1, 3))
  assert look['diff_sam'] == pytest.approx((-60 + 4 + 8) / 3)
  assert rows['SAM']['collapses'] == 0 and rows['SGD']['seeds'] == 3
  assert look['diff_sam_ok'] == look['diff_sam'] and look['sam_ok_seeds'] == 3
  runs[1]['test_acc'] = 0.4  # SAM below SGD on seed 0: left out there
  rows = {r['config']: r for r in collapse.summarize_cell(runs)}
  assert rows['SAM']['collapsed_seeds'] == [0]
  assert rows['LookSAM α=0.5']['sam_ok_seeds'] == 2
  assert rows['LookSAM α=0.5']['diff_sam_ok'] == pytest.approx((4 + 8) / 2)
  assert '| 40% | LookSAM α=0.5 | 0.3 | 3 | 1 (0) |' in collapse.format_tables(
      collapse.load_parts(str(tmp_path)))
