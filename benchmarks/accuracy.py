"""Accuracy per compute on MNIST-1D: SGD, SAM, and RST / G-RST per schedule family.

The multi-seed comparison behind the demo (``examples/mnist1d_demo.py``, whose
model, data and training loop it reuses) at a larger budget: every schedule
family of p(t) (constant, piecewise, linear, trigonometric) at the same mean
p, for RST (lam = 1) and G-RST (lam = matching_lam). For each seed all
configurations run back to back, so wall-clock ratios compare runs that shared
the machine's load alike. Results are written after every seed.

Run:  python -m benchmarks.accuracy [--seeds 20 --epochs 100 ...]   (from the
repository root)
Writes benchmarks/results/accuracy.json, accuracy.md (every table) and
accuracy.png; prints the tables.
"""

import argparse
import json
import os
import textwrap
import time

import jax
import numpy as np
from tqdm.auto import tqdm

import rst_optax
from examples import mnist1d_demo as demo
from rst_optax.schedules import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--seeds', type=int, default=20)
  parser.add_argument('--epochs', type=int, default=100)
  parser.add_argument('--p', type=float, default=0.5, help='mean p(t)')
  parser.add_argument('--families', default=','.join(FAMILIES),
                      help=f'schedule families, from {",".join(FAMILIES)}')
  parser.add_argument('--rho', type=float, default=0.05)
  parser.add_argument('--dispatch', default='auto',
                      choices=('auto', 'host', 'cond'))
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks',
                                                    'results'))
  parser.add_argument('--cache', default=os.path.join(ROOT, 'runs'),
                      help='folder for the MNIST-1D data and compile caches')
  parser.add_argument('--no-progress', action='store_true')
  parser.add_argument('--from-json', default=None,
                      help='redo the tables and plot of a saved accuracy.json '
                      'without training')
  args = parser.parse_args(argv)
  args.families = demo.comma_list(parser, '--families', args.families,
                                  FAMILIES)
  for family in args.families:
    try:  # the family's own check of p (periodic needs p = 1/k)
      rst_optax.schedules.family(family, args.p, total_steps=1)
    except ValueError as e:
      parser.error(f'--families {family} --p {args.p}: {e}')
  return args


def configs(args):
  """(name, method, family) of every run of one seed, in running order."""
  out = [('SGD', 'sgd', None), ('SAM', 'sam', None)]
  for family in args.families:
    out += [(f'RST {family}', 'rst', family), (f'G-RST {family}', 'grst', family)]
  return out


def stats(values):
  v = np.asarray(values, np.float64)
  std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  return {'mean': float(v.mean()), 'std': std, 'sem': std / np.sqrt(len(v)),
          'n': len(v)}


def summarize(records):
  """Per configuration: accuracy, cost, and paired differences against SAM."""
  names = list(dict.fromkeys(r['config'] for r in records))
  by = {n: sorted((r for r in records if r['config'] == n),
                  key=lambda r: r['seed']) for n in names}
  seeds = sorted(set.intersection(*({r['seed'] for r in runs}
                                    for runs in by.values())))
  by = {n: [r for r in runs if r['seed'] in seeds] for n, runs in by.items()}
  rows = {}
  for name, runs in by.items():
    row = {'config': name, 'method': runs[0]['method'],
           'schedule': runs[0]['schedule'], 'lam': runs[0]['lam'],
           'seeds': seeds}
    for key in ('test_acc', 'val_acc', 'passes', 'wall_s', 'compile_s'):
      row[key] = stats([r[key] for r in runs])
    for ref in ('SAM', 'SGD'):
      if ref in by and name != ref:
        diff = [a['test_acc'] - b['test_acc'] for a, b in zip(runs, by[ref],
                                                             strict=True)]
        row[f'diff_vs_{ref}'] = stats(diff)  # paired over seeds
        row[f'passes_vs_{ref}'] = (row['passes']['mean']
                                   / stats([r['passes'] for r in by[ref]])['mean'])
        row[f'wall_vs_{ref}'] = float(np.mean(
            [a['wall_s'] / b['wall_s'] for a, b in zip(runs, by[ref],
                                                        strict=True)]))
    rows[name] = row
  return rows


