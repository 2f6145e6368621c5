"""Label noise on MNIST-1D: how much of SAM's gain each way of spending a budget keeps.

A fraction of the training labels (``--noise``, 20% and 40% by default) is
replaced by labels drawn uniformly from the 10 classes (a new draw per seed;
it may hit the true class). The validation split, held out from the training
split, and the test split stay clean. Every run uses the demo's CNN and recipe
(``examples/mnist1d_demo.py``: SGD with momentum 0.9, cosine learning rate
0.1, batch 128, the same epochs) and, for a given seed, the same
initialization, data order and noisy labels.

Configurations (``--kinds``), at each mean probability ``--p`` of a SAM step:

- ``rst``: constant p, lam = 1 (plain RST);
- ``grst``: constant p, lam = ``schedules.matching_lam`` (1 / p);
- ``rst_rho``: constant p, lam = 1, rho scaled by 1 / p (SAM's strength
  matched through the radius instead of lam);
- ``linear``, ``trigonometric``: rising p(t) (``schedules.family``), lam = 1;
- ``late``: SGD, then SAM on the last p of the run (family ``piecewise``);
- ``early``: SAM on the first p of the run, then SGD;
- ``every_k_lam``: a SAM step every k = 1 / p steps, deterministic, lam = k
  (the scaling of init2winit's ``factor_sam``);
- ``every_k_rho``: the same steps, rho scaled by k (Composer's SAM).

Each perturbing configuration runs at every radius of ``--rhos`` (for the
scaled kinds the grid gives the SAM-equivalent radius, which is then scaled).
Each configuration's radius is chosen on the validation split (mean over
seeds, a diverged run counting at its own, near-chance, accuracy); test
accuracy is reported at that radius only. The headline is the fraction of
SAM's gain over SGD kept, ``(acc - acc_SGD) / (acc_SAM - acc_SGD)``, paired
per seed, against cost in gradient evaluations and wall-clock. A run whose
loss turns NaN or Inf (it stops there) or whose test accuracy ends at chance
level counts as diverged: it is reported, never averaged in.

Flatness at the end of training, for SGD, SAM and the best ``--flat-top``
RST-family configurations: the top Hessian eigenvalue of the training loss and
its epsilon-sharpness at SAM's chosen radius (``rst_optax.sharpness``), on the
first ``--flat-n`` training samples with the labels they were trained on.

The branch of every step is decided on the host with ``rst_optax.decisions``
(the coin of ``rst``) and passed to one jitted train step as a static
``take_sam``, where rho and lam are traced arguments: all runs of a process
share two executables.

Run (from the repository root):
  python -m benchmarks.label_noise [--workers 2]   the full benchmark
  python -m benchmarks.label_noise --quick          a plumbing check, seconds
Writes label_noise.json, label_noise.png and label_noise_flatness.png to
``--out`` and prints the tables for benchmarks/README.md.
"""

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import sys
import textwrap
import time
from typing import NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ('rst', 'grst', 'rst_rho', 'linear', 'trigonometric', 'late', 'early',
         'every_k_lam', 'every_k_rho')
KIND_LABELS = {
    'rst': 'RST', 'grst': 'G-RST', 'rst_rho': 'RST rho/p',
    'linear': 'RST linear', 'trigonometric': 'RST trigonometric',
    'late': 'RST late (SGD then SAM)', 'early': 'RST early (SAM then SGD)',
    'every_k_lam': 'every k, lam x k', 'every_k_rho': 'every k, rho x k',
}
DEFAULT_RHOS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)
CHANCE = 0.1  # 10 classes
CHANCE_MARGIN = 0.05  # test accuracy <= CHANCE + CHANCE_MARGIN: collapsed


class Config(NamedTuple):
  """One configuration: a way to spend the budget, without its radius."""
  name: str
  kind: str  # 'sgd', 'sam' or one of KINDS
  p: float  # nominal mean probability of a SAM step (SGD 0, SAM 1)
  rho_scale: float  # actual radius = grid radius x rho_scale
  k: int | None  # period of the every-k kinds


def floats(text):
  return tuple(float(v) for v in text.split(',') if v.strip())


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
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
  parser.add_argument('--kinds', default=','.join(KINDS),
                      help=f'configurations, from {",".join(KINDS)}')
  parser.add_argument('--baselines', action=argparse.BooleanOptionalAction,
                      default=True,
                      help='run SGD and SAM (--no-baselines: a part whose '
                      'runs are pooled with --from-json with one that has '
                      'them)')
  from examples import mnist1d_demo
  mnist1d_demo.add_recipe_arguments(parser)
  parser.add_argument('--flat-radius', type=float, default=0.2,
                      help='common radius of the epsilon-sharpness (it is '
                      "also measured at each run's own radius)")
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
  args = parser.parse_args(argv)
  if args.quick:
    args.seeds, args.epochs, args.num_samples, args.val_size = 2, 4, 500, 100
    args.batch_size, args.rhos, args.p, args.noise = 50, (0.05, 0.2), (0.5,), (
        0.2,)
    args.flat_n, args.flat_iters, args.flat_steps = 128, 3, 2
    if args.name == 'label_noise':
      args.name = 'label_noise_quick'
  args.kinds = tuple(k.strip() for k in args.kinds.split(',') if k.strip())
  for kind in args.kinds:
    if kind not in KINDS:
      parser.error(f'--kinds: unknown kind {kind!r}; choose from {KINDS}.')
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
  if any(k.startswith('every_k') for k in args.kinds):
    from rst_optax import schedules
    for p in args.p:
      try:  # the every-k kinds are schedules.periodic: p = 1/k
        schedules.family('periodic', p, total_steps=1)
      except ValueError as e:
        parser.error(f'--p {p}: {e} Drop the every-k kinds with --kinds.')
  return args


