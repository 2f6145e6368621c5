"""MNIST-1D demo: SGD, SAM, RST and G-RST side by side, accuracy and cost.

Trains a small Flax NNX 1-D CNN on MNIST-1D (Greydanus, 2020; generated
locally by the ``mnist1d`` package, nothing is downloaded) with SGD with
momentum and a cosine learning rate, and the same base optimizer wrapped in
``rst_optax.rst`` for SAM (``schedule=1``), RST and G-RST (``lam`` from
``rst_optax.schedules.matching_lam``). Every method sees the same epochs, data
order and initialization for a given seed; methods run interleaved per seed, so
they share the machine's load alike. It prints a table of test accuracy
(mean ± std over seeds), wall-clock and gradient evaluations (passes = steps +
SAM steps), and writes ``results.json``, ``results.md`` and ``mnist1d.png``
(test accuracy against passes, with error bars) to ``--out``.

Run:  make demo     or     python examples/mnist1d_demo.py --help

The branch of each RST step is dispatched as ``rst_optax.recommended_dispatch()``
says (host dispatch on CPU, where a conv net's gradient inside ``lax.cond`` is
slow; in-graph ``lax.cond`` elsewhere); ``--dispatch`` forces either.
"""

import argparse
import functools
import json
import os
import platform
import textwrap
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import rst_optax
from rst_optax import flax_utils, schedules

METHODS = ('sgd', 'sam', 'rst', 'grst')
LABELS = {'sgd': 'SGD', 'sam': 'SAM', 'rst': 'RST', 'grst': 'G-RST'}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--seeds', type=int, default=8,
                      help='number of seeds (0, 1, ...)')
  parser.add_argument('--epochs', type=int, default=100)
  parser.add_argument('--methods', default=','.join(METHODS),
                      help=f'comma-separated, from {",".join(METHODS)}')
  parser.add_argument('--p', type=float, default=0.5,
                      help='mean probability of a SAM step for RST and G-RST')
  parser.add_argument('--schedule', default='constant',
                      choices=schedules.FAMILIES,
                      help='family of p(t), with mean --p '
                      '(rst_optax.schedules.family)')
  parser.add_argument('--rho', type=float, default=0.05, help='SAM radius')
  parser.add_argument('--lam', type=float, default=None,
                      help='G-RST weight (default: matching_lam, 1 / mean p)')
  parser.add_argument('--dispatch', default='auto',
                      choices=('auto', 'host', 'cond'),
                      help='auto: rst_optax.recommended_dispatch()')
  add_recipe_arguments(parser)
  parser.add_argument('--train-subset', type=int, default=None,
                      help='train on the first N training samples only')
  parser.add_argument('--out', default='runs/mnist1d',
                      help='folder for the results and the data cache')
  parser.add_argument('--compile-cache', default='runs/jax_cache',
                      help="JAX's persistent compilation cache folder, so runs "
                      "with other seeds reuse the executables; 'none': off")
  parser.add_argument('--no-progress', action='store_true',
                      help='no progress bar (it is off anyway when the output '
                      'is not a terminal)')
  args = parser.parse_args(argv)
  args.methods = comma_list(parser, '--methods', args.methods, METHODS)
  if not 0.0 < args.p <= 1.0:
    parser.error(f'--p must be in (0, 1]; got {args.p}.')
  try:  # the family's own check of p (periodic needs p = 1/k)
    schedules.family(args.schedule, args.p, total_steps=1)
  except ValueError as e:
    parser.error(f'--schedule {args.schedule} --p {args.p}: {e}')
  for name in ('seeds', 'epochs', 'batch_size', 'width', 'num_samples'):
    if getattr(args, name) < 1:
      parser.error(f'--{name.replace("_", "-")} must be >= 1.')
  if args.rho < 0:
    parser.error(f'--rho must be >= 0; got {args.rho}.')
  return args


def add_recipe_arguments(parser):
  """The flags of the data and the training recipe shared by every method."""
  parser.add_argument('--lr', type=float, default=0.1,
                      help='peak learning rate of the cosine schedule')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--width', type=int, default=25,
                      help='channels of the CNN')
  parser.add_argument('--num-samples', type=int, default=5000,
                      help='MNIST-1D samples generated (80%% train, 20%% test)')
  parser.add_argument('--val-size', type=int, default=500,
                      help='training samples held out for validation')