def format_tables(rows, settings):
  """The Markdown tables for benchmarks/README.md and the goal verdicts."""
  lines = ['| configuration | lam | test acc. % mean ± std (± s.e.) | val. acc. % '
           '| Δ vs SAM, pp (paired ± s.e.) | gradient evaluations | × SAM '
           'passes | wall-clock s | × SAM time |', '|---|---|---|---|---|---|---'
           '|---|---|']
  for name, row in rows.items():
    acc, val = row['test_acc'], row['val_acc']
    diff = row.get('diff_vs_SAM')
    diff_s = (f'{100 * diff["mean"]:+.2f} ± {100 * diff["sem"]:.2f}'
              if diff else '–')
    lam = f'{row["lam"]:.4g}' if row['lam'] is not None else '–'
    lines.append(
        f'| {name} | {lam} | {100 * acc["mean"]:.2f} ± {100 * acc["std"]:.2f} '
        f'(± {100 * acc["sem"]:.2f}) | {100 * val["mean"]:.2f} ± '
        f'{100 * val["std"]:.2f} | {diff_s} | {row["passes"]["mean"]:,.0f} '
        f'| {row.get("passes_vs_SAM", 1.0):.3f} | {row["wall_s"]["mean"]:.1f} '
        f'| {row.get("wall_vs_SAM", 1.0):.3f} |')
  table = '\n'.join(lines)

  verdicts = []
  sam, sgd = rows.get('SAM'), rows.get('SGD')
  grst = rows.get('G-RST constant')
  if sam and grst:
    ok_acc = (grst['test_acc']['mean']
              >= sam['test_acc']['mean'] - sam['test_acc']['sem'])
    verdicts.append(
        f'- G-RST (constant p = {settings["p"]}) accuracy ≥ SAM − 1 s.e.: '
        f'{100 * grst["test_acc"]["mean"]:.2f}% vs {100 * sam["test_acc"]["mean"]:.2f}'
        f'% − {100 * sam["test_acc"]["sem"]:.2f} → {"met" if ok_acc else "MISSED"}'
        f' (paired difference {100 * grst["diff_vs_SAM"]["mean"]:+.2f} ± '
        f'{100 * grst["diff_vs_SAM"]["sem"]:.2f} pp).')
    ok_passes = grst['passes_vs_SAM'] <= 0.77
    verdicts.append(
        f'- G-RST gradient evaluations ≤ 0.77 × SAM: '
        f'{grst["passes_vs_SAM"]:.3f} → {"met" if ok_passes else "MISSED"}.')
    ok_wall = grst['wall_vs_SAM'] <= 0.8
    verdicts.append(
        f'- G-RST wall-clock ≤ 0.8 × SAM (mean of per-seed ratios): '
        f'{grst["wall_vs_SAM"]:.3f} → {"met" if ok_wall else "MISSED"}.')
  if sgd:
    for name in ('RST constant', 'G-RST constant'):
      if name in rows:
        row = rows[name]
        ok = row['test_acc']['mean'] > sgd['test_acc']['mean']
        verdicts.append(
            f'- {name} above SGD: {100 * row["test_acc"]["mean"]:.2f}% vs '
            f'{100 * sgd["test_acc"]["mean"]:.2f}% (paired '
            f'{100 * row["diff_vs_SGD"]["mean"]:+.2f} ± '
            f'{100 * row["diff_vs_SGD"]["sem"]:.2f} pp) → '
            f'{"met" if ok else "MISSED"}.')
  return table, '\n'.join(verdicts)