def make_configs(args) -> list[Config]:
  """SGD and SAM (with ``--baselines``), then every kind at every budget."""
  out = [Config('SGD', 'sgd', 0.0, 0.0, None),
         Config('SAM', 'sam', 1.0, 1.0, None)] if args.baselines else []
  for p in args.p:
    k = round(1.0 / p)
    for kind in args.kinds:
      scale = {'rst_rho': 1.0 / p, 'every_k_rho': float(k)}.get(kind, 1.0)
      out.append(Config(f'{KIND_LABELS[kind]} p={p:g}', kind, p, scale,
                        k if kind.startswith('every_k') else None))
  return out


def schedule_of(config: Config, total_steps: int):
  """p(t) of ``config`` (a float or an optax.Schedule) and a hashable key."""
  from rst_optax import schedules
  p, kind = config.p, config.kind
  if kind == 'sgd':
    return 0.0, ('sgd',)
  if kind == 'sam':
    return 1.0, ('sam',)
  if kind in ('rst', 'grst', 'rst_rho'):
    return schedules.family('constant', p, total_steps), ('constant', p)
  if kind in ('linear', 'trigonometric'):
    return schedules.family(kind, p, total_steps), (kind, p)
  if kind == 'late':
    return schedules.family('piecewise', p, total_steps), ('late', p)
  if kind == 'early':
    return schedules.piecewise(1.0, 0.0, round(p * total_steps)), ('early', p)
  return schedules.periodic(config.k), ('every', config.k)


def lam_of(config: Config, schedule, total_steps: int) -> float:
  from rst_optax import schedules
  if config.kind == 'grst':
    return schedules.matching_lam(schedule, total_steps)
  if config.kind == 'every_k_lam':
    return float(config.k)
  return 1.0


def corrupt_labels(y, fraction, seed):
  """Replaces ``fraction`` of the labels by uniform draws over the 10 classes.

  Returns the noisy labels and the mask of the replaced positions (a replaced
  label may equal the true one, with probability 1/10).
  """
  rng = np.random.default_rng([seed, 12345])
  n = len(y)
  replaced = np.zeros(n, bool)
  replaced[rng.choice(n, round(fraction * n), replace=False)] = True
  noisy = np.where(replaced, rng.integers(0, 10, n), y).astype(y.dtype)
  return noisy, replaced


