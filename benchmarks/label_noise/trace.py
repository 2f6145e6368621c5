"""Traces of LookSAM's first steps: why a run collapses to a constant output.

Reruns one (noise, seed) job of the label-noise benchmark exactly as
``train.run_job`` trains it (the same labels, initialization, data order and
jitted train step, so the trajectory is the benchmark's, bit for bit) for
the first ``--steps`` steps, at ``schedules.periodic(k)`` with
``reuse=alpha`` (optionally warmed up: alpha, or alpha and rho, rise
linearly from 0 over ``--warmup`` steps), and records per step:

- ``loss``: the minibatch loss; ``loss_fixed``: the loss on a fixed batch;
- ``g_norm``: the gradient's norm; ``reused_norm``: that of the reused term
  :math:`\\alpha\\|g\\|u` the base step adds (0 on SAM steps and before the
  first); ``update_norm``: the norm of the parameter update; ``lr``;
- ``momentum_norm``: the norm of the momentum buffer :math:`m_t` (read off
  the update, :math:`m_t = -\\Delta w_t / \\eta_t`); ``reused_momentum_norm``:
  that of a twin buffer fed the reused terms alone,
  :math:`r_t = \\alpha_t\\|g_t\\|u + 0.9\\, r_{t-1}`: the part of the momentum
  the reused terms accumulated (SGD's momentum is linear in its inputs);
  ``reused_momentum_cos``: the cosine between the two;
- ``age``: steps since the last SAM step; ``cos_u_g``: the cosine between the
  stored direction :math:`u` and the current gradient;
- ``dead_units``, ``dead_channels``: per ReLU layer, the fraction of units
  (channel x position) and of channels whose pre-activation is <= 0 on every
  sample of the fixed batch.

Run (from the repository root), e.g.
  python -m benchmarks.label_noise.trace --seed 3 --noise 0.4 --steps 300
  python -m benchmarks.label_noise.trace --seed 3 --warmup 135 --tag warm
  python -m benchmarks.label_noise.trace --seed 3 --warmup 135 --rho-warmup
Several ``--seed`` values (comma-separated) are traced in turn; the JSON and
a PNG figure go to ``--out`` as ``{--name}.json`` / ``.png``.
"""

import argparse
import json
import math
import os
import time

import numpy as np

from benchmarks.label_noise import cli, kinds, train


def parse_args(argv=None):
  """The flags: the job, the LookSAM setting and the trace's length."""
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.label_noise.trace',
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--seed', default='0',
                      help='seeds, comma-separated, traced in turn')
  parser.add_argument('--noise', type=float, default=0.4)
  parser.add_argument('--epochs', type=int, default=100,
                      help='length of the cosine schedule (as the benchmark)')
  parser.add_argument('--steps', type=int, default=300,
                      help='steps traced from the start')
  parser.add_argument('--rho', type=float, default=0.3)
  parser.add_argument('--alpha', type=float, default=0.5)
  parser.add_argument('--k', type=int, default=5,
                      help='a SAM step every k steps (schedules.periodic)')
  parser.add_argument('--warmup', type=int, default=0,
                      help='steps of a linear warm-up of alpha from 0 '
                      '(optax.linear_schedule); 0: none')
  parser.add_argument('--rho-warmup', action='store_true',
                      help='warm rho up from 0 over the --warmup steps too')
  parser.add_argument('--fixed-batch', type=int, default=512,
                      help='training samples of the fixed batch (dead units, '
                      'loss_fixed)')
  parser.add_argument('--tag', default='',
                      help='a label of the traced setting in the JSON')
  from examples import mnist1d_demo
  mnist1d_demo.add_recipe_arguments(parser)
  parser.add_argument('--out', default=os.path.join(cli.ROOT, 'benchmarks',
                                                    'results'))
  parser.add_argument('--name', default='collapse_trace')
  parser.add_argument('--cache', default=os.path.join(cli.ROOT, 'runs'))
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seed.split(',') if s.strip()]
  if args.steps < 1 or args.k < 1 or args.warmup < 0:
    parser.error('--steps and --k must be >= 1, --warmup >= 0.')
  return args