def comma_list(parser, flag, text, choices):
  """The items of a comma-separated flag, each checked against ``choices``."""
  items = [item.strip() for item in text.split(',') if item.strip()]
  for item in items:
    if item not in choices:
      parser.error(f'{flag}: unknown {item!r}; choose from {choices}.')
  return items


def load_data(num_samples, val_size, cache_dir):
  """MNIST-1D arrays: train, validation (held out from train) and test."""
  path = os.path.join(cache_dir, f'mnist1d_{num_samples}.npz')
  if os.path.exists(path):
    with np.load(path) as f:
      raw = dict(f)
  else:
    from mnist1d.data import get_dataset_args, make_dataset  # generates locally
    data_args = get_dataset_args()
    data_args.num_samples = num_samples
    state = np.random.get_state()  # make_dataset seeds NumPy's global RNG
    ds = make_dataset(data_args)
    np.random.set_state(state)
    raw = {k: np.asarray(ds[k]) for k in ('x', 'y', 'x_test', 'y_test')}
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path, **raw)
  n_train = len(raw['y']) - val_size
  if n_train < 1:
    raise ValueError(f'--val-size {val_size} leaves no training sample.')
  as_x = lambda a: np.asarray(a, np.float32)
  as_y = lambda a: np.asarray(a, np.int32)
  return {
      'x': as_x(raw['x'][:n_train]), 'y': as_y(raw['y'][:n_train]),
      'x_val': as_x(raw['x'][n_train:]), 'y_val': as_y(raw['y'][n_train:]),
      'x_test': as_x(raw['x_test']), 'y_test': as_y(raw['y_test']),
  }


class CNN(nnx.Module):
  """The 1-D CNN of the MNIST-1D paper: three strided convolutions, a linear."""

  def __init__(self, width, length, rngs):
    self.conv1 = nnx.Conv(1, width, 5, strides=2, padding=1, rngs=rngs)
    self.conv2 = nnx.Conv(width, width, 3, strides=2, padding=1, rngs=rngs)
    self.conv3 = nnx.Conv(width, width, 3, strides=2, padding=1, rngs=rngs)
    for k in (5, 3, 3):
      length = (length + 2 - k) // 2 + 1
    self.linear = nnx.Linear(length * width, 10, rngs=rngs)

  def __call__(self, x):
    x = x[..., None]  # (batch, length, 1 channel)
    for conv in (self.conv1, self.conv2, self.conv3):
      x = jax.nn.relu(conv(x))
    return self.linear(x.reshape(x.shape[0], -1))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_tx(method, args, total_steps, seed):
  """The optimizer of ``method``, its p(t) (None for SGD) and its lam."""
  lr = optax.cosine_decay_schedule(args.lr, total_steps)
  base = optax.sgd(lr, momentum=0.9)
  if method == 'sgd':
    return optax.with_extra_args_support(base), None, None
  if method == 'sam':  # SAM is rst at p = 1, lam = 1 (no cond between branches).
    schedule, lam = 1.0, 1.0
  else:
    schedule = schedules.family(args.schedule, args.p, total_steps)
    lam = 1.0
    if method == 'grst':
      lam = (args.lam if args.lam is not None
             else schedules.matching_lam(schedule, total_steps))
  tx = rst_optax.rst(base, schedule, rho=args.rho, lam=lam, seed=seed)
  return tx, schedule, lam


def make_train_step(graphdef):
  """A functional NNX train step: (state, data, batch indices) -> new state."""

  def train_step(state, x, y, idx, take_sam=None):
    model, optimizer = nnx.merge(graphdef, state)
    xb, yb = x[idx], y[idx]
    grad_fn = flax_utils.nnx_grad_fn(loss_fn, model, xb, yb)  # before the pass
    loss, grads = nnx.value_and_grad(loss_fn)(model, xb, yb)
    optimizer.update(model, grads, grad_fn=grad_fn, take_sam=take_sam)
    return nnx.state((model, optimizer)), loss

  return train_step


@functools.partial(jax.jit, static_argnums=0)
def accuracy(graphdef, state, x, y):
  """Accuracy of the model ``nnx.merge(graphdef, state)``; compiled once."""
  model = nnx.merge(graphdef, state)
  return jnp.mean(jnp.argmax(model(x), -1) == y)


