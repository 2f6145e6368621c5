"""The report of the label-noise benchmark: markdown tables, pooled parts.

``report`` prints the tables for benchmarks/README.md and draws the figures
(``plots``) from a result: a fresh run's (``cli.main``) or one pooled from
saved JSON files (``merge_results``, ``--from-json``). The tables, per noise
level:

- ``format_tables``: each configuration at the radius (and alpha, where it is
  not 0) chosen on validation: test accuracy, differences paired per seed to
  SAM and to constant p, SAM's gain kept, cost, divergence;
- ``format_sweep``: test (validation) accuracy at every grid radius;
- ``format_stability``: per configuration, where divergence starts;
- ``format_flatness``: the flatness measures at the end of training.

Every number comes from ``stats.summarize``'s summary and the flatness rows;
nothing here is computed from the runs.
"""

import json
import os

import numpy as np

from benchmarks.label_noise import plots, stats


def pct(s, sem=True):
  """A stats dict of accuracies as 'mean ± s.e.' (or ± std) in percent."""
  if not s['n']:
    return '–'
  return (f'{100 * s["mean"]:.2f} ± {100 * (s["sem"] if sem else s["std"]):.2f}')


def _noise(block):
  return f'{100 * block["noise"]:g}% noisy labels'


def format_tables(summary):
  """Markdown: headline rows per noise level, at the chosen radius."""
  parts = []
  for block in summary.values():
    rows = block['rows']
    sam = rows.get('SAM')
    reuse = any(row['alpha'] for row in rows.values())
    lines = [
        f'**{_noise(block)}**, {len(block["seeds"])} seeds; '
        + ('rho and α' if reuse else 'rho') + ' chosen on validation.', '',
        f'| configuration | rho (lam){", α" if reuse else ""} | test acc. % '
        '± s.e. | Δ vs SAM pp | Δ vs constant p pp | SAM gain kept ± s.e. | '
        '× SAM passes | × SAM time | diverged at ρ / in sweep |',
        '|---|---|---|---|---|---|---|---|---|']
    for name, row in rows.items():
      rho = '–' if row['kind'] == 'sgd' else f'{row["rho"]:.3g}'
      if row['lam'] != 1.0:
        rho += f' ({row["lam"]:.3g})'
      if row['alpha']:
        rho += f', α {row["alpha"]:g}'
      kept = row.get('gain_kept')
      kept_s = (f'{kept["mean"]:.2f} ± {kept["sem"]:.2f}'
                if kept and np.isfinite(kept['mean']) else '–')
      if kept and kept.get('weak'):
        kept_s = '– (SAM gain < 3 s.e.: a ratio of noise)'
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
          and row['passes_vs_SAM'] <= 0.6 + 1e-9 and sam_level(row)]
      lines += ['', '- SAM-level test accuracy (≥ SAM − 1 paired s.e.) at '
                "≤ 0.6× SAM's passes: " + (', '.join(goal) if goal
                                            else 'none.')]
    parts.append('\n'.join(lines))
  return '\n\n'.join(parts)


def sam_level(row) -> bool:
  """Whether a row's test accuracy is at least SAM's minus one s.e. of
  the paired (per-seed) difference, with no seed diverged."""
  diff = row.get('diff_vs_SAM')
  return bool(row['diverged'] == 0 and diff and diff['n']
              and diff['mean'] >= -diff['sem'])


def format_recipes(summaries, labels, configs):
  """Markdown: the same configurations under several recipes, side by side.

  One line per noise level and configuration; for each recipe its chosen
  radius (and alpha), test accuracy, difference from SAM with its paired
  s.e., diverged seeds, and whether it is SAM-level (``sam_level``); the last
  column says whether the recipes agree on that.
  """
  head = ' | '.join(f'{label}: ρ, α | {label}: test % | {label}: Δ vs SAM pp '
                    f'| {label}: SAM-level' for label in labels)
  lines = [f'| noise | configuration | {head} | agree |',
           '|---|---|' + '---|' * (4 * len(labels)) + '---|']
  noises = sorted({n for s in summaries for n in s}, key=float)
  for noise in noises:
    for config in configs:
      cells, verdicts = [], []
      for summary in summaries:
        row = summary.get(noise, {}).get('rows', {}).get(config)
        if row is None:
          cells.append('– | not run | – | –')
          continue
        rho = '–' if row['kind'] == 'sgd' else f'{row["rho"]:.3g}'
        if row['alpha']:
          rho += f', {row["alpha"]:g}'
        diff = row.get('diff_vs_SAM')
        diff_s = (f'{100 * diff["mean"]:+.2f} ± {100 * diff["sem"]:.2f}'
                  if diff and diff['n'] and config != 'SAM' else '–')
        level = '–' if config in ('SAM', 'SGD') or not (
            diff and diff['n']) else ('yes' if sam_level(row) else 'no')
        verdicts.append(level)
        if row['diverged']:
          level += f' ({row["diverged"]} diverged)'
        cells.append(f'{rho} | {pct(row["test_acc"])} | {diff_s} | {level}')
      agree = ('–' if len(verdicts) < len(summaries) or '–' in verdicts
               else ('yes' if len(set(verdicts)) == 1 else '**no**'))
      lines.append(f'| {_noise_label(noise)} | {config} | '
                   + ' | '.join(cells) + f' | {agree} |')
  return '\n'.join(lines)


