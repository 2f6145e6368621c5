"""One command for a GPU or TPU machine: step cost, compile time and memory.

Runs ``benchmarks.step_cost``'s measurement on ResNet-18 (CIFAR shape, with
BatchNorm) and the 2-D CNN at batch 128: the base optimizer, SAM, ``rst`` at
p = 0 and 1, and ``rst`` with ``cond`` and with host dispatch at p = 0.25,
0.5 and 0.75; ``rst`` with ``reuse=0.7`` (LookSAM, ``--reuse``) at p = 0.2
and 0.5 in the dispatch mode that ``rst_optax.recommended_dispatch()``
returns, each against the same schedule without reuse (p = 0.2 is added for
it); each model's compile times and memory, with the extra memory of reuse
and of its optimizer state; in float32, then in bfloat16 (compute;
parameters stay float32) where the backend runs it. No
new model starts after ``--budget`` seconds (7 minutes), so that the run
ends within about 8; it says which ones it skipped. It also says, from the
data, which dispatch mode came closer to the ideal mixture on this backend,
next to what ``rst_optax.recommended_dispatch()`` returns. Run from the
repository root:

  python -m benchmarks.accelerator             # on the GPU/TPU machine
  python -m benchmarks.accelerator --quick     # the same plumbing on CPU, 1-2 min

Writes ``accelerator.json``, ``accelerator.md`` (the tables for
``benchmarks/README.md``) and ``accelerator.png`` to ``--out/<backend>``
(``--out/<backend>-quick`` with ``--quick``).
"""

import argparse
import os
import sys
import time
from typing import Any

# --quick compiles tiny models many times on CPU; XLA's cheapest optimization
# level makes that several times faster. It must be set before JAX starts its
# backend, so here, before anything runs (it only changes CPU compilation).
if __name__ == '__main__' and '--quick' in sys.argv:
  os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0 '
                        '--xla_llvm_disable_expensive_passes=true')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rst_optax  # noqa: E402
from benchmarks import step_cost  # noqa: E402
from examples.cifar10_resnet import ResNet18  # noqa: E402

PROBS = (0.25, 0.5, 0.75)
REUSE_PROBS = '0.2,0.5'  # with reuse, in the recommended dispatch mode
# Per model: steps per round and rounds; a GPU step of these models is a few
# milliseconds, so windows of 5 steps.
FULL = {
    'resnet18': step_cost.MODELS['resnet18']._replace(steps=5, rounds=20),
    'cnn2d': step_cost.MODELS['cnn2d']._replace(steps=5, rounds=20),
}
# --quick: tiny models, p = 0.5 only (with reuse too), and each model in one
# dtype, so that
# CPU compiles few steps; the code path is the same.
QUICK = {
    'resnet18': step_cost.MODELS['resnet18']._replace(
        module=ResNet18(width=4, stages=1), steps=1, rounds=2),
    'cnn2d': step_cost.MODELS['cnn2d']._replace(
        module=step_cost.CNN2D(width=4), steps=1, rounds=2),
}
QUICK_DTYPES = {'resnet18': 'float32', 'cnn2d': 'bfloat16'}


def runs_bfloat16() -> bool:
  """Whether the default backend compiles and runs a bfloat16 convolution."""
  try:
    x = jnp.ones((1, 8, 8, 3), jnp.bfloat16)
    w = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
    y = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)
    return bool(jnp.isfinite(y.astype(jnp.float32)).all())
  except Exception:  # Any failure means: not supported here.
    return False


def dispatch_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
  """Which mode came closer to the ideal mixture, per model and p."""
  per = []
  for result in results:
    rows = {r['config']: r for r in result['rows']}
    for p in sorted({r['p'] for r in result['rows'] if r['mode'] == 'cond'}):
      cond, host = rows.get(f'cond p={p:g}'), rows.get(f'host p={p:g}')
      if cond and host:
        per.append({'model': result['model'], 'dtype': result['dtype'],
                    'p': p, 'cond': cond['ratio_to_mixture'],
                    'host': host['ratio_to_mixture'],
                    'closer': 'cond' if cond['ratio_to_mixture']
                    <= host['ratio_to_mixture'] else 'host'})
  wins = {mode: sum(v['closer'] == mode for v in per)
          for mode in ('cond', 'host')}
  return {'recommended_dispatch': rst_optax.recommended_dispatch(),
          'closer_to_mixture': per, 'wins': wins,
          'data_says': max(wins, key=wins.get) if per else None}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='tiny models, p = 0.5 (with and without reuse), 2 '
                           'rounds, batch 8, ResNet in float32 and the CNN in '
                           'bfloat16: the plumbing on CPU in a minute or two, '
                           'not a measurement')
  parser.add_argument('--budget', type=float, default=420.0,
                      help='seconds after which no new model is started')
  parser.add_argument('--compile-repeats', type=int, default=1,
                      help='compilations per step for the compile table')
  step_cost.add_reuse_flags(parser, REUSE_PROBS)
  step_cost.add_timing_flags(parser)
  args = parser.parse_args(argv)
  step_cost.parse_reuse_probs(parser, args)
  args.probs = list(PROBS)
  args.reuse_modes = [rst_optax.recommended_dispatch()]
  if args.quick:
    args.batch_size, args.warmup, args.probs = 8, 1, [0.5]
    args.reuse_probs = [0.5]
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  start = time.perf_counter()
  backend = jax.default_backend()
  out = os.path.join(args.out, backend + ('-quick' if args.quick else ''))
  info = step_cost.machine_at_start()
  dtypes = ['float32'] + (['bfloat16'] if runs_bfloat16() else [])
  rng = np.random.default_rng(args.seed)
  decision_s = step_cost.decision_cost() / 4096
  results, skipped, tables = [], [], []
  for dtype in dtypes:
    for name, spec in (QUICK if args.quick else FULL).items():
      if args.quick and QUICK_DTYPES[name] != dtype:
        continue
      if time.perf_counter() - start > args.budget:
        skipped.append(f'{name} {dtype}')
        continue
      args.dtype = dtype
      results.append(step_cost.bench_model(spec, args, rng, decision_s))
      new = [step_cost.markdown_rows(results[-1]),
             step_cost.markdown_reuse(results[-1]),
             step_cost.markdown_compile(results[-1])]
      tables += [t for t in new if t]
      print('\n' + '\n\n'.join(t for t in new if t), flush=True)
  checks = step_cost.goals(results)
  step_cost.print_goals(checks)
  verdict = dispatch_verdict(results)
  print(f"\nrecommended_dispatch() here: {verdict['recommended_dispatch']}; "
        f"closer to the ideal mixture: cond {verdict['wins']['cond']} times, "
        f"host {verdict['wins']['host']} times (of model x dtype x p)")
  if skipped:
    print(f"skipped, past --budget {args.budget:g} s: {', '.join(skipped)}")
  report = step_cost.write_report(
      os.path.join(out, 'accelerator.json'), info, start, args,
      quick=args.quick, dtypes=dtypes, results=results, goals=checks,
      dispatch=verdict, skipped=skipped)
  with open(os.path.join(out, 'accelerator.md'), 'w') as f:
    f.write('\n\n'.join(tables) + '\n')
  step_cost.plot(results, os.path.join(out, 'accelerator.png'))
  print(f'Wrote {out}/accelerator.json, accelerator.md and accelerator.png.')
  return report


if __name__ == '__main__':
  main()