class Setup(NamedTuple):
  """Everything one run needs before its first step."""
  tx: optax.GradientTransformation
  schedule: Any  # p(t); None for SGD
  lam: float | None
  model_def: Any  # the model's graphdef, for evaluation
  graphdef: Any  # (model, optimizer)'s graphdef, for the train step
  state: Any  # (model, optimizer)'s state
  orders: list[np.ndarray]  # batch indices, one (steps, batch) array an epoch
  total_steps: int
  seed: int


def set_up(method, seed, data, args):
  """The optimizer, model, state and data order of one run."""
  n_train, batch = len(data['y']), args.batch_size
  if n_train < batch:
    raise ValueError(f'{n_train} training samples < --batch-size {batch}.')
  steps_per_epoch = n_train // batch
  total_steps = steps_per_epoch * args.epochs
  tx, schedule, lam = make_tx(method, args, total_steps, seed)
  model = CNN(args.width, data['x'].shape[1], nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  model_def = nnx.graphdef(model)  # the same for every run: one compilation
  graphdef, state = nnx.split((model, optimizer))
  rng = np.random.default_rng(seed)  # data order: the same for every method
  orders = [rng.permutation(n_train)[:steps_per_epoch * batch].reshape(
      steps_per_epoch, batch).astype(np.int32) for _ in range(args.epochs)]
  return Setup(tx, schedule, lam, model_def, graphdef, state, orders,
               total_steps, seed)


def compile_step(setup, method, dispatch, x, y):
  """The step function, compiled outside the timed loop.

  Runs each executable once and drops the result. Returns the step, the
  planned decisions (host dispatch) or None, the seconds it took, and a
  function that counts the compilations.
  """
  train_step = make_train_step(setup.graphdef)
  first = setup.orders[0][0]
  start = time.perf_counter()
  if dispatch == 'host' and method in ('rst', 'grst'):
    step = rst_optax.HostDispatch(train_step, setup.tx,
                                  chunk_size=setup.total_steps)
    planned = rst_optax.decisions(setup.schedule, setup.seed, 0,
                                  setup.total_steps)
    for take_sam in sorted(set(planned.tolist())):
      jax.block_until_ready(
          step.jitted(setup.state, x, y, first, take_sam=take_sam))
    _ = step.take_sam  # computes all the decisions now, not in the loop
    return step, planned, time.perf_counter() - start, lambda: step.compilations
  # SGD, SAM (p = 1: no cond between branches), or RST with the in-graph coin.
  traces = []

  def counted_step(*step_args):
    traces.append(1)
    return train_step(*step_args)

  step = jax.jit(counted_step)
  jax.block_until_ready(step(setup.state, x, y, first))
  return step, None, time.perf_counter() - start, lambda: len(traces)


def sam_steps_so_far(setup, step, planned, state):
  """SAM steps taken so far: from HostDispatch, or read from the state."""
  if planned is not None:
    return step.sam_steps
  if setup.schedule is None:
    return 0
  _, opt = nnx.merge(setup.graphdef, state)
  return int(opt.opt_state.sam_steps[...])


def train_epochs(setup, step, planned, x, y, x_test, y_test, progress,
                 label):
  """The timed loop; returns the state, last loss, seconds and test curve."""
  state, wall, curve = setup.state, 0.0, []
  steps_per_epoch = len(setup.orders[0])
  for epoch, order in enumerate(setup.orders):
    start = time.perf_counter()
    for idx in order:
      state, loss = step(state, x, y, idx)
    jax.block_until_ready(state)
    wall += time.perf_counter() - start
    passes = (epoch + 1) * steps_per_epoch + sam_steps_so_far(
        setup, step, planned, state)
    curve.append((passes, float(accuracy(setup.model_def, state[0], x_test,
                                         y_test))))
    if progress is not None:
      progress.update()
      progress.set_postfix(label, loss=f'{float(loss):.3f}')
  return state, loss, wall, curve


def check_counters(setup, method, step, planned, state):
  """Checks RSTState's counters against the run; returns its SAM steps."""
  if setup.schedule is None:
    return 0
  _, opt = nnx.merge(setup.graphdef, state)
  count, sam_steps = (int(opt.opt_state.count[...]),
                      int(opt.opt_state.sam_steps[...]))
  expected = step.sam_steps if planned is not None else sam_steps
  if planned is not None and expected != int(planned.sum()):
    raise RuntimeError(f'{method}: HostDispatch took {expected} SAM steps; '
                       f'{int(planned.sum())} were planned.')
  if count != setup.total_steps or sam_steps != expected:
    raise RuntimeError(f'{method}: RSTState count {count}, sam_steps '
                       f'{sam_steps}; expected {setup.total_steps}, '
                       f'{expected}.')
  return sam_steps


def train_run(method, seed, data, args, dispatch, progress=None):
  """Trains one method with one seed; returns its record (accuracy, cost)."""
  setup = set_up(method, seed, data, args)
  x, y = jnp.asarray(data['x']), jnp.asarray(data['y'])
  step, planned, compile_s, compilations = compile_step(
      setup, method, dispatch, x, y)
  state, loss, wall, curve = train_epochs(
      setup, step, planned, x, y, jnp.asarray(data['x_test']),
      jnp.asarray(data['y_test']), progress, {'method': method, 'seed': seed})
  sam_steps = check_counters(setup, method, step, planned, state)
  return {
      'method': method, 'seed': seed, 'lam': setup.lam,
      'test_acc': curve[-1][1],
      'val_acc': float(accuracy(setup.model_def, state[0], data['x_val'],
                                data['y_val'])),
      'last_batch_loss': float(loss),
      'steps': setup.total_steps, 'sam_steps': sam_steps,
      'passes': setup.total_steps + sam_steps,
      'wall_s': wall, 'compile_s': compile_s,
      'compilations': compilations(),
      'dispatch': 'host' if planned is not None else 'jit',
      'curve': curve,
  }


def summarize(records, methods):
  """Mean, std (ddof 1) and standard error over seeds, per method."""
  rows = {}
  for method in methods:
    runs = [r for r in records if r['method'] == method]
    if not runs:
      continue
    row = {'method': method, 'seeds': len(runs)}
    for key in ('test_acc', 'val_acc', 'wall_s', 'passes', 'sam_steps',
                'compile_s'):
      v = np.asarray([r[key] for r in runs], np.float64)
      std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
      row[key] = {'mean': float(v.mean()), 'std': std,
                  'sem': std / np.sqrt(len(v))}
    rows[method] = row
  return rows


def format_table(rows):
  """A Markdown table of the summary, with cost relative to SAM when run."""
  ref = rows.get('sam')
  lines = ['| method | test acc. % (mean ± std) | val. acc. % | wall-clock s | '
           'gradient evaluations | × SAM passes | × SAM time |',
           '|---|---|---|---|---|---|---|']
  for method, row in rows.items():
    acc, val = row['test_acc'], row['val_acc']
    passes, wall = row['passes']['mean'], row['wall_s']['mean']
    rel = ('–', '–')
    if ref:
      rel = (f'{passes / ref["passes"]["mean"]:.2f}',
             f'{wall / ref["wall_s"]["mean"]:.2f}')
    lines.append(
        f'| {LABELS[method]} | {100 * acc["mean"]:.2f} ± {100 * acc["std"]:.2f} '
        f'| {100 * val["mean"]:.2f} ± {100 * val["std"]:.2f} '
        f'| {wall:.1f} ± {row["wall_s"]["std"]:.1f} | {passes:,.0f} '
        f'| {rel[0]} | {rel[1]} |')
  return '\n'.join(lines)


def plot(records, rows, path, title):
  """Test accuracy against passes: mean curves, final points with error bars."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  for i, (method, row) in enumerate(rows.items()):
    color = f'C{i}'
    runs = [r for r in records if r['method'] == method]
    curves = np.asarray([r['curve'] for r in runs], np.float64)  # seed, epoch, 2
    ax.plot(curves[:, :, 0].mean(0), 100 * curves[:, :, 1].mean(0), color=color,
            alpha=0.35, lw=1)
    ax.errorbar(row['passes']['mean'], 100 * row['test_acc']['mean'],
                xerr=row['passes']['std'], yerr=100 * row['test_acc']['std'],
                fmt='o', color=color, capsize=4, label=LABELS[method])
  finals = [100 * row['test_acc']['mean'] for row in rows.values()]
  spread = [100 * row['test_acc']['std'] for row in rows.values()]
  ax.set_ylim(min(finals) - 3 * max(spread) - 2, max(finals) + 3 * max(spread) + 1)
  ax.set_xlabel('gradient evaluations (forward-backward passes)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(textwrap.fill(title, 100), fontsize=7)
  ax.grid(alpha=0.3)
  ax.legend(title='final: mean ± std over seeds', fontsize=8, title_fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def machine() -> dict[str, Any]:
  """The machine and library versions, for the records of a run."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f
                 if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {
      'cpu': cpu, 'cores': os.cpu_count(), 'backend': jax.default_backend(),
      'device': str(jax.devices()[0].device_kind),
      'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__,
      'jaxlib': jaxlib.__version__, 'optax': optax.__version__,
      'flax': flax.__version__, 'python': platform.python_version(),
  }


def main(argv=None):
  """Runs the demo; returns the summary rows and per-run records."""
  args = parse_args(argv)
  dispatch = (rst_optax.recommended_dispatch() if args.dispatch == 'auto'
              else args.dispatch)
  os.makedirs(args.out, exist_ok=True)
  if args.compile_cache != 'none':
    jax.config.update('jax_compilation_cache_dir', args.compile_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  data = load_data(args.num_samples, args.val_size, args.out)
  if args.train_subset:
    data['x'], data['y'] = (data['x'][:args.train_subset],
                            data['y'][:args.train_subset])
  n_train = len(data['y'])
  print(f'MNIST-1D: {n_train} train / {len(data["y_val"])} validation / '
        f'{len(data["y_test"])} test; {args.seeds} seeds x {args.epochs} epochs; '
        f'methods {", ".join(LABELS[m] for m in args.methods)}; dispatch '
        f'{dispatch} on {jax.default_backend()}; load {os.getloadavg()[0]:.2f}')

  load_start = os.getloadavg()
  records = []
  # disable=None: no bar when the output is not a terminal (a log, CI).
  progress = tqdm(total=args.seeds * len(args.methods) * args.epochs,
                  unit='epoch', disable=True if args.no_progress else None)
  total_start = time.perf_counter()
  for seed in range(args.seeds):  # methods interleaved per seed: fair timing
    for method in args.methods:
      records.append(train_run(method, seed, data, args, dispatch, progress))
  progress.close()
  total_s = time.perf_counter() - total_start

  rows = summarize(records, args.methods)
  table = format_table(rows)
  steps = records[0]['steps']
  lam = next((r['lam'] for r in records if r['method'] == 'grst'), None)
  settings = (
      f'MNIST-1D ({n_train} train, {len(data["y_test"])} test), CNN width '
      f'{args.width}, batch {args.batch_size}, {args.epochs} epochs '
      f'({steps} steps), SGD momentum 0.9, cosine lr {args.lr}; rho '
      f'{args.rho}; RST/G-RST: {args.schedule} p(t) with mean p = {args.p}'
      + (f', G-RST lam = {lam:.3g}' if lam else '')
      + f'; {args.seeds} seeds; dispatch {dispatch}.')
  info = machine()
  load_end = os.getloadavg()
  footer = (f'Machine: {info["cpu"]}, {info["cores"]} cores, '
            f'{info["backend"]}, jax {info["jax"]}; load average (1 min) '
            f'{load_start[0]:.2f} at start, {load_end[0]:.2f} at end; '
            f'total {total_s:.0f} s. Wall-clock excludes compilation and '
            'evaluation. SGD = the base optimizer alone; SAM = rst at '
            'schedule=1, lam=1.')
  print()
  print(table)
  print()
  print(settings)
  print(footer)

  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(f'{table}\n\n{settings}\n{footer}\n')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'settings': vars(args) | {'dispatch': dispatch, 'steps': steps},
               'machine': info, 'load_average': {'start': load_start,
                                                 'end': load_end},
               'total_s': total_s, 'summary': rows, 'runs': records}, f,
              indent=1)
  png = os.path.join(args.out, 'mnist1d.png')
  plot(records, rows, png, settings)
  print(f'Wrote {args.out}/results.md, results.json and mnist1d.png.')
  return {'summary': rows, 'runs': records, 'table': table}


if __name__ == '__main__':
  main()
