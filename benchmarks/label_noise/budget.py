"""The fixed-budget table of the label-noise benchmark.

At a budget of (1 + p) / 2 of SAM's gradient evaluations, three ways to
spend it, paired per seed:

- our best configuration at that budget: of the RST-family configurations
  at p (every kind but the baselines and the two below), the one with the
  best mean validation accuracy at its chosen radius and alpha;
- ``sam_short``: SAM for (1 + p) / 2 of the steps, its schedule compressed;
- ``base_long``: the base optimizer for 1 + p times the steps.

Run ``python -m benchmarks.label_noise.budget --from-json A.json,B.json``
on saved (pooled) results: it prints one Markdown table per noise level.
"""

import argparse

import numpy as np

from benchmarks.label_noise import cli, report, stats

FIXED = ('sam_short', 'base_long')


def tests_at_choice(records, noise, config):
  """Test accuracy per seed of ``config`` at its chosen (radius, alpha)."""
  records = stats.with_alpha(records)
  g, alpha = stats.choose(records)[(noise, config)]
  runs = {r['seed']: r for r in records if r['noise'] == noise
          and r['config'] == config and r['rho_grid'] == g
          and r['alpha'] == alpha}
  seeds = sorted({r['seed'] for r in records if r['noise'] == noise})
  return np.asarray(stats.test_of([runs[s] for s in seeds]))


def budget_rows(result, ours=()):
  """{noise: [row per budget]}: the best, SAM short and base long, paired.

  ``ours``: configurations (names) compared as well, each in a row of its
  own at its budget, e.g. the recommended one where another won on
  validation.
  """
  runs, summary = result['runs'], result['summary']
  out = {}
  for key, block in summary.items():
    noise, rows = block['noise'], block['rows']
    budgets = sorted({r['p'] for r in rows.values() if r['kind'] in FIXED})
    for p in budgets:
      family = [r for r in rows.values() if r['p'] == p and r['kind'] not in (
          'sgd', 'sam') + FIXED and r['diverged'] == 0]
      short = next((r for r in rows.values() if r['p'] == p
                    and r['kind'] == 'sam_short'), None)
      long = next((r for r in rows.values() if r['p'] == p
                   and r['kind'] == 'base_long'), None)
      if not family or short is None or long is None:
        continue
      best = max(family, key=lambda r: r['val_acc']['mean'])
      named = [r for r in family if r['config'] in ours
               and r['config'] != best['config']]
      for mine in [best] + named:
        acc = {name: tests_at_choice(runs, noise, name)
               for name in (mine['config'], short['config'], long['config'])}
        row = {'p': p, 'budget': (1 + p) / 2, 'best': mine, 'short': short,
               'long': long, 'chosen': mine is best}
        for tag, other in (('vs_short', short), ('vs_long', long)):
          row[tag] = stats.stats(acc[mine['config']] - acc[other['config']])
        out.setdefault(key, []).append(row)
  return out


def pin(result, entry):
  """A configuration of ``--ours`` held at one grid point: its name.

  ``entry`` is ``'NAME'`` (at its radius and alpha chosen on validation) or
  ``'NAME@RHO,ALPHA'`` (at that grid radius and alpha, as the guidance
  recommends it). For the latter, copies of those runs are added to
  ``result`` under the name ``'NAME at ρ RHO, α ALPHA'``, and the summary is
  made again.
  """
  if '@' not in entry:
    return entry
  name, at = entry.split('@')
  g, alpha = (float(v) for v in at.split(','))
  pinned = f'{name} at ρ {g:g}, α {alpha:g}'
  runs = [r | {'config': pinned} for r in stats.with_alpha(result['runs'])
          if r['config'] == name and r['rho_grid'] == g
          and r['alpha'] == alpha]
  if not runs:
    raise ValueError(f'--ours: no run of {name!r} at radius {g:g} and alpha '
                     f'{alpha:g}.')
  result['runs'] = result['runs'] + runs
  result['summary'] = stats.summarize(result['runs'])
  return pinned


def _cell(row):
  """'test % ± s.e. (Δ SAM)' of a summary row."""
  t, d = row['test_acc'], row.get('diff_vs_SAM')
  text = f"{100 * t['mean']:.2f} ± {100 * t['sem']:.2f}"
  if d:
    text += f" ({100 * d['mean']:+.2f} ± {100 * d['sem']:.2f})"
  return text + (f" ✗{row['diverged']}" if row['diverged'] else '')


def _setting(row):
  """The radius (and alpha) a row was chosen at."""
  if row['kind'] in ('sgd', 'base_long'):
    return '–'
  return f"{row['rho']:g}" + (f", α {row['alpha']:g}" if row['alpha'] else '')


def format_budget(rows_by_noise):
  """Markdown: one table per noise level, a row per budget."""
  parts = []
  for key, rows in rows_by_noise.items():
    parts.append(
        f'**{float(key):.0%} noisy labels**: test acc. % ± s.e. (paired Δ '
        'vs full SAM, pp); ✗n: n seeds diverged; ours: the best on '
        'validation at that budget, or † one named by --ours\n\n'
        '| budget (× SAM) | ours '
        '(ρ, α) | ours | SAM short (ρ) | SAM short | base long '
        '| ours − SAM short (pp) | ours − base long (pp) |\n'
        '|---|---|---|---|---|---|---|---|')
    for r in rows:
      parts[-1] += (
          f"\n| {r['budget']:.2f} | {r['best']['config']}"
          f"{'' if r.get('chosen', True) else ' †'} "
          f"({_setting(r['best'])}) | {_cell(r['best'])} | "
          f"{_setting(r['short'])} | {_cell(r['short'])} | "
          f"{_cell(r['long'])} | {100 * r['vs_short']['mean']:+.2f} ± "
          f"{100 * r['vs_short']['sem']:.2f} | "
          f"{100 * r['vs_long']['mean']:+.2f} ± "
          f"{100 * r['vs_long']['sem']:.2f} |")
  return '\n\n'.join(parts)


def main(argv=None):
  """Prints the fixed-budget tables of ``--from-json``; the Markdown."""
  parser = argparse.ArgumentParser(prog='python -m '
                                   'benchmarks.label_noise.budget')
  parser.add_argument('--from-json', required=True,
                      help='saved results, comma-separated to pool them')
  parser.add_argument('--ours', default='',
                      help='configurations compared too, semicolon-separated '
                      '(e.g. the recommended one); NAME@RHO,ALPHA holds one '
                      'at that grid radius and alpha')
  parser.add_argument('--seed-list', type=cli.ints, default=None,
                      help='pool only these seeds (e.g. 0-7 of a 24-seed part)')
  args = parser.parse_args(argv)
  result = report.merge_results(args.from_json.split(','), args.seed_list)
  ours = tuple(pin(result, c.strip()) for c in args.ours.split(';')
               if c.strip())
  text = format_budget(budget_rows(result, ours))
  print(text)
  return text


if __name__ == '__main__':
  main()
