"""Step cost against model size: a dense MLP and the 1-D CNN, at batch 128.

For each size it times, interleaved as ``benchmarks.step_cost`` does (same
configurations, rounds, medians and bootstrap intervals): the base optimizer,
SAM (``rst p=1``, and ``optax.contrib.sam`` opaque), ``rst p=0``, and ``rst``
at p = 0.5 with the coin in the graph (``cond``) and with host dispatch
(``host``). It reports T_sam / T_base, the ratio to the ideal mixture at
p = 0.5 of both dispatch modes, and the overhead of ``rst`` at p = 0 against
the base optimizer. The steps per round and the rounds of each size are set
from a first timed step, so that every size gets about ``--seconds`` of timed
rounds. Run from the repository root:

  python -m benchmarks.scaling          # 4 MLPs and 3 CNNs, about 10 minutes
  python -m benchmarks.scaling --from-json benchmarks/results/scaling.json
                                        # the table and plot again, no timing

Writes ``scaling.json`` and ``scaling.png`` to ``--out``.
"""

import argparse
import json
import math
import os
import time
from typing import Any

import jax
import matplotlib
import numpy as np

from benchmarks import step_cost

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

P = 0.5
# The project's goals for size: host dispatch within GOAL_HOST of the ideal
# mixture from GOAL_FROM parameters up, and rst's overhead at p = 0 falling
# toward 1 as the model grows.
GOAL_HOST = 1.03
GOAL_FROM = 1e5
# Widths: the MLP has two hidden layers (about 7e3, 8e4, 1.1e6 and 9.6e6
# parameters), the CNN three convolutions (about 4e3, 4e4 and 1.7e5).
MLP_WIDTHS = '64,256,1024,3072'
# Steps of each configuration spent choosing the window and the rounds; the
# decisions planned for every configuration (its spec's rounds) include them.
CALIBRATION_STEPS = 5
CNN_WIDTHS = '16,64,128'


def size_specs(args) -> list[step_cost.ModelSpec]:
  """One spec per size; steps and rounds are upper bounds, set later.

  The rounds leave room for the calibration steps (one round of at least one
  step holds one of them).
  """
  specs = []
  for family, widths, module, shape in (
      ('mlp', args.mlp_widths, step_cost.MLP, (40, 1)),
      ('cnn', args.cnn_widths, step_cost.CNN1D, (40, 1))):
    for width in widths:
      specs.append(step_cost.ModelSpec(
          f'{family} width {width}', module(width=width), shape, False,
          args.max_steps, args.max_rounds + CALIBRATION_STEPS))
  return specs


def calibrate(configs, batch, args) -> tuple[int, int]:
  """Steps per round and rounds, from a few timed steps of each configuration.

  A window of at least ``--window`` seconds of the base step, and about
  ``--seconds`` of rounds in all. Two steps first, untimed, so that host
  dispatch has compiled both branches (at p = 0.5 they almost surely occur).
  """
  for config in configs:
    config.run(batch, 2)
  times = {c.name: c.run(batch, CALIBRATION_STEPS - 2)[0] for c in configs}
  steps = min(args.max_steps, max(1, math.ceil(args.window / times['base'])))
  round_s = steps * sum(times.values())
  rounds = int(np.clip(args.seconds // round_s, args.min_rounds,
                       args.max_rounds))
  return steps, rounds


def bench_size(spec, args, rng, decision_s: float) -> dict[str, Any]:
  """The step-cost rows of one size, and the figures of the sweep."""
  configs, batch, n_params = step_cost.build_configs(spec, args)
  first_s = step_cost.first_steps(configs, batch)
  steps, rounds = calibrate(configs, batch, args)
  ratios = step_cost.time_rounds(configs, batch, steps, rounds, args.warmup,
                                 rng)
  rows = {r['config']: r for r in step_cost.summarize(
      configs, ratios, steps, rounds, decision_s, rng)}
  host, cond = rows[f'host p={P:g}'], rows[f'cond p={P:g}']
  return {
      'model': spec.name, 'family': spec.name.split()[0],
      'width': spec.module.width, 'parameters': int(n_params),
      'steps_per_round': steps, 'rounds': rounds,
      'compile_and_first_step_s': first_s,
      'base_ms': rows['base']['ms_per_step'],
      'sam_over_base': rows['rst p=1']['ratio_to_base'],
      'sam_over_base_ci95': rows['rst p=1']['ratio_to_base_ci95'],
      'sam_opaque_over_base': rows['sam opaque']['ratio_to_base'],
      'host_to_mixture': host['ratio_to_mixture'],
      'host_to_mixture_ci95': host['ratio_ci95'],
      'cond_to_mixture': cond['ratio_to_mixture'],
      'cond_to_mixture_ci95': cond['ratio_ci95'],
      'host_to_mixture_pooled': host['pooled_ratio_to_mixture'],
      'cond_to_mixture_pooled': cond['pooled_ratio_to_mixture'],
      'p0_overhead': rows['rst p=0']['ratio_to_base'],
      'p0_overhead_ci95': rows['rst p=0']['ratio_to_base_ci95'],
      'rows': list(rows.values()),
  }


