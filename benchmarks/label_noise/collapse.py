"""Collapse rates of LookSAM: the report of ``make bench-collapse``.

Pools the saved parts ``collapse_r{recipe}_{noise}*.json`` (runs of
``python -m benchmarks.label_noise``, paired per seed) per recipe and noise
level and writes ``collapse.md``: per configuration, the seeds, the
collapses, the rate with its exact one-sided 95% upper bound
(Clopper-Pearson), the test accuracy, and the paired difference to SAM; then
the traces of the first steps (``collapse_trace.json``, from
``python -m benchmarks.label_noise.trace``) summed up, with their figure, and
the notes ``collapse_notes.md`` verbatim.

A run counts as collapsed (``collapsed``) if its loss turned NaN, its final
training loss (on the noisy training labels it was trained on) is within
0.01 of ln 10 (a constant output), or its test accuracy ends below SGD's
for the same seed.

Run (from the repository root):
  python -m benchmarks.label_noise.collapse [--out benchmarks/results]
"""

import argparse
import glob
import json
import math
import os
import re

import numpy as np
import scipy.stats

from benchmarks.label_noise import cli

RECIPES = {
    1: 'recipe 1 (lr 0.1, 100 epochs, val 500)',
    2: 'recipe 2 (lr 0.1, 115 epochs, val 600)',
    3: 'recipe 3 (lr 0.2, 100 epochs, val 500)',
}
LN10 = math.log(10)


def upper_bound(k: int, n: int, level: float = 0.95) -> float:
  """Exact one-sided upper confidence bound of a rate, k events in n."""
  if k >= n:
    return 1.0
  return float(scipy.stats.beta.ppf(level, k + 1, n - k))


def collapsed(record, sgd_test) -> bool:
  """A NaN, a final training loss within 0.01 of ln 10, or below SGD."""
  loss = record.get('train_noisy_loss', float('nan'))
  if record.get('status') == 'nan' or not np.isfinite(loss):
    return True
  if abs(loss - LN10) <= 0.01:
    return True
  return record['kind'] != 'sgd' and record['test_acc'] < sgd_test


def load_parts(out):
  """{(recipe, noise): [records]} from the ``collapse_r*_*.json`` parts, each
  record tagged with its file; a run found twice (same seed, configuration,
  radius, alpha) is kept once."""
  cells = {}
  for path in sorted(glob.glob(os.path.join(out, 'collapse_r*_*.json'))):
    match = re.match(r'collapse_r(\d)_(\d+)', os.path.basename(path))
    if not match or path.endswith('.partial.json'):
      continue
    with open(path) as f:
      result = json.load(f)
    key = (int(match[1]), int(match[2]) / 100)
    seen = {(r['seed'], r['config'], r['rho'], r.get('alpha', 0.0))
            for r in cells.get(key, [])}
    for r in result['runs']:
      k = (r['seed'], r['config'], r['rho'], r.get('alpha', 0.0))
      if k not in seen:
        seen.add(k)
        cells.setdefault(key, []).append(r | {
            'file': os.path.basename(path)})
  return cells


