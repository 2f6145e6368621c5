"""Step cost of RST: in-graph ``lax.cond`` against host dispatch, per model.

For each model, times one training step of: the base optimizer alone
(``base``); SAM (``sam opaque``: ``optax.contrib.sam`` in opaque mode, and
``rst p=1``: ``rst`` with the Python constant ``schedule=1``, which traces no
``cond``); ``rst p=0`` (the Python constant 0, no ``cond`` either); and
``rst`` at each p with the coin in the graph (``cond``: ``schedule`` given as
``optax.constant_schedule(p)``, so a ``cond`` is traced at every p) and with
host dispatch (``host``: ``rst_optax.HostDispatch``). All configurations run
interleaved, in a new random order each round, after compilation and a
warm-up; each round times ``--steps`` steps of each and blocks on the result.

Ratios are taken within a round and their medians over rounds reported:
``/mixture`` is to the ideal mixture ``(1 - f) T_base + f T_sam``, with ``f``
the fraction of SAM steps actually taken in the window, ``T_base`` the base
step and ``T_sam`` the ``rst p=1`` step; ``/mix+dec`` adds to host rows the
cost of computing their decisions (``rst_optax.decisions``, 4096 steps at a
time), amortized per step; ``/base`` and ``/SAM`` are to the base step and to
``sam opaque``. Run:

  python benchmarks/step_cost.py            # MLP and 1-D CNN, under 5 minutes
  python benchmarks/step_cost.py --models cnn2d,resnet18 --rounds 5

Writes ``step_cost.json`` and ``step_cost.png`` to ``--out``.
"""

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import matplotlib
import numpy as np
import optax

import rst_optax

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

RHO = 0.05
SEED = 0
TARGET_MIXTURE = 1.05
TARGET_ENDS = 1.03