@functools.cache
def build_trainer(graphdef, total_steps, lr):
  """The jitted train step and evaluation, shared by every run of a process.

  Cached: the jobs of a process with the same model, length and learning rate
  reuse the compiled executables.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import rst_optax

  base = optax.sgd(optax.cosine_decay_schedule(lr, total_steps), momentum=0.9)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def make_tx(schedule, rho, lam, seed):
    return rst_optax.rst(base, schedule, rho=rho, lam=lam, seed=seed)

  @functools.partial(jax.jit, static_argnames='take_sam')
  def train_step(params, opt_state, rho, lam, x, y, idx, take_sam):
    xb, yb = x[idx], y[idx]
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    # The branch is the static take_sam, decided on the host from the run's
    # schedule and seed, so the schedule given here is never drawn; rho and
    # lam are traced, so every run shares this step's two executables.
    tx = make_tx(1.0, rho, lam, 0)
    updates, opt_state = tx.update(
        grads, opt_state, params, take_sam=take_sam,
        grad_fn=lambda w: jax.grad(loss_fn)(w, xb, yb))
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jnp.mean(jnp.argmax(logits, -1) == y), loss

  return make_tx, train_step, evaluate, loss_fn


def run_status(train_loss, test_acc):
  """'nan' for a non-finite loss, 'chance' for a collapse, else 'ok'."""
  if not np.isfinite(train_loss):
    return 'nan'
  if not test_acc > CHANCE + CHANCE_MARGIN:
    return 'chance'
  return 'ok'


def train_one(trainer, params0, data, y_train, schedule, rho, lam, seed,
              orders, total_steps):
  """One run; returns its record and final parameters (None if diverged)."""
  import jax
  import jax.numpy as jnp

  import rst_optax
  make_tx, train_step, evaluate, _ = trainer
  tx = make_tx(schedule, rho, lam, seed)
  opt_state = tx.init(params0)
  plan = rst_optax.decisions(schedule, seed, 0, total_steps)
  x, y = jnp.asarray(data['x']), jnp.asarray(y_train)
  rho_a, lam_a = np.float32(rho), np.float32(lam)
  params, t, wall, status = params0, 0, 0.0, 'ok'
  for order in orders:
    start = time.perf_counter()
    for idx in order:
      params, opt_state, loss = train_step(params, opt_state, rho_a, lam_a, x,
                                           y, idx, take_sam=bool(plan[t]))
      t += 1
    loss = float(loss)  # waits for the epoch
    wall += time.perf_counter() - start
    if not np.isfinite(loss):
      status = 'nan'
      break
  record = {'steps': t, 'sam_steps': int(plan[:t].sum()), 'wall_s': wall,
            # the run's cost as planned (a diverged run stops early)
            'passes': total_steps + int(plan.sum())}
  if status == 'ok':
    count, sam_steps = int(opt_state.count), int(opt_state.sam_steps)
    if count != total_steps or sam_steps != int(plan.sum()):
      raise RuntimeError(f'RSTState count {count}, sam_steps {sam_steps}; '
                         f'expected {total_steps}, {int(plan.sum())}.')
    acc = {}
    for split, (xs, ys) in {
        'test': (data['x_test'], data['y_test']),
        'val': (data['x_val'], data['y_val']),
        'train_noisy': (data['x'], y_train),
        'train_clean': (data['x'], data['y'])}.items():
      a, loss_s = evaluate(params, jnp.asarray(xs), jnp.asarray(ys))
      acc[f'{split}_acc'], acc[f'{split}_loss'] = float(a), float(loss_s)
    record.update(acc)
    status = run_status(acc['train_noisy_loss'], acc['test_acc'])
  if status == 'nan':
    record.update(test_acc=float('nan'), val_acc=float('nan'))
  record['status'] = status
  final = ([np.asarray(v) for v in jax.tree.leaves(params)]
           if status != 'nan' else None)
  return record, final


def warm_up(trainer, params0, data, y_train, batch):
  """Compiles both branches of the train step outside the timed loops."""
  import jax
  make_tx, train_step, evaluate, _ = trainer
  opt_state = make_tx(0.5, 0.05, 1.0, 0).init(params0)
  idx = np.arange(batch, dtype=np.int32)
  for take_sam in (False, True):
    jax.block_until_ready(train_step(
        params0, opt_state, np.float32(0.05), np.float32(1.0),
        jax.numpy.asarray(data['x']), jax.numpy.asarray(y_train), idx,
        take_sam=take_sam))


def run_job(args, noise, seed):
  """Every configuration and radius for one (noise, seed); records, params."""
  import jax
  from flax import nnx

  from examples import mnist1d_demo as demo
  data = demo.load_data(args.num_samples, args.val_size, args.cache)
  n_train, batch = len(data['y']), args.batch_size
  if n_train < batch:
    raise ValueError(f'{n_train} training samples < --batch-size {batch}.')
  steps_per_epoch = n_train // batch
  total_steps = steps_per_epoch * args.epochs
  y_train, replaced = corrupt_labels(data['y'], noise, seed)
  model = demo.CNN(args.width, data['x'].shape[1], nnx.Rngs(seed))
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = jax.tree.map(jax.numpy.asarray, params0)
  trainer = build_trainer(graphdef, total_steps, args.lr)
  warm_up(trainer, params0, data, y_train, batch)
  rng = np.random.default_rng(seed)  # the data order of every run
  orders = [rng.permutation(n_train)[:steps_per_epoch * batch].reshape(
      steps_per_epoch, batch).astype(np.int32) for _ in range(args.epochs)]
  done, records, finals = {}, [], {}
  for config in make_configs(args):
    schedule, key = schedule_of(config, total_steps)
    lam = lam_of(config, schedule, total_steps)
    grid = (0.0,) if config.kind == 'sgd' else args.rhos
    for rho_grid in grid:
      rho = rho_grid * config.rho_scale
      run_key = (key, round(rho, 9), round(lam, 9))
      if run_key not in done:  # e.g. RST rho/p at one grid point = RST at 2x
        done[run_key] = train_one(trainer, params0, data, y_train, schedule,
                                  rho, lam, seed, orders, total_steps)
      record, final = done[run_key]
      records.append(dict(record) | {
          'config': config.name, 'kind': config.kind, 'p': config.p,
          'rho_grid': rho_grid, 'rho': rho, 'lam': lam, 'seed': seed,
          'noise': noise, 'noise_replaced': float(replaced.mean()),
          'noise_changed': float((y_train != data['y']).mean())})
      finals[(config.name, rho_grid)] = final
  return records, finals, {'total_steps': total_steps, 'n_train': n_train,
                           'n_val': len(data['y_val']),
                           'n_test': len(data['y_test'])}


@functools.cache
def _flatness_fn(width, length, flat_iters, flat_steps):
  """The jitted flatness measures for one model shape, compiled once."""
  import jax
  from flax import nnx

  from examples import mnist1d_demo as demo
  from rst_optax import sharpness
  graphdef, template = nnx.split(demo.CNN(width, length, nnx.Rngs(0)),
                                 nnx.Param)
  _, _, _, loss_fn = build_trainer(graphdef, 1, 0.1)

  def loss_at(leaves, x, y):
    params = jax.tree.unflatten(jax.tree.structure(template), leaves)
    return (lambda w: loss_fn(w, x, y)), params

  @jax.jit
  def top_eigenvalue(leaves, x, y, key):
    loss, params = loss_at(leaves, x, y)
    lam, _ = sharpness.top_hessian_eigenvalue(
        loss, params, num_iters=flat_iters, error_tolerance=1e-4, key=key)
    return lam, loss(params)

  @jax.jit
  def eps_sharpness(leaves, x, y, radius):
    loss, params = loss_at(leaves, x, y)
    return sharpness.epsilon_sharpness(loss, params, radius,
                                       num_steps=flat_steps)

  return top_eigenvalue, eps_sharpness


def flatness(args, noise, seed, params_by_config, own_rho):
  """Top Hessian eigenvalue and epsilon-sharpness of each final model.

  On the first ``--flat-n`` training samples, with the labels trained on.
  The epsilon-sharpness is measured at the common ``--flat-radius`` and at
  the radius each run was trained at (``own_rho[name]``; none for SGD).
  """
  import jax
  import jax.numpy as jnp

  from examples import mnist1d_demo as demo
  data = demo.load_data(args.num_samples, args.val_size, args.cache)
  y_train, _ = corrupt_labels(data['y'], noise, seed)
  top_eigenvalue, eps_sharpness = _flatness_fn(
      args.width, data['x'].shape[1], args.flat_iters, args.flat_steps)
  x = jnp.asarray(data['x'][:args.flat_n])
  y = jnp.asarray(y_train[:args.flat_n])
  out = {}
  for name, leaves in params_by_config.items():
    if leaves is None:
      continue
    leaves = [jnp.asarray(v) for v in leaves]
    lam, loss = top_eigenvalue(leaves, x, y, jax.random.key(seed))
    out[name] = {'lambda_max': float(lam), 'train_loss': float(loss),
                 'eps_sharpness': float(eps_sharpness(
                     leaves, x, y, np.float32(args.flat_radius)))}
    if own_rho.get(name):
      out[name]['eps_sharpness_own'] = float(eps_sharpness(
          leaves, x, y, np.float32(own_rho[name])))
  return out


# ----------------------------------------------------------------- summaries


def stats(values):
  v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
  if not len(v):
    return {'mean': float('nan'), 'std': float('nan'), 'sem': float('nan'),
            'n': 0}
  std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  return {'mean': float(v.mean()), 'std': std, 'sem': std / np.sqrt(len(v)),
          'n': len(v)}


def selection_score(record):
  """Validation accuracy for choosing rho; a NaN run counts at chance."""
  v = record['val_acc']
  return CHANCE if not np.isfinite(v) else v


def choose_rho(records):
  """{(noise, config): rho_grid} maximizing mean validation accuracy."""
  chosen = {}
  for (noise, config) in dict.fromkeys((r['noise'], r['config'])
                                       for r in records):
    runs = [r for r in records if r['noise'] == noise
            and r['config'] == config]
    grid = sorted({r['rho_grid'] for r in runs})
    score = {g: np.mean([selection_score(r) for r in runs
                         if r['rho_grid'] == g]) for g in grid}
    chosen[(noise, config)] = max(grid, key=lambda g: (score[g], -g))
  return chosen


def gain_kept(acc, sgd, sam, n_boot=2000, seed=0):
  """Fraction of SAM's gain kept, paired per seed, with a bootstrap s.e.

  ``acc``, ``sgd``, ``sam``: test accuracies per seed, aligned (NaN: a
  diverged run, whose seed is then left out). The s.e. is half the central
  68% interval of the bootstrap (robust to resamples whose denominator is
  small). Where SAM's own paired gain over SGD is under three standard
  errors (the clean regime), that denominator may be near zero in a
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
  rng = np.random.default_rng(seed)
  boot = []
  for _ in range(n_boot):
    i = rng.integers(0, len(a), len(a))
    den = np.mean(c[i] - b[i])
    if den != 0:
      boot.append(np.mean(a[i] - b[i]) / den)
  sem = (float(np.diff(np.percentile(boot, [16, 84]))[0] / 2)
         if len(boot) > 1 and len(a) > 1 else 0.0)
  return {'mean': value, 'sem': sem, 'n': int(len(a))}