def goals(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Host within GOAL_HOST of the mixture from GOAL_FROM parameters up, and
  the p = 0 overhead falling as the model grows (per family)."""
  checks = []
  large = [s for s in sizes if s['parameters'] >= GOAL_FROM]
  if large:
    worst = max(large, key=lambda s: s['host_to_mixture'])
    checks.append({
        'goal': f'host within {GOAL_HOST} of the mixture at p={P:g} from '
                f'{GOAL_FROM:.0e} parameters up',
        'measured': f"max {worst['host_to_mixture']:.3f} ({worst['model']}, "
                    f"{worst['parameters']:,} parameters)",
        'met': worst['host_to_mixture'] <= GOAL_HOST})
  for family in dict.fromkeys(s['family'] for s in sizes):
    ours = sorted((s for s in sizes if s['family'] == family),
                  key=lambda s: s['parameters'])
    overheads = [s['p0_overhead'] for s in ours]
    checks.append({
        'goal': f'{family}: rst p=0 overhead falls toward 1.00 as the model '
                'grows',
        'measured': ', '.join(f"{s['parameters']:,}: {s['p0_overhead']:.3f}"
                              for s in ours),
        'met': abs(overheads[-1] - 1) <= abs(overheads[0] - 1) + 0.01})
  return checks


def markdown(sizes: list[dict[str, Any]]) -> str:
  """The sweep's table, in Markdown."""
  ci = lambda c: f'{c[0]:.3f}-{c[1]:.3f}'
  lines = ['| model | parameters | base ms/step | T_sam / T_base | host / '
           'mixture (95% CI) | cond / mixture (95% CI) | host, cond / '
           'mixture, all steps | rst p=0 / base (95% CI) | rounds x steps |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for s in sizes:
    lines.append(
        f"| {s['model']} | {s['parameters']:,} | {s['base_ms']:.3f} "
        f"| {s['sam_over_base']:.2f} "
        f"| {s['host_to_mixture']:.3f} ({ci(s['host_to_mixture_ci95'])}) "
        f"| {s['cond_to_mixture']:.3f} ({ci(s['cond_to_mixture_ci95'])}) "
        f"| {s['host_to_mixture_pooled']:.3f}, "
        f"{s['cond_to_mixture_pooled']:.3f} "
        f"| {s['p0_overhead']:.3f} ({ci(s['p0_overhead_ci95'])}) "
        f"| {s['rounds']} x {s['steps_per_round']} |")
  return '\n'.join(lines)


# Host and cond points of one size are drawn this factor apart on the
# (logarithmic) parameter axis, so that neither's interval covers the other's
# marker.
DODGE = 1.2


@matplotlib.rc_context({'font.size': 11, 'axes.titlesize': 11,
                        'legend.fontsize': 9})  # for a page ~750 px wide
def plot(sizes: list[dict[str, Any]], path: str, backend: str | None = None
         ) -> None:
  """Ratio to the mixture against parameters (left), p = 0 overhead (right).

  Left: the median over rounds with its 95% interval, and (crosses) the
  ratio over all timed steps together, which is the one to read where a
  window is a single step of a branch whose cost is far from the other's.
  Host dispatch (solid, filled) sits a little left of each size and ``cond``
  (dashed, open) a little right, so each interval is drawn on its own
  marker. ``backend`` names the machine in the title (default: this one's).
  """
  backend = backend or jax.default_backend()
  fig, (left, right) = plt.subplots(1, 2, figsize=(8, 5.8), dpi=150,
                                    layout='constrained')
  for family, color in (('mlp', 'C0'), ('cnn', 'C1')):
    ours = sorted((s for s in sizes if s['family'] == family),
                  key=lambda s: s['parameters'])
    if not ours:
      continue
    n = np.array([s['parameters'] for s in ours], float)
    for mode, style, shift in (('host', '-s', 1 / DODGE),
                               ('cond', '--o', DODGE)):
      x = n * shift
      y = [s[f'{mode}_to_mixture'] for s in ours]
      err = np.abs(np.array([s[f'{mode}_to_mixture_ci95'] for s in ours]).T
                   - y)
      bars = left.errorbar(
          x, y, yerr=err, fmt=style, color=color, capsize=3,
          mfc=color if mode == 'host' else 'white',
          zorder=3 if mode == 'host' else 2,
          alpha=1.0 if mode == 'host' else 0.8,
          label=f'{family}, {mode} (median, 95% CI)')
      if mode == 'cond':
        for line in bars[2]:
          line.set_linestyle('--')
      left.plot(x, [s[f'{mode}_to_mixture_pooled'] for s in ours], 'x',
                color=color, ms=7 if mode == 'cond' else 4,
                zorder=4, label=f'{family}, {mode}: all steps')
    y = [s['p0_overhead'] for s in ours]
    err = np.abs(np.array([s['p0_overhead_ci95'] for s in ours]).T - y)
    right.errorbar(n, y, yerr=err, fmt='-o', color=color, capsize=3,
                   label=f'{family}: rst p=0 / base')
  left.axhline(GOAL_HOST, color='gray', lw=0.8, ls=':',
               label=f'goal {GOAL_HOST} (host)')
  left.set_yscale('log')
  left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  left.set_ylabel(f'step time / ideal mixture at p = {P:g}')
  left.set_title(f'step cost against model size ({backend.upper()})')
  right.set_ylabel('rst at p = 0 / base optimizer')
  right.set_title('overhead of the transformation')
  for ax in (left, right):
    ax.set_xscale('log')
    ax.axhline(1.0, color='gray', lw=0.5)
    ax.set_xlabel('parameters')
    ax.grid(alpha=0.3, which='both')
  right.legend()
  fig.legend(*left.get_legend_handles_labels(), loc='outside lower center',
             ncol=3, frameon=False)
  fig.savefig(path)
  plt.close(fig)


def markdown_report(report: dict[str, Any]) -> str:
  """A saved scaling report as one Markdown page: the table and goals."""
  lines = ['# Step cost against model size: full results', '',
           'Generated from `scaling.json` (`python -m benchmarks.scaling '
           '--from-json`, or the run itself); do not edit.', '',
           step_cost.machine_line(report), '', markdown(report['sizes']), '',
           '## Goals', '', '| goal | measured | verdict |', '|---|---|---|']
  lines += [f"| {c['goal']} | {c['measured']} | "
            f"{'met' if c['met'] else '**missed**'} |"
            for c in report['goals']]
  return '\n'.join(lines) + '\n'


def write_markdown(report: dict[str, Any], out: str) -> None:
  with open(os.path.join(out, 'scaling.md'), 'w', encoding='utf-8') as f:
    f.write(markdown_report(report))


def replot(json_path: str, out: str) -> dict[str, Any]:
  """The table, goals and plot again from a saved report; no timing."""
  with open(json_path) as f:
    report = json.load(f)
  print(markdown(report['sizes']))
  for check in report['goals']:
    print(f"  [{'met' if check['met'] else 'MISSED'}] {check['goal']}: "
          f"{check['measured']}")
  os.makedirs(out, exist_ok=True)
  plot(report['sizes'], os.path.join(out, 'scaling.png'),
       backend=report['machine'].get('backend'))
  write_markdown(report, out)
  return report


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  widths = lambda text: [int(w) for w in text.split(',') if w]
  parser.add_argument('--mlp-widths', type=widths, default=MLP_WIDTHS,
                      help='hidden widths of the MLP (two hidden layers)')
  parser.add_argument('--cnn-widths', type=widths, default=CNN_WIDTHS,
                      help='channels of the 1-D CNN')
  parser.add_argument('--seconds', type=float, default=45.0,
                      help='timed rounds per size, in seconds (about)')
  parser.add_argument('--window', type=float, default=0.005,
                      help='least seconds of base steps per window')
  parser.add_argument('--min-rounds', type=int, default=8)
  parser.add_argument('--max-rounds', type=int, default=200)
  parser.add_argument('--max-steps', type=int, default=20,
                      help='most steps per configuration per round')
  parser.add_argument('--from-json', metavar='PATH',
                      help='no timing: print the table, write scaling.md and draw '
                      'the plot again from a saved scaling.json, into --out')
  step_cost.add_timing_flags(parser)
  args = parser.parse_args(argv)
  if not args.mlp_widths + args.cnn_widths or min(
      args.mlp_widths + args.cnn_widths) < 1:
    parser.error('--mlp-widths, --cnn-widths: widths >= 1, at least one')
  if args.min_rounds < 1 or args.max_rounds < args.min_rounds or (
      args.max_steps < 1):
    parser.error('need 1 <= --min-rounds <= --max-rounds and --max-steps >= 1')
  # What build_configs reads; no reuse rows here.
  args.probs, args.dtype = [P], 'float32'
  args.reuse, args.reuse_probs, args.reuse_modes = 0.0, [], []
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.from_json:
    return replot(args.from_json, args.out)
  start = time.perf_counter()
  info = step_cost.machine_at_start()
  rng = np.random.default_rng(args.seed)
  decision_s = step_cost.decision_cost() / 4096
  sizes = []
  for spec in size_specs(args):
    sizes.append(bench_size(spec, args, rng, decision_s))
    s = sizes[-1]
    print(f"{s['model']}: {s['parameters']:,} parameters, T_sam/T_base "
          f"{s['sam_over_base']:.2f}, host {s['host_to_mixture']:.3f} and "
          f"cond {s['cond_to_mixture']:.3f} x mixture, rst p=0 "
          f"{s['p0_overhead']:.3f} x base ({s['rounds']} x "
          f"{s['steps_per_round']} steps; load {os.getloadavg()[0]:.2f})")
  checks = goals(sizes)
  print('\n' + markdown(sizes) + '\n')
  for check in checks:
    print(f"  [{'met' if check['met'] else 'MISSED'}] {check['goal']}: "
          f"{check['measured']}")
  report = step_cost.write_report(
      os.path.join(args.out, 'scaling.json'), info, start, args, p=P,
      sizes=sizes, goals=checks)
  plot(sizes, os.path.join(args.out, 'scaling.png'))
  write_markdown(report, args.out)
  return report


if __name__ == '__main__':
  main()