def _diagnostics(graphdef, loss_fn):
  """Jitted per-step measures: the gradient, the reused term, dead units."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  def norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(tree)))

  def dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a),
                                              jax.tree.leaves(b), strict=True))

  @jax.jit
  def before(params, u, alpha, xb, yb):
    """The gradient's norm, the reused term and cos(u, g) at ``params``."""
    g = jax.grad(loss_fn)(params, xb, yb)
    gn, un = norm(g), norm(u)
    reused = jax.tree.map(lambda v: alpha * gn * v, u)
    cos = jnp.where(un > 0, dot(u, g) / (gn * jnp.where(un > 0, un, 1)), 0.)
    return gn, reused, norm(reused), cos

  @jax.jit
  def dead(params, x, y):
    """Per ReLU layer, dead units and channels on the batch; its loss."""
    model = nnx.merge(graphdef, params)
    h = x[..., None]
    units, channels = [], []
    for conv in (model.conv1, model.conv2, model.conv3):
      pre = conv(h)
      off = jnp.all(pre <= 0, axis=0)  # (position, channel)
      units.append(jnp.mean(off))
      channels.append(jnp.mean(jnp.all(off, axis=0)))
      h = jax.nn.relu(pre)
    return jnp.stack(units), jnp.stack(channels), loss_fn(params, x, y)

  return before, dead, norm, dot