def _at_choice(chosen, noise, recs, seeds, config):
  """The chosen grid radius of ``config`` and its run per seed."""
  g = chosen[(noise, config)]
  runs = {r['seed']: r for r in recs if r['config'] == config
          and r['rho_grid'] == g}
  return g, [runs[s] for s in seeds]


def test_of(runs):
  """Test accuracy per run, NaN for a diverged one."""
  return [r['test_acc'] if r['status'] == 'ok' else float('nan')
          for r in runs]


def summarize(records):
  """Per noise level: the sweep, the chosen radius and the headline rows."""
  chosen = choose_rho(records)
  out = {}
  for noise in sorted({r['noise'] for r in records}):
    recs = [r for r in records if r['noise'] == noise]
    configs = list(dict.fromkeys(r['config'] for r in recs))
    seeds = sorted({r['seed'] for r in recs})
    sweep = []
    for config in configs:
      for g in sorted({r['rho_grid'] for r in recs if r['config'] == config}):
        runs = [r for r in recs if r['config'] == config
                and r['rho_grid'] == g]
        sweep.append({
            'config': config, 'rho_grid': g, 'rho': runs[0]['rho'],
            'lam': runs[0]['lam'],
            'val_acc': stats([r['val_acc'] for r in runs if r['status'] ==
                              'ok']),
            'test_acc': stats([r['test_acc'] for r in runs if r['status'] ==
                               'ok']),
            'diverged': sum(r['status'] != 'ok' for r in runs),
            'runs': len(runs)})

    at_choice = functools.partial(_at_choice, chosen, noise, recs, seeds)
    _, sgd_runs = at_choice('SGD') if 'SGD' in configs else (None, None)
    _, sam_runs = at_choice('SAM') if 'SAM' in configs else (None, None)
    rows, tests = {}, {}
    for config in configs:
      g, runs = at_choice(config)
      row = {'config': config, 'kind': runs[0]['kind'], 'p': runs[0]['p'],
             'rho_grid': g, 'rho': runs[0]['rho'], 'lam': runs[0]['lam'],
             'test_acc': stats(test_of(runs)),
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


def pct(s, sem=True):
  if not s['n']:
    return '–'
  return (f'{100 * s["mean"]:.2f} ± {100 * (s["sem"] if sem else s["std"]):.2f}')


def format_tables(summary):
  """Markdown: headline rows per noise level, then the stability of the sweep."""
  parts = []
  for block in summary.values():
    rows = block['rows']
    sam = rows.get('SAM')
    lines = [
        f'**{100 * block["noise"]:g}% noisy labels**, {len(block["seeds"])} '
        'seeds; rho chosen on validation.', '',
        '| configuration | rho (lam) | test acc. % ± s.e. | Δ vs SAM pp | '
        'Δ vs constant p pp | SAM gain kept ± s.e. | × SAM passes | × SAM '
        'time | diverged at ρ / in sweep |', '|---|---|---|---|---|---|---|'
        '---|---|']
    for name, row in rows.items():
      rho = '–' if row['kind'] == 'sgd' else f'{row["rho"]:.3g}'
      if row['lam'] != 1.0:
        rho += f' ({row["lam"]:.3g})'
      kept = row.get('gain_kept')
      kept_s = (f'{kept["mean"]:.2f} ± {kept["sem"]:.2f}'
                if kept and np.isfinite(kept['mean']) else '–')
      if kept and kept.get('weak'):
        kept_s = f'{kept["mean"]:.2f} (SAM gain < 3 s.e.)'
      diff = row.get('diff_vs_SAM')
      diff_s = (f'{100 * diff["mean"]:+.2f} ± {100 * diff["sem"]:.2f}'
                if diff and diff['n'] and name != 'SAM' else '–')
      const = row.get('diff_vs_constant')
      const_s = (f'{100 * const["mean"]:+.2f} ± {100 * const["sem"]:.2f}'
                 if const and const['n'] else '–')
      lines.append(
          f'| {name} | {rho} | {pct(row["test_acc"])} | {diff_s} | {const_s} '
          f'| {kept_s} '
          f'| {row.get("passes_vs_SAM", float("nan")):.3f} '
          f'| {row.get("wall_vs_SAM", float("nan")):.2f} '
          f'| {row["diverged"]} / {row["diverged_in_sweep"]} |')
    if sam:
      goal = [
          name for name, row in rows.items()
          if name not in ('SAM', 'SGD') and row['diverged'] == 0
          and row['passes_vs_SAM'] <= 0.6 + 1e-9
          and row['test_acc']['mean'] >= sam['test_acc']['mean']
          - sam['test_acc']['sem']]
      lines += ['', '- SAM-level test accuracy (≥ SAM − 1 s.e.) at ≤ 0.6× '
                "SAM's passes: " + (', '.join(goal) if goal else 'none.')]
    parts.append('\n'.join(lines))
  return '\n\n'.join(parts)


def format_sweep(summary):
  """Markdown: test accuracy (diverged seeds) at every radius of the grid."""
  parts = []
  for block in summary.values():
    grid = sorted({s['rho_grid'] for s in block['sweep']
                   if s['config'] != 'SGD'})
    lines = [f'**{100 * block["noise"]:g}% noisy labels**: test acc. % at each '
             'grid radius (val. acc. in brackets; ✗n = n diverged seeds)', '',
             '| configuration | ' + ' | '.join(f'{g:g}' for g in grid) + ' |',
             '|---|' + '---|' * len(grid)]
    for config in dict.fromkeys(s['config'] for s in block['sweep']):
      if config == 'SGD':
        continue
      cells = []
      for g in grid:
        s = next((s for s in block['sweep'] if s['config'] == config
                  and s['rho_grid'] == g), None)
        if s is None:
          cells.append('')
          continue
        cell = (f'{100 * s["test_acc"]["mean"]:.1f} '
                f'({100 * s["val_acc"]["mean"]:.1f})'
                if s['test_acc']['n'] else '–')
        if s['diverged']:
          cell += f' ✗{s["diverged"]}'
        cells.append(cell)
      lines.append(f'| {config} | ' + ' | '.join(cells) + ' |')
    parts.append('\n'.join(lines))
  return '\n\n'.join(parts)


def stability(summary):
  """{config: {noise: (largest stable grid radius, first unstable, n)}}.

  Stable: no seed diverged at that radius. ``first unstable`` is the smallest
  grid radius where some seed diverged (None if none did) and ``n`` how many
  seeds did there.
  """
  out = {}
  for key, block in summary.items():
    for s in block['sweep']:
      if s['config'] == 'SGD':
        continue
      out.setdefault(s['config'], {}).setdefault(key, []).append(s)
  table = {}
  for config, by_noise in out.items():
    for key, sweep in by_noise.items():
      sweep = sorted(sweep, key=lambda s: s['rho_grid'])
      bad = [s for s in sweep if s['diverged']]
      first = bad[0] if bad else None
      below = [s['rho_grid'] for s in sweep
               if first is None or s['rho_grid'] < first['rho_grid']]
      table.setdefault(config, {})[key] = (
          max(below) if below else None,
          first['rho_grid'] if first else None,
          f'{first["diverged"]}/{first["runs"]}' if first else '')
  return table


def format_stability(summary):
  """Markdown: per configuration (with its lam), where divergence starts."""
  keys = list(summary)
  table = stability(summary)
  lines = ['| configuration | λ | ' + ' | '.join(
      f'{100 * summary[k]["noise"]:g}% noise' for k in keys) + ' |',
           '|---|---|' + '---|' * len(keys)]
  lams = {s['config']: s['lam'] for b in summary.values() for s in b['sweep']}
  for config, by_noise in table.items():
    cells = []
    for k in keys:
      if k not in by_noise:
        cells.append('')
        continue
      ok, first, n = by_noise[k]
      cells.append((f'stable to {ok:g}' if ok is not None else 'none stable')
                   + (f'; diverged from {first:g} ({n})' if first is not None
                      else '; none diverged'))
    lines.append(f'| {config} | {lams[config]:.3g} | ' + ' | '.join(cells)
                 + ' |')
  return '\n'.join(lines)


def format_flatness(flat):
  """Markdown: flatness per noise level and configuration, mean ± s.e."""
  if not flat:
    return ''
  def mean_sem(s):
    return f'{s["mean"]:.3g} ± {s["sem"]:.2g}' if s.get('n') else '–'

  lines = ['| noise | configuration | trained at ρ | λ_max ± s.e. | '
           'ε-sharpness at the common radius ± s.e. | ε-sharpness at the '
           "run's ρ ± s.e. | train loss (flatness subset) | test acc. % ± "
           's.e. |', '|---|---|---|---|---|---|---|---|']
  for noise, block in sorted(flat.items(), key=lambda kv: float(kv[0])):
    for name, row in block['configs'].items():
      lines.append(
          f'| {100 * float(noise):g}% | {name} | '
          f'{format(row["rho"], ".3g") if row.get("rho") else "–"} | '
          f'{mean_sem(row["lambda_max"])} | '
          f'{mean_sem(row["eps_sharpness"])} (at {block["radius"]:g}) | '
          f'{mean_sem(row.get("eps_sharpness_own", {}))} | '
          f'{row["train_loss"]["mean"]:.3g} | {pct(row["test_acc"])} |')
  return '\n'.join(lines)


def plot(summary, flat, path, flat_path, title):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  markers = {'sgd': 'o', 'sam': '*', 'rst': 'o', 'grst': 's', 'rst_rho': 'P',
             'linear': '^', 'trigonometric': 'v', 'late': '>', 'early': '<',
             'every_k_lam': 'D', 'every_k_rho': 'd'}
  blocks = list(summary.values())
  fig, axes = plt.subplots(2, len(blocks), figsize=(6.5 * len(blocks), 9),
                           dpi=110, squeeze=False)
  for col, block in enumerate(blocks):
    ax = axes[0, col]
    ps = sorted({row['p'] for row in block['rows'].values()
                 if row['kind'] not in ('sgd', 'sam')})
    colors = {p: f'C{i + 2}' for i, p in enumerate(ps)}
    # Where SAM's gain over SGD is under 3 s.e., a fraction of it means
    # little: plot the paired difference to SAM in points instead.
    weak = any(r.get('gain_kept', {}).get('weak')
               for r in block['rows'].values())
    for name, row in block['rows'].items():
      kept = row.get('gain_kept')
      if not kept or not np.isfinite(kept['mean']):
        continue
      if weak:
        diff = row['diff_vs_SAM']
        y, err = 100 * diff['mean'], 100 * diff['sem']
      else:
        y, err = kept['mean'], kept['sem']
      color = {'sgd': 'C0', 'sam': 'C1'}.get(row['kind'],
                                             colors.get(row['p']))
      ax.errorbar(row['passes_vs_SAM'], y, yerr=err,
                  fmt=markers[row['kind']], color=color, capsize=2,
                  label=name, alpha=0.85)
    if weak:
      ax.axhline(0.0, color='C1', lw=0.8, ls='--')
      ax.set_ylabel("test accuracy − SAM's, points (paired ± s.e.)")
    else:
      ax.axhline(1.0, color='C1', lw=0.8, ls='--')
      ax.axhline(0.0, color='C0', lw=0.8, ls='--')
      ax.set_ylabel("fraction of SAM's gain over SGD kept (± s.e.)")
    ax.set_xlabel('gradient evaluations, × SAM')
    ax.set_title(f'{100 * block["noise"]:g}% noisy labels', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1, col]
    for i, config in enumerate(dict.fromkeys(s['config']
                                             for s in block['sweep'])):
      pts = [s for s in block['sweep'] if s['config'] == config]
      if config == 'SGD':
        ax.axhline(100 * pts[0]['test_acc']['mean'], color='C0', lw=1,
                   label='SGD')
        continue
      g = [s['rho_grid'] for s in pts]
      acc = [100 * s['test_acc']['mean'] if s['test_acc']['n'] else np.nan
             for s in pts]
      ax.plot(g, acc, marker='o', ms=3, lw=1.4 if config == 'SAM' else 0.8,
              color='C1' if config == 'SAM' else f'C{i % 10}', label=config)
    ax.set_xscale('log')
    ax.set_xticks(sorted({s['rho_grid'] for s in block['sweep']
                          if s['config'] != 'SGD'}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel('ρ (grid value; SAM-equivalent for scaled kinds)')
    ax.set_ylabel('test accuracy (%), mean over non-diverged seeds')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5, ncol=2)
  fig.suptitle(textwrap.fill(title, 95 * len(blocks)), fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)

  if not flat:
    return
  fig, axes = plt.subplots(1, len(flat), figsize=(5.5 * len(flat), 4.2),
                           dpi=110, squeeze=False)
  for ax, (noise, block) in zip(axes[0], flat.items(), strict=True):
    for i, (name, row) in enumerate(block['configs'].items()):
      rho = f' (trained at ρ {row["rho"]:g})' if row.get('rho') else ''
      ax.errorbar(row['lambda_max']['mean'], 100 * row['test_acc']['mean'],
                  xerr=row['lambda_max']['sem'],
                  yerr=100 * row['test_acc']['sem'], fmt='o', color=f'C{i}',
                  capsize=3, label=name + rho)
    ax.set_xscale('log')
    ax.set_xlabel('top Hessian eigenvalue of the training loss (log)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'{100 * float(noise):g}% noisy labels; mean ± s.e. over '
                 'seeds', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(flat_path)
  plt.close(fig)


def flat_targets(block, top):
  """SGD, SAM and the ``top`` RST-family configurations by validation."""
  rows = block['rows']
  family = sorted((r for r in rows.values() if r['kind'] not in ('sgd', 'sam')
                   and r['diverged'] == 0),
                  key=lambda r: -r['val_acc']['mean'])
  return [n for n in ('SGD', 'SAM') if n in rows] + [r['config']
                                                     for r in family[:top]]


def title_of(settings):
  return (
      f'MNIST-1D ({settings["n_train"]} train incl. noisy labels, '
      f'{settings["n_val"]} clean val., {settings["n_test"]} clean test), 1-D '
      f'CNN width {settings["width"]}, SGD momentum 0.9, cosine lr '
      f'{settings["lr"]}, batch {settings["batch_size"]}, {settings["epochs"]} '
      f'epochs ({settings["total_steps"]} steps), {settings["seeds"]} seeds, '
      f'rho grid {settings["rhos"]}, mean p {settings["p"]}')


def report(result, out, name):
  summary, flat = result['summary'], result.get('flatness', {})
  plot(summary, flat, os.path.join(out, f'{name}.png'),
       os.path.join(out, f'{name}_flatness.png'), title_of(result['settings']))
  machine, load = result['machine'], result['load_average']
  print('\n' + format_tables(summary) + '\n')
  print(format_sweep(summary) + '\n')
  print('Stability (grid radii; SAM-equivalent for the scaled kinds):\n\n'
        + format_stability(summary) + '\n')
  print(format_flatness(flat) + '\n')
  if result.get('flatness_note'):
    print(f'Flatness: {result["flatness_note"]}.')
  print(f'Machine: {machine["cpu"]}, {machine["cores"]} cores, jax '
        f'{machine["jax"]}; load average (1 min) {load["start"][0]:.2f} at '
        f'start, {load["end"][0]:.2f} at end; {result["elapsed_s"] / 60:.1f} '
        f'min in all with {result["settings"]["workers"]} worker(s).')
  for part in result.get('parts', []):
    print(f'  part {part["file"]}: {part["elapsed_s"] / 60:.1f} min, load '
          f'{part["load_average"]["start"][0]:.2f} -> '
          f'{part["load_average"]["end"][0]:.2f}: {part["command"]}')
  print(f'Command: {result["settings"]["command"]}')


def merge_results(paths):
  """One result from saved JSONs: parts with other radii, budgets or kinds.

  The parts must share the recipe and the seeds. Their runs are pooled (a run
  already present, same noise, seed, configuration and radius, is kept from
  the first file) and summarized again, so each configuration's radius is
  chosen on validation over its pooled grid. Flatness is pooled per noise
  level and configuration (first file first); each part measured it at the
  radius it had chosen, which the rows record.
  """
  results = []
  for path in paths:
    with open(path) as f:
      results.append(json.load(f))
  if len(results) == 1:  # summarized again, by this version of the script
    return results[0] | {'summary': summarize(results[0]['runs'])}
  first = results[0]
  keep = ('seeds', 'epochs', 'lr', 'batch_size', 'width', 'num_samples',
          'val_size', 'total_steps', 'flat_n', 'flat_iters', 'flat_steps',
          'flat_radius')
  seen, runs, flat = set(), [], {}
  for path, result in zip(paths, results, strict=True):
    for k in keep:
      if result['settings'].get(k) != first['settings'].get(k):
        raise ValueError(f'--from-json: {k} differs between the files: '
                         f'{first["settings"].get(k)} and '
                         f'{result["settings"].get(k)} ({path}).')
    for r in result['runs']:
      key = (r['noise'], r['seed'], r['config'], r['rho_grid'])
      if key not in seen:
        seen.add(key)
        runs.append(r)
    for noise, block in result.get('flatness', {}).items():
      into = flat.setdefault(noise, {'radius': block['radius'],
                                     'configs': {}, 'per_seed': {}})
      for name, row in block['configs'].items():
        if name not in into['configs']:
          into['configs'][name] = dict(row) | {'measured_in': path}
          for seed, values in block['per_seed'].items():
            if name in values:
              into['per_seed'].setdefault(seed, {})[name] = values[name]

  def union(name):
    values = set()
    for result in results:
      v = result['settings'].get(name, [])
      values |= set(v if isinstance(v, list) else [v])
    return sorted(values)

  merged = dict(first)
  merged['settings'] = dict(first['settings']) | {
      'noise': union('noise'), 'p': union('p'), 'kinds': union('kinds'),
      'rhos': sorted({r['rho_grid'] for r in runs if r['kind'] != 'sgd'}),
      'command': ' + '.join(r['settings']['command'] for r in results),
      'merged_from': list(paths)}
  merged['parts'] = [{'file': path, 'command': r['settings']['command'],
                      'elapsed_s': r['elapsed_s'],
                      'load_average': r['load_average']}
                     for path, r in zip(paths, results, strict=True)]
  merged['runs'] = runs
  merged['summary'] = summarize(runs)
  merged['flatness'] = flat
  merged['elapsed_s'] = sum(r['elapsed_s'] for r in results)
  merged['load_average'] = {'start': first['load_average']['start'],
                            'end': results[-1]['load_average']['end']}
  merged['flatness_note'] = (
      'flatness is measured by each part at the radius that part chose; '
      'the rows give it')
  return merged


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.from_json:
    result = merge_results(args.from_json.split(','))
    report(result, args.out, args.name)
    if ',' in args.from_json:
      with open(os.path.join(args.out, f'{args.name}.json'), 'w') as f:
        json.dump(result, f, indent=1, default=float)
    return result

  from examples import mnist1d_demo as demo
  demo.load_data(args.num_samples, args.val_size, args.cache)  # cache it once
  jobs = [(noise, seed) for seed in range(args.seeds) for noise in args.noise]
  print(f'{len(jobs)} jobs (noise x seed), {len(make_configs(args))} '
        f'configurations x {len(args.rhos)} radii each; {args.workers} '
        f'worker(s); load {os.getloadavg()[0]:.2f}', flush=True)
  load_start, start = os.getloadavg(), time.perf_counter()
  records, finals, info = [], {}, None
  if args.workers == 1:
    results = (run_job(args, noise, seed) for noise, seed in jobs)
  else:
    pool = concurrent.futures.ProcessPoolExecutor(
        args.workers, mp_context=multiprocessing.get_context('spawn'))
    results = pool.map(run_job, [args] * len(jobs), *zip(*jobs, strict=True))
  for (noise, seed), (recs, fin, job_info) in zip(jobs, results, strict=True):
    records += recs
    info = job_info
    for (config, g), params in fin.items():
      finals[(noise, seed, config, g)] = params
    with open(os.path.join(args.out, f'{args.name}.partial.json'), 'w') as f:
      json.dump({'settings': vars(args), 'runs': records}, f, default=float)
    print(f'  noise {noise:g} seed {seed}: done at '
          f'{(time.perf_counter() - start) / 60:.1f} min, load '
          f'{os.getloadavg()[0]:.2f}', flush=True)
  if args.workers > 1:
    pool.shutdown()
  train_s = time.perf_counter() - start
  summary = summarize(records)

  flat = {}
  for key, block in summary.items():
    noise = block['noise']
    names = flat_targets(block, args.flat_top)
    own = {n: block['rows'][n]['rho'] for n in names}
    per_seed = {}
    for seed in block['seeds']:
      params = {n: finals[(noise, seed, n, block['rows'][n]['rho_grid'])]
                for n in names}
      per_seed[seed] = flatness(args, noise, seed, params, own)
    configs = {}
    for n in names:
      vals = [per_seed[s][n] for s in block['seeds'] if n in per_seed[s]]
      configs[n] = {m: stats([v.get(m, np.nan) for v in vals]) for m in (
          'lambda_max', 'eps_sharpness', 'eps_sharpness_own', 'train_loss')}
      configs[n]['test_acc'] = block['rows'][n]['test_acc']
      configs[n]['rho'] = block['rows'][n]['rho']
    flat[key] = {'radius': args.flat_radius, 'configs': configs,
                 'per_seed': {str(s): v for s, v in per_seed.items()}}
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
  os.remove(os.path.join(args.out, f'{args.name}.partial.json'))
  report(result, args.out, args.name)
  return result


if __name__ == '__main__':
  main()