def plot(rows, path, title):
  """Accuracy per configuration (left) and against passes (right).

  Drawn for a page about 750 px wide: large text, and no panel with more
  than four legend entries (the right panel groups the schedule families of
  RST and of G-RST, told apart by their markers, named on the left).
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  markers = {None: 'o', 'constant': 'o', 'piecewise': 's', 'linear': '^',
             'trigonometric': 'D', 'periodic': 'v'}
  colors = {'sgd': 'C0', 'sam': 'C1', 'rst': 'C2', 'grst': 'C3'}
  names = {'sgd': 'SGD', 'sam': 'SAM', 'rst': 'RST (λ = 1)',
           'grst': 'G-RST (λ = 1/p)'}
  with plt.rc_context({'font.size': 11, 'axes.titlesize': 11,
                       'legend.fontsize': 10}):
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(8, 4.8), dpi=150, layout='constrained',
        gridspec_kw={'width_ratios': [1, 1]})
    shown = set()
    families = list(dict.fromkeys(row['schedule'] for row in rows.values()
                                  if row['schedule']))
    for i, row in enumerate(rows.values()):
      style = dict(fmt=markers[row['schedule']], color=colors[row['method']],
                   capsize=3, ms=6)
      acc, sem = 100 * row['test_acc']['mean'], 100 * row['test_acc']['sem']
      left.errorbar(acc, -i, xerr=sem, **style)
      # The families sit at the same passes: spread them a little apart.
      shift = (families.index(row['schedule']) - (len(families) - 1) / 2
               if row['schedule'] else 0)
      label = (names[row['method']] if row['method'] not in shown else None)
      shown.add(row['method'])
      right.errorbar(row['passes']['mean'] + 40 * shift, acc, yerr=sem,
                     label=label, **style)
    left.set_yticks([-i for i in range(len(rows))], list(rows))
    left.set_xlabel('test accuracy (%), mean ± s.e.')
    right.set_xticks([3000, 4000, 5000])
    right.set_xlabel('gradient evaluations')
    right.set_ylabel('test accuracy (%)')
    right.legend(loc='lower center', bbox_to_anchor=(0.5, 1.0), ncol=2,
                 frameon=False)
    for ax in (left, right):
      ax.grid(alpha=0.3)
    fig.suptitle(textwrap.fill(title, 95), fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def title_of(settings):
  return (
      f'MNIST-1D ({settings["n_train"]} train, {settings["n_test"]} test), '
      f'1-D CNN, SGD momentum 0.9, cosine lr {settings["lr"]}, batch '
      f'{settings["batch_size"]}, {settings["epochs"]} epochs, rho '
      f'{settings["rho"]}, mean p {settings["p"]}, {settings["seeds"]} seeds, '
      f'dispatch {settings["dispatch"]}')


def markdown(result):
  """The whole report as one Markdown page (``accuracy.md``)."""
  table, verdicts = format_tables(result['summary'], result['settings'])
  machine, load = result['machine'], result['load_average']
  end = load['after_seed'][-1] if load.get('after_seed') else float('nan')
  return '\n'.join([
      '# Accuracy per compute: full results', '',
      'Generated from `accuracy.json` (`python -m benchmarks.accuracy '
      '--from-json`, or the run itself); do not edit.', '',
      f'Settings: {title_of(result["settings"])}.', '',
      f'Machine: {machine["cpu"]}, {machine["cores"]} cores, jax '
      f'{machine["jax"]}; load average {load["start"][0]:.2f} at start, '
      f'{end:.2f} at end; {result["elapsed_s"] / 60:.1f} min in all.', '',
      table, '', '"Gradient evaluations" is steps + SAM steps (mean over '
      'seeds); "× SAM time" is the mean over seeds of the per-seed ratio of '
      'wall-clock to SAM\'s, while "wall-clock s" is the plain mean; s.e. = '
      'std / √seeds.', '', '## Goals', '', verdicts]) + '\n'


def report(result, out):
  """Prints the tables and verdicts; writes ``accuracy.md`` and the plot."""
  plot(result['summary'], os.path.join(out, 'accuracy.png'),
       title_of(result['settings']))
  page = markdown(result)
  with open(os.path.join(out, 'accuracy.md'), 'w', encoding='utf-8') as f:
    f.write(page)
  print(page)


def main(argv=None):
  args = parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      result = json.load(f)
    report(result, args.out)
    return result
  os.makedirs(args.out, exist_ok=True)
  run_args = {}
  for name, method, family in configs(args):
    flags = ['--epochs', str(args.epochs), '--p', str(args.p), '--rho',
             str(args.rho), '--dispatch', args.dispatch, '--out', args.cache,
             '--schedule', family or 'constant']
    run_args[name] = (method, demo.parse_args(flags))
  first = next(iter(run_args.values()))[1]
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(args.cache, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  dispatch = (rst_optax.recommended_dispatch() if args.dispatch == 'auto'
              else args.dispatch)
  data = demo.load_data(first.num_samples, first.val_size, args.cache)
  settings = {
      'seeds': args.seeds, 'epochs': args.epochs, 'p': args.p, 'rho': args.rho,
      'families': args.families, 'dispatch': dispatch, 'lr': first.lr,
      'batch_size': first.batch_size, 'width': first.width,
      'num_samples': first.num_samples, 'n_train': len(data['y']),
      'n_val': len(data['y_val']), 'n_test': len(data['y_test']),
      'command': 'python -m benchmarks.accuracy ' + ' '.join(
          f'--{k} {v}' for k, v in (('seeds', args.seeds),
                                   ('epochs', args.epochs), ('p', args.p),
                                   ('rho', args.rho))),
  }
  title = title_of(settings)
  print(title)
  machine = demo.machine()
  load = {'start': os.getloadavg()}
  records, start = [], time.perf_counter()
  progress = tqdm(total=args.seeds * len(run_args) * args.epochs, unit='epoch',
                  disable=True if args.no_progress else None)
  for seed in range(args.seeds):
    for name, (method, run) in run_args.items():
      record = demo.train_run(method, seed, data, run, dispatch, progress)
      record.pop('curve')
      records.append(record | {'config': name,
                               'schedule': run.schedule if method in (
                                   'rst', 'grst') else None})
    load['after_seed'] = load.get('after_seed', []) + [os.getloadavg()[0]]
    rows = summarize(records)
    result = {'settings': settings, 'machine': machine, 'load_average': load,
              'elapsed_s': time.perf_counter() - start, 'summary': rows,
              'runs': records}
    with open(os.path.join(args.out, 'accuracy.json'), 'w') as f:
      json.dump(result, f, indent=1)
  progress.close()
  report(result, args.out)
  return result


if __name__ == '__main__':
  main()