def trace_seed(args, seed):
  """The per-step records of one seed's first ``--steps`` steps."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import rst_optax
  from examples import mnist1d_demo as demo
  data = demo.load_data(args.num_samples, args.val_size, args.cache)
  n_train, batch = len(data['y']), args.batch_size
  steps_per_epoch = n_train // batch
  total_steps = steps_per_epoch * args.epochs
  y_train, _ = train.corrupt_labels(data['y'], args.noise, seed)
  model = demo.CNN(args.width, data['x'].shape[1], nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(jnp.asarray, params)
  make_tx, train_step, _, loss_fn = train.build_trainer(
      graphdef, total_steps, args.lr)
  rng = np.random.default_rng(seed)  # the data order of run_job
  orders = [rng.permutation(n_train)[:steps_per_epoch * batch].reshape(
      steps_per_epoch, batch).astype(np.int32)
            for _ in range(math.ceil(args.steps / steps_per_epoch))]
  order = np.concatenate(orders)[:args.steps]
  schedule = rst_optax.schedules.periodic(args.k)
  plan = rst_optax.decisions(schedule, seed, 0, args.steps)
  reuse = (optax.linear_schedule(0.0, args.alpha, args.warmup)
           if args.warmup else args.alpha)
  alphas = kinds.alpha_steps(reuse, args.steps)
  rhos = kinds.alpha_steps(
      optax.linear_schedule(0.0, args.rho, args.warmup)
      if args.rho_warmup and args.warmup else args.rho, args.steps)
  lr = optax.cosine_decay_schedule(args.lr, total_steps)
  before, dead, norm, dot = _diagnostics(graphdef, loss_fn)
  x, y = jnp.asarray(data['x']), jnp.asarray(y_train)
  xf, yf = x[:args.fixed_batch], y[:args.fixed_batch]
  # the state of rst with reuse (alpha here sets only its structure)
  opt_state = make_tx(schedule, args.rho, 1.0, seed, 1.0).init(params)
  twin = jax.tree.map(jnp.zeros_like, params)  # the reused terms' momentum
  lam = np.float32(1.0)
  last_sam, rows = None, []
  for t in range(args.steps):
    idx = order[t]
    units, channels, loss_fixed = dead(params, xf, yf)
    u = opt_state.reuse_direction
    gn, reused, reused_norm, cos = before(params, u, alphas[t], x[idx],
                                          y[idx])
    take_sam = bool(plan[t])
    if take_sam or last_sam is None:  # no term: a SAM step, or no u yet
      reused = jax.tree.map(jnp.zeros_like, reused)
      reused_norm = 0.0
    twin = jax.tree.map(lambda m, r: 0.9 * m + r, twin, reused)
    new, opt_state, loss = train_step(
        params, opt_state, rhos[t], lam, alphas[t], x, y, idx,
        take_sam=take_sam, reusing=True)
    step_lr = float(lr(t))
    update = jax.tree.map(lambda a, b: a - b, new, params)
    momentum = jax.tree.map(lambda d, s=step_lr: -d / s, update)
    mn, tn = float(norm(momentum)), float(norm(twin))
    rows.append({
        'step': t, 'sam': take_sam, 'alpha': float(alphas[t]),
        'rho': float(rhos[t]), 'lr': step_lr,
        'loss': float(loss), 'loss_fixed': float(loss_fixed),
        'g_norm': float(gn), 'reused_norm': float(reused_norm),
        'update_norm': float(norm(update)), 'momentum_norm': mn,
        'reused_momentum_norm': tn,
        'reused_momentum_cos': float(dot(twin, momentum) / (mn * tn))
        if mn > 0 and tn > 0 else 0.0,
        'age': None if last_sam is None else t - last_sam,
        'cos_u_g': float(cos) if last_sam is not None else None,
        'dead_units': [float(v) for v in units],
        'dead_channels': [float(v) for v in channels]})
    if take_sam:
      last_sam = t
    params = new
  return {'seed': seed, 'noise': args.noise, 'rho': args.rho,
          'alpha': args.alpha, 'k': args.k, 'warmup': args.warmup,
          'rho_warmup': bool(args.rho_warmup and args.warmup),
          'tag': args.tag, 'lr': args.lr, 'steps_per_epoch': steps_per_epoch,
          'total_steps': total_steps, 'rows': rows}


def plot(traces, path):
  """One column of panels per trace: loss, sizes, momentum, dead units."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(5, len(traces), figsize=(3.3 * len(traces), 13),
                           squeeze=False, sharex='col')
  for col, tr in enumerate(traces):
    rows = tr['rows']
    t = np.array([r['step'] for r in rows])
    get = lambda k, rows=rows: np.array([r[k] for r in rows], float)
    ax = axes[0, col]
    ax.plot(t, get('loss'), lw=0.6, label='minibatch')
    ax.plot(t, get('loss_fixed'), lw=1.2, label='fixed batch')
    ax.axhline(math.log(10), color='k', ls=':', lw=0.8, label='ln 10')
    ax.set_title(f"seed {tr['seed']} {tr['tag']}".strip(), fontsize=9)
    ax.set_ylabel('training loss')
    ax.legend(fontsize=7)
    ax = axes[1, col]
    ax.semilogy(t, get('g_norm'), lw=0.6, label='||g||')
    ax.semilogy(t, np.maximum(get('reused_norm'), 1e-6), lw=0.6,
                label='||α||g|| u||')
    ax.semilogy(t, get('update_norm') / get('lr'), lw=0.6,
                label='||Δw|| / lr = ||m||')
    ax.set_ylabel('norms')
    ax.legend(fontsize=7)
    ax = axes[2, col]
    ratio = get('reused_momentum_norm') / np.maximum(get('momentum_norm'),
                                                     1e-12)
    ax.plot(t, ratio, lw=0.8, label='||m_reused|| / ||m||')
    ax.plot(t, get('reused_momentum_cos'), lw=0.8,
            label='cos(m_reused, m)')
    ax.set_ylim(-0.5, 2.5)
    ax.legend(fontsize=7)
    ax.set_ylabel('momentum share')
    ax = axes[3, col]
    ages = [r for r in rows if r['cos_u_g'] is not None and not r['sam']]
    ax.scatter([r['step'] for r in ages], [r['cos_u_g'] for r in ages],
               c=[r['age'] for r in ages], s=5, cmap='viridis')
    ax.axhline(0, color='k', lw=0.5)
    ax.set_ylabel('cos(u, g) (colour: age)')
    ax = axes[4, col]
    dead = np.array([r['dead_units'] for r in rows])
    for layer in range(dead.shape[1]):
      ax.plot(t, dead[:, layer], lw=0.8, label=f'conv{layer + 1}')
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel('dead ReLU units')
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  """Traces every ``--seed``; writes the JSON (appending to an existing one
  of the same name) and the figure of all its traces."""
  args = parse_args(argv)
  from examples import mnist1d_demo as demo
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f'{args.name}.json')
  result = {'traces': []}
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
  for seed in args.seeds:
    start = time.perf_counter()
    tr = trace_seed(args, seed)
    tr['wall_s'] = time.perf_counter() - start
    tr['command'] = 'python -m benchmarks.label_noise.trace ' + ' '.join(
        argv if argv is not None else __import__('sys').argv[1:])
    result['traces'] = [o for o in result['traces'] if (
        o['seed'], o['tag'], o['noise'], o['lr']) != (
            seed, args.tag, args.noise, args.lr)] + [tr]
    print(f'seed {seed} {args.tag}: {tr["wall_s"]:.0f} s; loss at the end '
          f'{tr["rows"][-1]["loss_fixed"]:.3f}', flush=True)
  result['machine'] = demo.machine()
  with open(path, 'w') as f:
    json.dump(result, f, separators=(',', ':'))
  plot(result['traces'], os.path.join(args.out, f'{args.name}.png'))
  return result


if __name__ == '__main__':
  main()
