"""The statistics of the label-noise benchmark: selection, summaries, stability.

From the run records (``train.run_job``'s, or pooled from saved parts), per
noise level:

- what counts as diverged (``run_status``): a loss turned NaN or Inf (the run
  stopped there), or a test accuracy at chance level. A diverged run is
  counted, never averaged in;
- the radius, and the reuse strength alpha where the kind has one, of each
  configuration, chosen on the validation split (``choose``): the mean over
  seeds of the validation accuracy, a run that turned NaN counting at chance;
- the summary (``summarize``): the sweep over the grid, and the headline row
  of each configuration at its chosen (radius, alpha), with test accuracy,
  cost, and differences paired per seed: to SAM, to constant-p RST at the
  same budget, and the fraction of SAM's gain over SGD kept (``gain_kept``,
  with a bootstrap s.e.);
- where divergence starts over the grid (``stability``), and which
  configurations to measure for flatness (``flat_targets``).

A record is a dict with ``noise``, ``seed``, ``config``, ``kind``, ``p``,
``rho_grid``, ``rho``, ``lam``, ``alpha`` (missing in old files: 0),
``status``, ``val_acc``, ``test_acc``, ``passes`` and ``wall_s``.
"""

import functools
import warnings

import numpy as np
import scipy.stats

CHANCE = 0.1  # 10 classes
CHANCE_MARGIN = 0.05  # test accuracy <= CHANCE + CHANCE_MARGIN: collapsed


def run_status(train_loss, test_acc):
  """'nan' for a non-finite loss, 'chance' for a collapse, else 'ok'."""
  if not np.isfinite(train_loss):
    return 'nan'
  if not test_acc > CHANCE + CHANCE_MARGIN:
    return 'chance'
  return 'ok'


def stats(values):
  """Mean, standard deviation and s.e. of the finite ``values``, and their n."""
  v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
  if not len(v):
    return {'mean': float('nan'), 'std': float('nan'), 'sem': float('nan'),
            'n': 0}
  std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  return {'mean': float(v.mean()), 'std': std, 'sem': std / np.sqrt(len(v)),
          'n': len(v)}


def label(config, alpha):
  """A configuration's name at a reuse strength (the name alone at 0)."""
  return f'{config} α={alpha:g}' if alpha else config


def with_alpha(records):
  """The records, each with its ``alpha`` (0 where an old file has none)."""
  return [r if 'alpha' in r else r | {'alpha': 0.0} for r in records]


def selection_score(record):
  """Validation accuracy for choosing rho; a NaN run counts at chance."""
  v = record['val_acc']
  return CHANCE if not np.isfinite(v) else v


def choose(records):
  """{(noise, config): (rho_grid, alpha)} maximizing mean validation accuracy.

  Over the (radius, alpha) pairs each configuration ran at; at a tie, the
  smaller alpha, then the smaller radius.
  """
  records = with_alpha(records)
  chosen = {}
  for (noise, config) in dict.fromkeys((r['noise'], r['config'])
                                       for r in records):
    runs = [r for r in records if r['noise'] == noise
            and r['config'] == config]
    pairs = sorted({(r['rho_grid'], r['alpha']) for r in runs})
    score = {ga: np.mean([selection_score(r) for r in runs
                          if (r['rho_grid'], r['alpha']) == ga])
             for ga in pairs}
    chosen[(noise, config)] = max(pairs, key=lambda ga: (score[ga], -ga[1],
                                                         -ga[0]))
  return chosen


def _ratio_of_mean_gains(acc, sgd, sam, axis=-1):
  """mean(acc - sgd) / mean(sam - sgd) along ``axis``; NaN where 0 / 0."""
  num = np.mean(acc - sgd, axis=axis)
  den = np.mean(sam - sgd, axis=axis)
  return np.divide(num, den, out=np.full(np.shape(num), np.nan),
                   where=den != 0)


