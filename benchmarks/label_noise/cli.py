"""The command line of the label-noise benchmark: the stages in turn.

``main`` runs the jobs (``train.run_job``, one (noise, seed) each, on
``--workers`` processes), writing the records after every job to
``{name}.partial.json``; summarizes them (``stats.summarize``); measures
flatness (``train.measure_flatness``); writes ``{name}.json`` and reports
(``report.report``). With ``--from-json`` it pools saved parts instead
(``report.merge_results``) and reports them, without training.

Run ``python -m benchmarks.label_noise --help`` for the flags.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

from benchmarks import label_noise
from benchmarks.label_noise import kinds, report, stats, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
DEFAULT_RHOS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)


def floats(text):
  """A comma-separated flag as a tuple of floats."""
  return tuple(float(v) for v in text.split(',') if v.strip())


def ints(text):
  """A comma-separated flag as a tuple of ints (``--seed-list``)."""
  return tuple(int(v) for v in text.split(',') if v.strip())


def parse_args(argv=None):
  """The flags, checked; ``--quick`` sets a tiny plumbing run."""
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.label_noise',
      description=label_noise.__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--noise', type=floats, default=(0.2, 0.4),
                      help='fractions of training labels replaced, e.g. '
                      '0,0.2,0.4 (0: the clean regime)')
  parser.add_argument('--seeds', type=int, default=8)
  parser.add_argument('--epochs', type=int, default=100)
  parser.add_argument('--p', type=floats, default=(0.5, 0.25),
                      help='mean probabilities of a SAM step (budgets)')
  parser.add_argument('--rhos', type=floats, default=DEFAULT_RHOS,
                      help='radius grid (SAM-equivalent for scaled kinds)')
  parser.add_argument('--kinds', default=','.join(kinds.DEFAULT_KINDS),
                      help=f'configurations, from {",".join(kinds.KINDS)}')
  parser.add_argument('--alphas', type=floats, default=(0.5, 0.7, 1.0),
                      help='reuse strengths of the kinds with reuse, chosen '
                      'on validation together with the radius')
  parser.add_argument('--baselines', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='run SGD and SAM (--no-baselines: a part whose '
                      'runs are pooled with --from-json with one that has '
                      'them)')
  parser.add_argument('--sam', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='with --baselines, run SAM (--no-sam: SGD alone)')
  parser.add_argument('--sam-rhos', type=floats, default=None,
                      help='radii of the baseline SAM (default: --rhos)')
  parser.add_argument('--seed-list', type=ints, default=None,
                      help='run these seeds instead of 0 .. --seeds - 1')
  from examples import mnist1d_demo
  mnist1d_demo.add_recipe_arguments(parser)
  parser.add_argument('--model', choices=('cnn', 'transformer'), default='cnn',
                      help='cnn: the 1-D CNN, SGD with momentum 0.9 and a '
                      'cosine decay; transformer: the pre-LN transformer '
                      '(benchmarks/label_noise/transformer.py), AdamW with '
                      'a warmup-cosine schedule')
  parser.set_defaults(lr=None)
  parser.add_argument('--weight-decay', type=float, default=0.05,
                      help='decoupled weight decay of AdamW (transformer)')
  parser.add_argument('--warmup-epochs', type=float, default=2.0,
                      help='linear warmup of AdamW (transformer), in epochs')
  parser.add_argument('--flat-radius', type=float, default=0.2,
                      help='common radius of the epsilon-sharpness (it is '
                      "also measured at each run's own radius)")
  parser.add_argument('--flatness', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='measure flatness at the end (--no-flatness: '
                      'skip it, e.g. for the transformer, where it costs '
                      'more than the runs of a part; SGD and SAM included)')
  for flag, default, what in (
      ('--flat-top', 3, 'RST-family configurations measured for flatness'),
      ('--flat-n', 1000, 'training samples in the flatness loss'),
      ('--flat-iters', 30, 'power iterations for the top Hessian eigenvalue'),
      ('--flat-steps', 10, 'ascent steps of the epsilon-sharpness')):
    parser.add_argument(flag, type=int, default=default, help=what)
  parser.add_argument('--workers', type=int, default=1,
                      help='processes, one (noise, seed) job each at a time')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks',
                                                    'results'))
  parser.add_argument('--name', default='label_noise',
                      help='stem of the output files')
  parser.add_argument('--cache', default=os.path.join(ROOT, 'runs'),
                      help='folder for the MNIST-1D data')
  parser.add_argument('--quick', action='store_true',
                      help='tiny plumbing run: 2 seeds, 4 epochs, 500 '
                      'samples, 2 radii, p 0.5, noise 0.2')
  parser.add_argument('--from-json', default=None,
                      help='redo the tables and plots of a saved JSON; '
                      'several, comma-separated, pool their runs (e.g. '
                      'extra radii) and choose again')
  parser.add_argument('--recipes', default=None,
                      help='compare saved (pooled) JSONs of different recipes, '
                      'comma-separated: one table of the --recipe-configs, '
                      'no training')
  parser.add_argument('--recipe-configs',
                      default='SGD;SAM;LookSAM (every k + reuse) p=0.2;RST p=0.2',
                      help='configurations compared by --recipes, '
                      'semicolon-separated')
  args = parser.parse_args(argv)
  if args.recipes and args.name == 'label_noise':
    args.name = 'label_noise_recipes'
  if args.lr is None:  # the peak learning rate of each model's recipe
    args.lr = {'cnn': 0.1, 'transformer': 2e-3}[args.model]
  if not args.lr > 0:
    parser.error(f'--lr must be > 0; got {args.lr}.')
  if args.weight_decay < 0 or args.warmup_epochs < 0:
    parser.error('--weight-decay and --warmup-epochs must be >= 0; got '
                 f'{args.weight_decay}, {args.warmup_epochs}.')
  if args.model == 'cnn' and (args.weight_decay != 0.05
                              or args.warmup_epochs != 2.0):
    parser.error('--weight-decay and --warmup-epochs set the transformer\'s '
                 'AdamW; the CNN trains with SGD (use --model transformer).')
  if args.quick:
    args.seeds, args.epochs, args.num_samples, args.val_size = 2, 4, 500, 100
    args.batch_size, args.rhos, args.p, args.noise = 50, (0.05, 0.2), (0.5,), (
        0.2,)
    args.flat_n, args.flat_iters, args.flat_steps = 128, 3, 2
    if args.name == 'label_noise':
      args.name = 'label_noise_quick'
  args.kinds = tuple(k.strip() for k in args.kinds.split(',') if k.strip())
  for kind in args.kinds:
    if kind not in kinds.KINDS:
      parser.error(f'--kinds: unknown kind {kind!r}; choose from '
                   f'{tuple(kinds.KINDS)}.')
  for name in ('seeds', 'epochs', 'batch_size', 'width', 'workers',
               'flat_n', 'flat_iters'):
    if getattr(args, name) < 1:
      parser.error(f'--{name.replace("_", "-")} must be >= 1.')
  if not all(0.0 <= q < 1.0 for q in args.noise) or not args.noise:
    parser.error(f'--noise: fractions in [0, 1); got {args.noise}.')
  if not all(0.0 < p < 1.0 for p in args.p):
    parser.error(f'--p: probabilities in (0, 1); got {args.p}.')
  if not args.flat_radius > 0:
    parser.error(f'--flat-radius must be > 0; got {args.flat_radius}.')
  if not args.rhos or not all(r > 0 for r in args.rhos):
    parser.error(f'--rhos: radii > 0; got {args.rhos}.')
  if not args.alphas or not all(a > 0 for a in args.alphas):
    parser.error(f'--alphas: reuse strengths > 0; got {args.alphas}.')
  periodic = [k for k in args.kinds if kinds.KINDS[k].schedule == 'periodic']
  if periodic:
    from rst_optax import schedules
    for p in args.p:
      try:  # the periodic kinds are schedules.periodic: p = 1/k
        schedules.family('periodic', p, total_steps=1)
      except ValueError as e:
        parser.error(f'--p {p}: {e} Drop the periodic kinds '
                     f'({",".join(periodic)}) with --kinds.')
  return args


def run_jobs(args, out_partial):
  """Every (noise, seed) job; records, final parameters and the job sizes.

  The records so far are written to ``out_partial`` after every job.
  """
  seeds = getattr(args, 'seed_list', None) or range(args.seeds)
  jobs = [(noise, seed) for seed in seeds for noise in args.noise]
  print(f'{len(jobs)} jobs (noise x seed), {len(kinds.make_configs(args))} '
        f'configurations x {len(args.rhos)} radii each; {args.workers} '
        f'worker(s); load {os.getloadavg()[0]:.2f}', flush=True)
  start = time.perf_counter()
  records, finals, info = [], {}, None
  if args.workers == 1:
    results = (train.run_job(args, noise, seed) for noise, seed in jobs)
  else:
    pool = concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=multiprocessing.get_context('spawn'))
    results = pool.map(train.run_job, [args] * len(jobs),
                       *zip(*jobs, strict=True))
  for (noise, seed), (recs, fin, job_info) in zip(jobs, results, strict=True):
    records += recs
    info = job_info
    for (config, g, alpha), params in fin.items():
      finals[(noise, seed, config, g, alpha)] = params
    with open(out_partial, 'w') as f:
      json.dump({'settings': vars(args), 'runs': records}, f, default=float)
    print(f'  noise {noise:g} seed {seed}: done at '
          f'{(time.perf_counter() - start) / 60:.1f} min, load '
          f'{os.getloadavg()[0]:.2f}', flush=True)
  if args.workers > 1:
    pool.shutdown()
  return records, finals, info


def main(argv=None):
  """Runs the benchmark (or pools ``--from-json``) and reports; the result."""
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.recipes:
    paths = args.recipes.split(',')
    runs_of, summaries = [], []
    for path in paths:
      with open(path) as f:
        runs_of.append(stats.with_alpha(json.load(f)['runs']))
      summaries.append(stats.summarize(runs_of[-1]))
    labels = [f'recipe {i + 1}' for i in range(len(paths))]
    configs = [c.strip() for c in args.recipe_configs.split(';') if c.strip()]
    table = report.format_recipes(summaries, labels, configs)
    names = '; '.join(f'{i + 1}: `{os.path.basename(p)}`'
                      for i, p in enumerate(paths))
    print(f'Recipes: {names}')
    print(table)
    fixed = [report.format_fixed_radius(runs_of, summaries, labels, c)
             for c in configs if c not in ('SGD', 'SAM')]
    page = [f'# Label noise: the recipes side by side ({args.name})', '',
            'Generated by `python -m benchmarks.label_noise --recipes ...` '
            f'(`make label-noise-report`); do not edit. Recipes: {names}.',
            '', '## At the radius chosen on validation', '',
            '"SAM-level": no seed diverged and test accuracy at least '
            "SAM's minus one s.e. of the paired difference.", '', table]
    for config, text in zip([c for c in configs if c not in ('SGD', 'SAM')],
                            fixed, strict=True):
      page += ['', f'## {config} at each radius', '',
               "SAM at its radius chosen on validation; diverged seeds left "
               'out of the means and counted.', '', text]
    with open(os.path.join(args.out, f'{args.name}.md'), 'w',
              encoding='utf-8') as f:
      f.write('\n'.join(page) + '\n')
    return table
  if args.from_json:
    result = report.merge_results(args.from_json.split(','))
    report.report(result, args.out, args.name)
    if ',' in args.from_json:
      with open(os.path.join(args.out, f'{args.name}.json'), 'w') as f:
        json.dump(result, f, indent=1, default=float)
    return result

  from examples import mnist1d_demo as demo
  demo.load_data(args.num_samples, args.val_size, args.cache)  # cache it once
  partial = os.path.join(args.out, f'{args.name}.partial.json')
  load_start, start = os.getloadavg(), time.perf_counter()
  records, finals, info = run_jobs(args, partial)
  train_s = time.perf_counter() - start
  summary = stats.summarize(records)
  flat = (train.measure_flatness(args, summary, finals) if args.flatness
          else {})
  elapsed = time.perf_counter() - start

  settings = {k: (list(v) if isinstance(v, tuple) else v)
              for k, v in vars(args).items()} | info | {
                  'command': 'python -m benchmarks.label_noise ' + ' '.join(
                      argv if argv is not None else sys.argv[1:])}
  result = {'settings': settings, 'machine': demo.machine(),
            'load_average': {'start': load_start, 'end': os.getloadavg()},
            'elapsed_s': elapsed, 'train_s': train_s, 'summary': summary,
            'flatness': flat, 'runs': records}
  with open(os.path.join(args.out, f'{args.name}.json'), 'w') as f:
    json.dump(result, f, indent=1, default=float)
  os.remove(partial)
  report.report(result, args.out, args.name)
  return result