def format_fixed_radius(runs_of, summaries, labels, config):
  """Markdown: ``config`` at every (radius, alpha) it ran at, recipes side
  by side: test accuracy of the seeds that did not diverge, the paired
  difference to SAM at SAM's radius chosen on validation, and the diverged
  seeds. ``runs_of`` holds each recipe's run records."""
  head = ' | '.join(f'{label}: test % | {label}: Δ vs SAM pp (paired) '
                    f'| {label}: diverged' for label in labels)
  lines = [f'| noise | ρ | α | {head} |',
           '|---|---|---|' + '---|' * (3 * len(labels))]
  noises = sorted({n for s in summaries for n in s}, key=float)
  for noise in noises:
    points = sorted({(r['rho_grid'], r['alpha']) for runs in runs_of
                     for r in runs if r['config'] == config
                     and str(r['noise']) == noise})
    for g, alpha in points:
      cells = []
      for runs, summary in zip(runs_of, summaries, strict=True):
        mine = {r['seed']: r for r in runs if r['config'] == config
                and str(r['noise']) == noise and r['rho_grid'] == g
                and r['alpha'] == alpha}
        sam = summary.get(noise, {}).get('rows', {}).get('SAM')
        if not mine:
          cells.append('not run | – | –')
          continue
        seeds = sorted(mine)
        acc = stats.stats(stats.test_of([mine[s] for s in seeds]))
        diff_s = '–'
        if sam is not None:
          at = {r['seed']: r for r in runs if r['config'] == 'SAM'
                and str(r['noise']) == noise
                and r['rho_grid'] == sam['rho_grid']}
          diff = stats.stats(
              np.asarray(stats.test_of([mine[s] for s in seeds]))
              - np.asarray(stats.test_of([at[s] for s in seeds])))
          diff_s = (f'{100 * diff["mean"]:+.2f} ± {100 * diff["sem"]:.2f} '
                    f'(SAM ρ {sam["rho"]:.3g})' if diff['n'] else '–')
        bad = sum(r['status'] != 'ok' for r in mine.values())
        cells.append(f'{pct(acc)} | {diff_s} | {bad} of {len(mine)}')
      lines.append(f'| {_noise_label(noise)} | {g:g} | {alpha:g} | '
                   + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _noise_label(noise):
  return f'{100 * float(noise):.0f}%'


def format_sweep(summary):
  """Markdown: test accuracy (diverged seeds) at every radius of the grid.

  One line per configuration and alpha (``stats.label``).
  """
  parts = []
  for block in summary.values():
    sweep = [s for s in block['sweep'] if s['config'] != 'SGD']
    grid = sorted({s['rho_grid'] for s in sweep})
    lines = [f'**{_noise(block)}**: test acc. % at each '
             'grid radius (val. acc. in brackets; ✗n = n diverged seeds)', '',
             '| configuration | ' + ' | '.join(f'{g:g}' for g in grid) + ' |',
             '|---|' + '---|' * len(grid)]
    for config, alpha in dict.fromkeys((s['config'], s['alpha'])
                                       for s in sweep):
      at = {s['rho_grid']: s for s in sweep if s['config'] == config
            and s['alpha'] == alpha}
      cells = []
      for g in grid:
        s = at.get(g)
        if s is None:
          cells.append('')
          continue
        cell = (f'{100 * s["test_acc"]["mean"]:.1f} '
                f'({100 * s["val_acc"]["mean"]:.1f})'
                if s['test_acc']['n'] else '–')
        if s['diverged']:
          cell += f' ✗{s["diverged"]}'
        cells.append(cell)
      lines.append(f'| {stats.label(config, alpha)} | ' + ' | '.join(cells)
                   + ' |')
    parts.append('\n'.join(lines))
  return '\n\n'.join(parts)


def format_stability(summary):
  """Markdown: per configuration (with its lam), where divergence starts."""
  keys = list(summary)
  table = stats.stability(summary)
  lines = ['| configuration | λ | ' + ' | '.join(
      f'{100 * summary[k]["noise"]:g}% noise' for k in keys) + ' |',
           '|---|---|' + '---|' * len(keys)]
  lams = {stats.label(s['config'], s['alpha']): s['lam']
          for b in summary.values() for s in b['sweep']}
  for name, by_noise in table.items():
    cells = []
    for k in keys:
      if k not in by_noise:
        cells.append('')
        continue
      ok, first, n = by_noise[k]
      cells.append((f'stable to {ok:g}' if ok is not None else 'none stable')
                   + (f'; diverged from {first:g} ({n})' if first is not None
                      else '; none diverged'))
    lines.append(f'| {name} | {lams[name]:.3g} | ' + ' | '.join(cells)
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
      rho = format(row['rho'], '.3g') if row.get('rho') else '–'
      if row.get('alpha'):
        rho += f', α {row["alpha"]:g}'
      lines.append(
          f'| {100 * float(noise):g}% | {name} | {rho} | '
          f'{mean_sem(row["lambda_max"])} | '
          f'{mean_sem(row["eps_sharpness"])} (at {block["radius"]:g}) | '
          f'{mean_sem(row.get("eps_sharpness_own", {}))} | '
          f'{row["train_loss"]["mean"]:.3g} | {pct(row["test_acc"])} |')
  return '\n'.join(lines)


def title_of(settings):
  """One line of the recipe, from a result's settings."""
  if settings.get('model') == 'transformer':
    model = (f'the pre-LN transformer, AdamW (weight decay '
             f'{settings["weight_decay"]}), warmup-cosine lr {settings["lr"]} '
             f'({settings["warmup_epochs"]} epochs of warmup)')
  else:
    model = (f'1-D CNN width {settings["width"]}, SGD momentum 0.9, cosine lr '
             f'{settings["lr"]}')
  return (
      f'MNIST-1D ({settings["n_train"]} train incl. noisy labels, '
      f'{settings["n_val"]} clean val., {settings["n_test"]} clean test), '
      f'{model}, batch {settings["batch_size"]}, {settings["epochs"]} '
      f'epochs ({settings["total_steps"]} steps), {settings["seeds"]} seeds, '
      f'rho grid {settings["rhos"]}, mean p {settings["p"]}')


def _run_lines(result):
  """The machine, load and run time of a result (and of each part)."""
  machine, load = result['machine'], result['load_average']
  lines = [f'Machine: {machine["cpu"]}, {machine["cores"]} cores, jax '
           f'{machine["jax"]}; load average (1 min) {load["start"][0]:.2f} at '
           f'start, {load["end"][0]:.2f} at end; '
           f'{result["elapsed_s"] / 60:.1f} min in all with '
           f'{result["settings"]["workers"]} worker(s).']
  lines += [f'  part {part["file"]}: {part["elapsed_s"] / 60:.1f} min, load '
            f'{part["load_average"]["start"][0]:.2f} -> '
            f'{part["load_average"]["end"][0]:.2f}: {part["command"]}'
            for part in result.get('parts', [])]
  return lines


def markdown(result, name):
  """The whole report of a result as one Markdown page (``{name}.md``)."""
  summary, flat = result['summary'], result.get('flatness', {})
  parts = result.get('parts', [])
  target = ('transformer-report' if result['settings'].get('model')
            == 'transformer' else 'label-noise-report')
  out = [f'# Label noise: full results ({name})', '',
         f'Generated by `python -m benchmarks.label_noise --from-json ...` '
         f'(`make {target}`) from `{name}.json`; do not edit. '
         f'Recipe: {title_of(result["settings"])}.', '',
         '## Run', '']
  out += _run_lines(result)[:1] + ['', 'The machine above is the first '
                                    "part's; the table gives each part's."]
  out += ['', f'{len(result["runs"])} run records in all (a run present in '
          'two parts counted once).']
  if parts:
    out += ['', '| part | minutes | run records | machine | load (1 min) '
            'start → end |', '|---|---:|---:|---|---|']
    out += [f'| `{os.path.basename(part["file"])}` | '
            f'{part["elapsed_s"] / 60:.1f} | {part.get("runs", "–")} | '
            f'{part.get("cpu", "–")} | '
            f'{part["load_average"]["start"][0]:.2f} → '
            f'{part["load_average"]["end"][0]:.2f} |' for part in parts]
    out += ['', 'The commands of the parts, in that order:', '', '```sh']
    out += [part['command'] for part in parts] + ['```']
  else:
    out += ['', f'Command: `{result["settings"]["command"]}`']
  out += ['', '## Test accuracy at the radius chosen on validation', '',
          format_tables(summary), '',
          '## The whole sweep', '', format_sweep(summary), '',
          '## Stability: where divergence starts', '',
          'Per configuration: the largest grid radius below the first one '
          'where any seed diverged, and how many seeds did there (grid '
          'radii; SAM-equivalent for the scaled kinds).', '',
          format_stability(summary)]
  if flat:
    out += ['', '## Flatness', '', format_flatness(flat)]
    if result.get('flatness_note'):
      out += ['', f'Flatness: {result["flatness_note"]}.']
  return '\n'.join(out) + '\n'


def report(result, out, name):
  """Draws ``{name}.png`` and ``{name}_flatness.png``, writes ``{name}.md``
  (``markdown``); prints the tables."""
  summary, flat = result['summary'], result.get('flatness', {})
  plots.plot(summary, flat, os.path.join(out, f'{name}.png'),
             os.path.join(out, f'{name}_flatness.png'),
             title_of(result['settings']))
  with open(os.path.join(out, f'{name}.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(result, name))
  print('\n' + format_tables(summary) + '\n')
  print(format_sweep(summary) + '\n')
  print('Stability (grid radii; SAM-equivalent for the scaled kinds):\n\n'
        + format_stability(summary) + '\n')
  print(format_flatness(flat) + '\n')
  if result.get('flatness_note'):
    print(f'Flatness: {result["flatness_note"]}.')
  print('\n'.join(_run_lines(result)))
  print(f'Command: {result["settings"]["command"]}')


def merge_results(paths, seeds=None):
  """One result from saved JSONs: parts with other radii, budgets or kinds.

  The parts must share the recipe; they may have run other seeds (a part with
  ``--seed-list 3,4,5,6,7`` extends one of 3 seeds), but every configuration
  must then have run every pooled seed, so that the pairing holds. Their runs
  are pooled (a run
  already present, same noise, seed, configuration, radius and alpha, is kept
  from the first file) and summarized again, so each configuration's radius
  (and alpha) is chosen on validation over its pooled grid. Runs of files
  older than alpha have alpha 0. Flatness is pooled per noise level and
  configuration (first file first); each part measured it at the radius it
  had chosen, which the rows record. ``seeds``: keep only these seeds' runs
  (to pair a part of 24 seeds with parts of 8).
  """
  results = []
  for path in paths:
    with open(path) as f:
      result = json.load(f)
    result['runs'] = stats.with_alpha(
        [r for r in result['runs'] if seeds is None or r['seed'] in seeds])
    results.append(result)
  if len(results) == 1:  # summarized again, by this version of the script
    return results[0] | {'summary': stats.summarize(results[0]['runs'])}
  first = results[0]
  keep = ('model', 'weight_decay', 'warmup_epochs', 'epochs', 'lr',
          'batch_size', 'width', 'num_samples', 'val_size', 'total_steps',
          'flat_n', 'flat_iters', 'flat_steps', 'flat_radius')
  seen, runs, flat = set(), [], {}

  def setting(result, k):  # files older than --model are the CNN's
    if k == 'model':
      return result['settings'].get('model', 'cnn')
    if setting(result, 'model') == 'cnn' and k in ('weight_decay',
                                                   'warmup_epochs'):
      return None  # AdamW's settings, unused by the CNN
    return result['settings'].get(k)

  for path, result in zip(paths, results, strict=True):
    for k in keep:
      if setting(result, k) != setting(first, k):
        raise ValueError(f'--from-json: {k} differs between the files: '
                         f'{setting(first, k)} and {setting(result, k)} '
                         f'({path}).')
    for r in result['runs']:
      key = (r['noise'], r['seed'], r['config'], r['rho_grid'], r['alpha'])
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

  seeds_of, grid = {}, {}
  for r in runs:
    seeds_of.setdefault(r['noise'], set()).add(r['seed'])
    grid.setdefault((r['noise'], r['config'], r['rho_grid'], r['alpha']),
                    set()).add(r['seed'])
  for (noise, config, rho, alpha), seeds in sorted(grid.items()):
    if seeds != seeds_of[noise]:
      missing = sorted(seeds_of[noise] - seeds)
      raise ValueError(
          f'--from-json: {config} (noise {noise}, radius {rho}, alpha '
          f'{alpha}) has no run for seeds {missing}; pooled parts must run '
          'every configuration on the same seeds (the pairing).')

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
      'seeds': len({r['seed'] for r in runs}),
      'seed_list': sorted({r['seed'] for r in runs}),
      'command': ' + '.join(r['settings']['command'] for r in results),
      'merged_from': list(paths)}
  merged['parts'] = [{'file': path, 'command': r['settings']['command'],
                      'elapsed_s': r['elapsed_s'], 'runs': len(r['runs']),
                      'cpu': r.get('machine', {}).get('cpu', '–'),
                      'load_average': r['load_average']}
                     for path, r in zip(paths, results, strict=True)]
  merged['runs'] = runs
  merged['summary'] = stats.summarize(runs)
  merged['flatness'] = flat
  merged['elapsed_s'] = sum(r['elapsed_s'] for r in results)
  merged['load_average'] = {'start': first['load_average']['start'],
                            'end': results[-1]['load_average']['end']}
  merged['flatness_note'] = (
      'flatness is measured by each part at the radius that part chose; '
      'the rows give it')
  return merged