def gain_kept(acc, sgd, sam, n_boot=2000, seed=0):
  """Fraction of SAM's gain kept, paired per seed, with a bootstrap s.e.

  ``acc``, ``sgd``, ``sam``: test accuracies per seed, aligned (NaN: a
  diverged run, whose seed is then left out). The s.e. is half the central
  68% interval of the paired percentile bootstrap over seeds
  (``scipy.stats.bootstrap``, ``n_boot`` resamples from ``seed``), robust
  to resamples whose denominator is small; a resample whose denominator is
  zero is left out. Where SAM's own paired gain over SGD is under three
  standard errors (the clean regime), that denominator may be near zero in a
  resample, so no s.e. is given and ``weak`` is set: the fraction is then not
  a measure to rank by.
  """
  a, b, c = (np.asarray(v, np.float64) for v in (acc, sgd, sam))
  ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(c)
  a, b, c = a[ok], b[ok], c[ok]
  if not len(a) or np.mean(c - b) == 0:
    return {'mean': float('nan'), 'sem': float('nan'), 'n': int(len(a))}
  value = float(np.mean(a - b) / np.mean(c - b))
  gain = c - b
  if len(a) > 1 and np.mean(gain) < 3 * np.std(gain, ddof=1) / np.sqrt(
      len(a)):
    return {'mean': value, 'sem': float('nan'), 'n': int(len(a)),
            'weak': True}
  if len(a) == 1:
    return {'mean': value, 'sem': 0.0, 'n': 1}
  with warnings.catch_warnings():  # NaN resamples are handled below
    warnings.simplefilter('ignore', scipy.stats.DegenerateDataWarning)
    boot = scipy.stats.bootstrap(
        (a, b, c), _ratio_of_mean_gains, n_resamples=n_boot, paired=True,
        vectorized=True, confidence_level=0.68, method='percentile',
        rng=np.random.default_rng(seed))
  low, high = boot.confidence_interval
  if not np.isfinite(high - low):  # a resample with a zero denominator
    low, high = np.nanpercentile(boot.bootstrap_distribution, [16, 84])
  return {'mean': value, 'sem': float(high - low) / 2, 'n': int(len(a))}


def _at_choice(chosen, noise, recs, seeds, config):
  """The chosen (grid radius, alpha) of ``config`` and its run per seed."""
  g, alpha = chosen[(noise, config)]
  runs = {r['seed']: r for r in recs if r['config'] == config
          and r['rho_grid'] == g and r['alpha'] == alpha}
  return (g, alpha), [runs[s] for s in seeds]


def test_of(runs):
  """Test accuracy per run, NaN for a diverged one."""
  return [r['test_acc'] if r['status'] == 'ok' else float('nan')
          for r in runs]


def _sweep(recs, configs):
  """Each configuration at each (radius, alpha) it ran at, over the seeds."""
  sweep = []
  for config in configs:
    for alpha, g in sorted({(r['alpha'], r['rho_grid']) for r in recs
                            if r['config'] == config}):
      runs = [r for r in recs if r['config'] == config
              and r['rho_grid'] == g and r['alpha'] == alpha]
      ok = [r for r in runs if r['status'] == 'ok']
      sweep.append({
          'config': config, 'rho_grid': g, 'alpha': alpha,
          'rho': runs[0]['rho'], 'lam': runs[0]['lam'],
          'val_acc': stats([r['val_acc'] for r in ok]),
          'test_acc': stats([r['test_acc'] for r in ok]),
          'diverged': len(runs) - len(ok), 'runs': len(runs)})
  return sweep