class MLP(nn.Module):
  """Dense net on MNIST-1D-shaped inputs: a step under a millisecond."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


class CNN1D(nn.Module):
  """Small 1-D conv net on MNIST-1D-shaped inputs (length 40, one channel)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (5,))(x))
    x = nn.relu(nn.Conv(32, (5,), strides=2)(x))
    x = nn.relu(nn.Conv(32, (5,), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class CNN2D(nn.Module):
  """Small 2-D conv net on CIFAR-shaped inputs (32x32x3)."""

  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class BasicBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    norm = lambda: nn.BatchNorm(use_running_average=False, momentum=0.9)
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18, CIFAR variant (3x3 stem, no max-pool), with BatchNorm."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=False, momentum=0.9)(x))
    for i, features in enumerate((64, 128, 256, 512)):
      for j in range(2):
        x = BasicBlock(features, 2 if i > 0 and j == 0 else 1)(x)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


# name: (module, input shape without batch, batch norm, steps per round,
# rounds). Many short rounds: the noise of one window is large (+-10% on the
# MLP), the median over many is stable.
MODELS = {
    'mlp': (MLP, (40, 1), False, 10, 200),
    'cnn': (CNN1D, (40, 1), False, 5, 60),
    'cnn2d': (CNN2D, (32, 32, 3), False, 2, 10),
    'resnet18': (ResNet18, (32, 32, 3), True, 1, 5),
}


def steps_and_rounds(name: str, args: argparse.Namespace) -> tuple[int, int]:
  _, _, _, steps, rounds = MODELS[name]
  return args.steps or steps, args.rounds or rounds


def median_ci(values, rng, level: float = 0.95, resamples: int = 2000):
  """Bootstrap confidence interval of the median of ``values``."""
  values = np.asarray(values)
  draws = rng.choice(values, size=(resamples, values.size), replace=True)
  tail = 50 * (1 - level)
  return [float(q) for q in np.percentile(np.median(draws, axis=1),
                                          [tail, 100 - tail])]


def make_loss(module: nn.Module, batch_norm: bool) -> Callable[..., Any]:
  """``loss(params, stats, batch) -> (loss, new_stats)``."""

  def loss_fn(params, stats, batch):
    x, y = batch
    if batch_norm:
      logits, updated = module.apply(
          {'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
      stats = updated['batch_stats']
    else:
      logits = module.apply({'params': params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, stats

  return loss_fn


def make_step(loss_fn, tx, kind: str) -> Callable[..., Any]:
  """A train step; ``kind`` is 'base', 'sam' (optax.contrib.sam) or 'rst'."""

  def step(params, stats, opt_state, batch, take_sam=None):
    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, batch)
    # The perturbed pass keeps the statistics of the first pass.
    grad_fn = lambda p: jax.grad(lambda q: loss_fn(q, stats, batch)[0])(p)
    if kind == 'base':
      updates, opt_state = tx.update(grads, opt_state, params)
    elif kind == 'sam':
      updates, opt_state = tx.update(
          grads, opt_state, params, grad_fn=lambda p, _: grad_fn(p))
    else:
      updates, opt_state = tx.update(
          grads, opt_state, params, grad_fn=grad_fn, take_sam=take_sam)
    return optax.apply_updates(params, updates), new_stats, opt_state

  return step


class Config:
  """One timed configuration: a jitted step, its state and its decisions."""

  def __init__(self, name, mode, p, tx, step, init, taken):
    self.name, self.mode, self.p = name, mode, p
    self.taken = taken  # The branch of every step, known on the host.
    params, stats = init
    self.state = (params, stats, tx.init(params))
    self.count = 0
    self.traces = 0
    self.times, self.fractions = [], []
    if mode == 'host':
      self.call = rst_optax.HostDispatch(step, p, SEED)
    else:
      def counted(*args):
        self.traces += 1
        return step(*args)
      self.call = jax.jit(counted)

  @property
  def compilations(self) -> int:
    if self.mode == 'host':
      return self.call.compilations
    return self.traces

  def run(self, batch, steps: int) -> tuple[float, float]:
    """Runs ``steps`` steps; returns (seconds per step, SAM fraction)."""
    start = time.perf_counter()
    state = self.state
    for _ in range(steps):
      state = self.call(*state, batch)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    self.state = state
    fraction = float(self.taken[self.count:self.count + steps].mean())
    self.count += steps
    return elapsed / steps, fraction


def build_configs(name: str, args: argparse.Namespace):
  """The configurations of one model, their batch, and the model's size."""
  module_cls, shape, batch_norm = MODELS[name][:3]
  steps, rounds = steps_and_rounds(name, args)
  total = 1 + steps * (args.warmup + rounds)
  module = module_cls()
  kx, ky, kinit = jax.random.split(jax.random.key(SEED), 3)
  x = jax.random.normal(kx, (args.batch_size, *shape))
  y = jax.random.randint(ky, (args.batch_size,), 0, 10)
  variables = module.init(kinit, x)
  init = (variables['params'], variables.get('batch_stats', {}))
  loss_fn = make_loss(module, batch_norm)
  base = optax.sgd(0.01, momentum=0.9)
  sam = optax.contrib.sam(
      base, optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      opaque_mode=True)
  never, always = np.zeros(total, bool), np.ones(total, bool)
  configs = [
      Config('base', 'base', 0.0, base, make_step(loss_fn, base, 'base'), init,
             never),
      Config('sam opaque', 'sam', 1.0, sam, make_step(loss_fn, sam, 'sam'),
             init, always),
  ]
  for p, taken in ((0.0, never), (1.0, always)):
    tx = rst_optax.rst(base, p, rho=RHO, seed=SEED)  # No cond is traced.
    configs.append(Config(f'rst p={p:g}', 'const', p, tx,
                          make_step(loss_fn, tx, 'rst'), init, taken))
  for mode in ('cond', 'host'):
    for p in args.probs:
      taken = rst_optax.decisions(p, SEED, 0, total)
      # cond: a schedule (not the Python number) so a cond is traced at every p.
      tx = rst_optax.rst(base, optax.constant_schedule(p) if mode == 'cond'
                         else p, rho=RHO, seed=SEED)
      configs.append(Config(f'{mode} p={p:g}', mode, p, tx,
                            make_step(loss_fn, tx, 'rst'), init, taken))
  n_params = sum(v.size for v in jax.tree.leaves(init[0]))
  return configs, (x, y), n_params


def bench_model(name, args, rng, decision_s: float) -> dict[str, Any]:
  """Times every configuration of one model, interleaved; returns its rows.

  Every ratio is taken within a round (against the base, ``rst p=1`` and SAM
  windows of the same round, so under the same load), then its median over
  the rounds is reported.
  """
  steps, rounds = steps_and_rounds(name, args)
  configs, batch, n_params = build_configs(name, args)
  t0 = time.perf_counter()
  for config in configs:  # Compile (both branches for host dispatch: p > 0).
    config.run(batch, 1)
  compile_s = time.perf_counter() - t0
  keys = ('mixture', 'base', 'sam_opaque')
  ratios = {c.name: {k: [] for k in keys} for c in configs}
  for round_ in range(args.warmup + rounds):
    timed = {}
    for i in rng.permutation(len(configs)):
      timed[configs[i].name] = configs[i].run(batch, steps)
    if round_ < args.warmup:
      continue
    t_base, t_sam = timed['base'][0], timed['rst p=1'][0]
    for config in configs:
      t, frac = timed[config.name]
      config.times.append(t)
      config.fractions.append(frac)
      ratio = ratios[config.name]
      ratio['mixture'].append(t / ((1 - frac) * t_base + frac * t_sam))
      ratio['base'].append(t / t_base)
      ratio['sam_opaque'].append(t / timed['sam opaque'][0])
  rows = []
  for config in configs:
    t = float(np.median(config.times))
    ratio = {k: float(np.median(v)) for k, v in ratios[config.name].items()}
    # Host rows: add the cost of the decisions, amortized per step.
    extra = decision_s / t if config.mode == 'host' else 0.0
    rows.append({
        'config': config.name,
        'mode': config.mode,
        'p': config.p,
        'ms_per_step': 1e3 * t,
        'ms_iqr': [1e3 * q for q in np.percentile(config.times, [25, 75])],
        'sam_fraction': float(np.mean(config.fractions)),
        'ratio_to_mixture': ratio['mixture'],
        'ratio_ci95': median_ci(ratios[config.name]['mixture'], rng),
        'ratio_to_mixture_amortized': ratio['mixture'] * (1 + extra),
        'ratio_to_base': ratio['base'],
        'ratio_to_base_ci95': median_ci(ratios[config.name]['base'], rng),
        'ratio_to_sam_opaque': ratio['sam_opaque'],
        'ratio_to_sam_opaque_ci95': median_ci(
            ratios[config.name]['sam_opaque'], rng),
        'compilations': config.compilations,
        'steps_timed': steps * rounds,
    })
  return {'model': name, 'parameters': int(n_params),
          'steps_per_round': steps, 'rounds': rounds,
          'compile_and_first_step_s': compile_s, 'rows': rows}


def decision_cost(chunk_size: int = 4096, warmup: int = 3,
                  repeats: int = 7) -> float:
  """Seconds for one chunk of host decisions (``rst_optax.decisions``), warm."""
  times = []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    rst_optax.decisions(0.5, SEED, i * chunk_size, (i + 1) * chunk_size)
    times.append(time.perf_counter() - start)
  return float(np.median(times[warmup:]))


def _ci(interval: list[float]) -> str:
  return f'{interval[0]:.3f}-{interval[1]:.3f}'


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Checks the issue's targets for the recommended dispatch of this backend."""
  mode = rst_optax.recommended_dispatch()
  checks = []
  for result in results:
    rows = {r['config']: r for r in result['rows']}
    ours = [r for r in result['rows'] if r['mode'] == mode]
    worst = max(ours, key=lambda r: r['ratio_to_mixture'])
    checks.append({
        'model': result['model'],
        'target': f'{mode}: ratio to mixture <= {TARGET_MIXTURE} at every p',
        'measured': f"max {worst['ratio_to_mixture']:.3f} at p={worst['p']:g}"
                    f" (95% CI {_ci(worst['ratio_ci95'])})",
        'met': worst['ratio_to_mixture'] <= TARGET_MIXTURE,
    })
    if mode == 'host':
      worst = max(ours, key=lambda r: r['ratio_to_mixture_amortized'])
      checks.append({
          'model': result['model'],
          'target': f'{mode} with decisions amortized: ratio to mixture <= '
                    f'{TARGET_MIXTURE} at every p',
          'measured': f"max {worst['ratio_to_mixture_amortized']:.3f} at "
                      f"p={worst['p']:g}",
          'met': worst['ratio_to_mixture_amortized'] <= TARGET_MIXTURE,
      })
    one = rows[f'{mode} p=1']
    checks.append({
        'model': result['model'],
        'target': f'{mode} p=1 within 3% of optax.contrib.sam opaque',
        'measured': f"{one['ratio_to_sam_opaque']:.3f}x SAM opaque (95% CI "
                    f"{_ci(one['ratio_to_sam_opaque_ci95'])})",
        'met': one['ratio_to_sam_opaque'] <= TARGET_ENDS,
    })
    zero = rows[f'{mode} p=0']
    checks.append({
        'model': result['model'],
        'target': f'{mode} p=0 within 3% of the base optimizer',
        'measured': f"{zero['ratio_to_base']:.3f}x base (95% CI "
                    f"{_ci(zero['ratio_to_base_ci95'])})",
        'met': zero['ratio_to_base'] <= TARGET_ENDS,
    })
    # Host: one executable per branch taken (2 when both occur), cond: one.
    host = {r['config']: r['compilations'] for r in result['rows']
            if r['mode'] == 'host'}
    host_ok = all(
        r['compilations'] == (2 if 0 < r['sam_fraction'] < 1 else 1)
        for r in result['rows'] if r['mode'] == 'host')
    cond = {r['compilations'] for r in result['rows'] if r['mode'] == 'cond'}
    checks.append({
        'model': result['model'],
        'target': 'compilations: host 2 when both branches occur (1 when one '
                  'does), cond 1',
        'measured': f'host {host}, cond {sorted(cond)}',
        'met': host_ok and cond == {1},
    })
  return checks


def machine() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f
                 if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {
      'cpu': cpu, 'cores': os.cpu_count(), 'backend': jax.default_backend(),
      'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__,
      'jaxlib': jaxlib.__version__, 'optax': optax.__version__,
      'flax': flax.__version__, 'python': platform.python_version(),
  }


def print_table(result: dict[str, Any]) -> None:
  print(f"\n{result['model']} ({result['parameters']:,} parameters, "
        f"{result['rounds']} rounds of {result['steps_per_round']} steps)")
  print(f"{'config':<12} {'ms/step':>9} {'SAM frac':>8} {'/mixture':>8} "
        f"{'(95% CI)':>13} "
        f"{'/mix+dec':>8} {'/base':>7} {'/SAM':>7} {'compiles':>8}")
  for r in result['rows']:
    print(f"{r['config']:<12} {r['ms_per_step']:9.3f} {r['sam_fraction']:8.2f} "
          f"{r['ratio_to_mixture']:8.3f} "
          f"({r['ratio_ci95'][0]:5.3f}-{r['ratio_ci95'][1]:5.3f}) "
          f"{r['ratio_to_mixture_amortized']:8.3f} "
          f"{r['ratio_to_base']:7.3f} "
          f"{r['ratio_to_sam_opaque']:7.3f} {r['compilations']:8d}")


def plot(results: list[dict[str, Any]], path: str) -> None:
  """Ratio to the ideal mixture vs p: all rows (log), and a zoom near 1."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  for ax, zoom in zip(axes, (False, True), strict=True):
    for result, color in zip(results, plt.cm.tab10.colors, strict=False):
      for mode, style in (('cond', '--o'), ('host', '-s')):
        rows = [r for r in result['rows'] if r['mode'] == mode]
        ax.plot([r['p'] for r in rows], [r['ratio_to_mixture'] for r in rows],
                style, color=color, label=f"{result['model']}, {mode}")
    ax.axhline(TARGET_MIXTURE, color='gray', lw=0.8, ls=':',
               label=f'target {TARGET_MIXTURE}')
    ax.axhline(1.0, color='gray', lw=0.5)
    ax.set_xlabel('p (probability of a SAM step)')
    if zoom:
      ax.set_ylim(0.9, 1.2)
      ax.set_title('zoom near the ideal mixture')
    else:
      ax.set_yscale('log')
      ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
      ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      ax.set_yticks([1, 2, 5, 10])
      ax.set_ylabel('step time / ideal mixture (median over rounds)')
      ax.set_title(f'RST step cost on {jax.default_backend().upper()}: '
                   'in-graph cond vs host dispatch')
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='mlp,cnn',
                      help=f'comma-separated, from {",".join(MODELS)}')
  parser.add_argument('--probs', default='0,0.25,0.5,0.75,1',
                      help='the values of p for the cond and host rows')
  parser.add_argument('--rounds', type=int, default=0,
                      help='timed rounds, the medians are over them '
                           '(0: per model, 200 for mlp, 60 for cnn)')
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed rounds after compilation')
  parser.add_argument('--steps', type=int, default=0,
                      help='steps per configuration per round '
                           '(0: per model, 10 for mlp, 5 for cnn)')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the interleaving order')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'results'))
  args = parser.parse_args(argv)
  args.models = args.models.split(',')
  unknown = [m for m in args.models if m not in MODELS]
  if unknown:
    parser.error(f'--models: unknown {unknown}; choose from {list(MODELS)}')
  args.probs = [float(p) for p in args.probs.split(',')]
  if not all(0 <= p <= 1 for p in args.probs) or 0 not in args.probs or (
      1 not in args.probs):
    parser.error('--probs: values in [0, 1], including 0 and 1')
  if args.rounds < 0 or args.warmup < 0 or args.steps < 0:
    parser.error('--rounds, --warmup and --steps must be >= 0')
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  start = time.perf_counter()
  info = machine()
  info['load_average_start'] = os.getloadavg()
  print(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']} "
        f"({info['backend']}); load average {info['load_average_start']}")
  rng = np.random.default_rng(args.seed)
  chunk_s = decision_cost()
  print(f'host decisions: {1e3 * chunk_s:.2f} ms per chunk of 4096 steps '
        f'(rst_optax.decisions), {1e6 * chunk_s / 4096:.1f} us per step '
        'amortized; no chunk boundary falls in a timed window, so the column '
        '/mix+dec adds it to the host rows')
  results = []
  for name in args.models:
    results.append(bench_model(name, args, rng, chunk_s / 4096))
    print_table(results[-1])
  checks = targets(results)
  print(f'\ntargets (recommended dispatch here: '
        f'{rst_optax.recommended_dispatch()})')
  for check in checks:
    print(f"  [{'met' if check['met'] else 'MISSED'}] {check['model']}: "
          f"{check['target']}: {check['measured']}")
  info['load_average_end'] = os.getloadavg()
  total = time.perf_counter() - start
  print(f"\nload average at the end {info['load_average_end']}; "
        f'total {total:.0f} s')
  report = {
      'machine': info,
      'settings': {k: v for k, v in vars(args).items() if k != 'out'},
      'mixture': '(1 - f) T_base + f T_sam per round; T_sam = rst p=1 '
                 '(Python constant, no cond); f = SAM fraction of the window',
      'decisions_chunk_ms': 1e3 * chunk_s,
      'results': results, 'targets': checks, 'total_s': total,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'step_cost.json'), 'w') as f:
    json.dump(report, f, indent=1)
  plot(results, os.path.join(args.out, 'step_cost.png'))
  return report


if __name__ == '__main__':
  main()