def summarize_cell(records):
  """Per configuration (and radius): the collapse count, rate, bound,
  accuracy and paired difference to SAM."""
  sgd = {r['seed']: r['test_acc'] for r in records if r['kind'] == 'sgd'}
  sam = {r['seed']: r['test_acc'] for r in records if r['kind'] == 'sam'}
  sam_ok = {r['seed'] for r in records if r['kind'] == 'sam'
            and not collapsed(r, sgd.get(r['seed'], -np.inf))}
  rows = {}
  for r in records:
    name = r['config'] if r['kind'] in ('sgd', 'sam') else (
        f"{r['config']} α={r.get('alpha', 0):g}")
    rows.setdefault((name, r['rho']), []).append(r)
  out = []
  for (name, rho), runs in rows.items():
    runs = sorted(runs, key=lambda r: r['seed'])
    gone = [r['seed'] for r in runs
            if collapsed(r, sgd.get(r['seed'], -np.inf))]
    acc = np.array([r['test_acc'] if np.isfinite(r['test_acc']) else 0.1
                    for r in runs]) * 100
    paired = np.array([(r['test_acc'] - sam[r['seed']]) * 100 for r in runs
                       if r['seed'] in sam and np.isfinite(r['test_acc'])])
    kept = np.array([(r['test_acc'] - sam[r['seed']]) * 100 for r in runs
                     if r['seed'] in sam_ok and np.isfinite(r['test_acc'])])
    n = len(runs)
    out.append({
        'config': name, 'rho': rho, 'seeds': n,
        'seed_list': [r['seed'] for r in runs], 'collapses': len(gone),
        'collapsed_seeds': gone, 'rate': len(gone) / n,
        'upper95': upper_bound(len(gone), n),
        'test_mean': float(acc.mean()),
        'test_sem': float(acc.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        'diff_sam': float(paired.mean()) if len(paired) else float('nan'),
        'diff_sam_sem': float(paired.std(ddof=1) / math.sqrt(len(paired)))
                        if len(paired) > 1 else float('nan'),
        'diff_sam_ok': float(kept.mean()) if len(kept) else float('nan'),
        'diff_sam_ok_sem': float(kept.std(ddof=1) / math.sqrt(len(kept)))
                           if len(kept) > 1 else float('nan'),
        'sam_ok_seeds': len(kept),
        'passes': runs[0].get('passes'), 'files': sorted({
            r.get('file', '') for r in runs}),
        'sgd_compared': sum(r['seed'] in sgd for r in runs)})
  order = {'SGD': 0, 'SAM': 1}
  return sorted(out, key=lambda row: (order.get(row['config'], 2),
                                      row['config'], row['rho']))


def format_tables(cells):
  """Markdown: one table per recipe, a block of rows per noise level."""
  lines = []
  for recipe in sorted({r for r, _ in cells}):
    lines += [f'## {RECIPES.get(recipe, f"recipe {recipe}")}', '',
              '| noise | configuration | ρ | seeds | collapses (seeds) | rate '
              '| 95% upper bound | test acc. % ± s.e. | paired diff. to SAM '
              '± s.e. | SAM-level (≥ −1 s.e.) | the same, on the seeds where '
              'SAM did not collapse (seeds) |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    for noise in sorted(n for r, n in cells if r == recipe):
      for row in summarize_cell(cells[(recipe, noise)]):
        diff, sem = row['diff_sam'], row['diff_sam_sem']
        level = ('–' if row['config'] in ('SAM', 'SGD') or not np.isfinite(
            sem) else ('yes' if diff >= -sem else '**no**'))
        seeds = (f" ({', '.join(map(str, row['collapsed_seeds']))})"
                 if row['collapses'] else '')
        ok, ok_sem = row['diff_sam_ok'], row['diff_sam_ok_sem']
        level_ok = ('–' if row['config'] in ('SAM', 'SGD') or not np.isfinite(
            ok_sem) else ('yes' if ok >= -ok_sem else '**no**'))
        lines.append(
            f"| {noise:.0%} | {row['config']} | {row['rho']:g} | "
            f"{row['seeds']} | {row['collapses']}{seeds} | "
            f"{row['rate']:.1%} | {row['upper95']:.1%} | "
            f"{row['test_mean']:.2f} ± {row['test_sem']:.2f} | "
            + ('–' if row['config'] == 'SAM' or not np.isfinite(diff) else
               f'{diff:+.2f} ± {sem:.2f}') + f' | {level} | '
            + ('–' if row['config'] in ('SAM', 'SGD') or not np.isfinite(ok)
               else f"{ok:+.2f} ± {ok_sem:.2f}, {level_ok} "
               f"({row['sam_ok_seeds']})") + ' |')
    lines.append('')
  return '\n'.join(lines)


def trace_summary(traces):
  """Markdown: per trace, the measures of its first steps, in windows."""
  lines = ['| seed | setting | steps | fixed-batch loss at the end | '
           'max ‖α‖g‖u‖ / ‖g‖ | ‖m_reused‖ / ‖m‖ (mean, max) | '
           'cos(m_reused, m) mean | cos(u, g) mean at age 1 / 4 | '
           'dead units conv1–3 at the end |',
           '|---|---|---|---|---|---|---|---|---|']
  for tr in traces:
    rows = tr['rows']
    ratio = [r['reused_norm'] / r['g_norm'] for r in rows if r['g_norm'] > 0]
    share = [r['reused_momentum_norm'] / r['momentum_norm'] for r in rows
             if r['momentum_norm'] > 0 and r['reused_momentum_norm'] > 0]
    mcos = [r['reused_momentum_cos'] for r in rows
            if r['reused_momentum_norm'] > 0]
    by_age = {a: [r['cos_u_g'] for r in rows if r['age'] == a
                  and not r['sam'] and r['cos_u_g'] is not None]
              for a in (1, 4)}
    setting = tr['tag'] or (f"α={tr['alpha']:g}" + (
        f", warm-up {tr['warmup']}" if tr['warmup'] else ''))
    dead = ', '.join(f'{v:.2f}' for v in rows[-1]['dead_units'])
    fmt = lambda v, f='.2f': format(v, f) if np.isfinite(v) else '–'
    top = lambda v: max(v) if v else float('nan')
    mean = lambda v: float(np.mean(v)) if v else float('nan')
    lines.append(
        f"| {tr['seed']} | {setting}, noise {tr['noise']:.0%} | {len(rows)} "
        f"| {rows[-1]['loss_fixed']:.3f} | {fmt(top(ratio))} | "
        f"{fmt(mean(share))}, {fmt(top(share))} | {fmt(mean(mcos))} | "
        f"{fmt(mean(by_age[1]), '+.2f')} / {fmt(mean(by_age[4]), '+.2f')} | "
        f"{dead} |")
  return '\n'.join(lines)


def report(out):
  """Writes ``collapse.md`` (and ``collapse_summary.json``); the text."""
  cells = load_parts(out)
  parts = ['# LookSAM collapse rates (issue 24)', '',
           'Written by `python -m benchmarks.label_noise.collapse` from the '
           '`collapse_r*_*.json` parts (`make bench-collapse`). A run counts '
           'as collapsed if its loss turned NaN, its final training loss is '
           'within 0.01 of ln 10, or its test accuracy ends below SGD\'s for '
           'the same seed (SGD of the same part: same recipe, noise, seed). '
           'The 95% upper bound is the exact one-sided Clopper-Pearson '
           'bound. The paired difference to SAM is per seed, in points, '
           'against SAM at the radius chosen on validation in the benchmark '
           '(ρ = 0.4 at 20% noise, 0.3 at 40%, both recipes; recipe 3 uses '
           'the same). LookSAM is `periodic(5)` (0.6× SAM\'s passes).', '',
           format_tables(cells)]
  notes = os.path.join(out, 'collapse_notes.md')
  trace_path = os.path.join(out, 'collapse_trace.json')
  if os.path.exists(trace_path):
    with open(trace_path) as f:
      traces = json.load(f)['traces']
    parts += ['## Traces of the first steps', '',
              'From `python -m benchmarks.label_noise.trace` '
              '(`collapse_trace.json`, figure `collapse_trace.png`).', '',
              trace_summary(traces), '', '![traces](collapse_trace.png)', '']
  if os.path.exists(notes):
    with open(notes) as f:
      parts += [f.read()]
  text = '\n'.join(parts).rstrip() + '\n'
  with open(os.path.join(out, 'collapse.md'), 'w') as f:
    f.write(text)
  summary = {f'r{r}_{n:g}': summarize_cell(recs)
             for (r, n), recs in sorted(cells.items())}
  with open(os.path.join(out, 'collapse_summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return text


def main(argv=None):
  """The command line: ``--out``, the folder of the parts."""
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.label_noise.collapse',
      description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default=os.path.join(cli.ROOT, 'benchmarks',
                                                    'results'))
  print(report(parser.parse_args(argv).out))


if __name__ == '__main__':
  main()