def summarize(records):
  """Per noise level: the sweep, the chosen radius and the headline rows."""
  records = with_alpha(records)
  chosen = choose(records)
  out = {}
  for noise in sorted({r['noise'] for r in records}):
    recs = [r for r in records if r['noise'] == noise]
    configs = list(dict.fromkeys(r['config'] for r in recs))
    seeds = sorted({r['seed'] for r in recs})
    sweep = _sweep(recs, configs)

    at_choice = functools.partial(_at_choice, chosen, noise, recs, seeds)
    _, sgd_runs = at_choice('SGD') if 'SGD' in configs else (None, None)
    _, sam_runs = at_choice('SAM') if 'SAM' in configs else (None, None)
    rows, tests = {}, {}
    for config in configs:
      (g, alpha), runs = at_choice(config)
      row = {'config': config, 'kind': runs[0]['kind'], 'p': runs[0]['p'],
             'rho_grid': g, 'rho': runs[0]['rho'], 'lam': runs[0]['lam'],
             'alpha': alpha, 'test_acc': stats(test_of(runs)),
             'val_acc': stats([r['val_acc'] for r in runs
                               if r['status'] == 'ok']),
             'diverged': sum(r['status'] != 'ok' for r in runs),
             'diverged_in_sweep': sum(
                 s['diverged'] for s in sweep if s['config'] == config),
             'passes': stats([r['passes'] for r in runs]),
             'wall_s': stats([r['wall_s'] for r in runs]),
             'train_noisy_acc': stats([r.get('train_noisy_acc', np.nan)
                                       for r in runs])}
      if sam_runs is not None:
        if sgd_runs is not None:
          row['gain_kept'] = gain_kept(test_of(runs), test_of(sgd_runs),
                                       test_of(sam_runs))
        diff = np.asarray(test_of(runs)) - np.asarray(test_of(sam_runs))
        row['diff_vs_SAM'] = stats(diff)
        row['passes_vs_SAM'] = (row['passes']['mean']
                                / stats([r['passes'] for r in sam_runs])['mean'])
        row['wall_vs_SAM'] = stats([
            a['wall_s'] / b['wall_s'] for a, b in zip(runs, sam_runs,
                                                      strict=True)
            if a['status'] == b['status'] == 'ok'])['mean']
      rows[config] = row
      tests[config] = test_of(runs)
    for config, row in rows.items():  # paired against constant p, same p
      constant = next((c for c, r in rows.items() if r['kind'] == 'rst'
                       and r['p'] == row['p']), None)
      if constant is not None and row['kind'] not in ('sgd', 'sam', 'rst'):
        row['diff_vs_constant'] = stats(np.asarray(tests[config])
                                        - np.asarray(tests[constant]))
    out[str(noise)] = {'noise': noise, 'seeds': seeds, 'rows': rows,
                       'sweep': sweep}
  return out


def stability(summary):
  """{label: {noise: (largest stable grid radius, first unstable, n)}}.

  Per configuration and alpha (``label``). Stable: no seed diverged at that
  radius. ``first unstable`` is the smallest grid radius where some seed
  diverged (None if none did) and ``n`` how many seeds did there.
  """
  out = {}
  for key, block in summary.items():
    for s in block['sweep']:
      if s['config'] == 'SGD':
        continue
      out.setdefault(label(s['config'], s['alpha']), {}).setdefault(
          key, []).append(s)
  table = {}
  for name, by_noise in out.items():
    for key, sweep in by_noise.items():
      sweep = sorted(sweep, key=lambda s: s['rho_grid'])
      bad = [s for s in sweep if s['diverged']]
      first = bad[0] if bad else None
      below = [s['rho_grid'] for s in sweep
               if first is None or s['rho_grid'] < first['rho_grid']]
      table.setdefault(name, {})[key] = (
          max(below) if below else None,
          first['rho_grid'] if first else None,
          f'{first["diverged"]}/{first["runs"]}' if first else '')
  return table


def flat_targets(block, top):
  """SGD, SAM and the ``top`` RST-family configurations by validation."""
  rows = block['rows']
  family = sorted((r for r in rows.values() if r['kind'] not in ('sgd', 'sam')
                   and r['diverged'] == 0),
                  key=lambda r: -r['val_acc']['mean'])
  return [n for n in ('SGD', 'SAM') if n in rows] + [r['config']
                                                     for r in family[:top]]
