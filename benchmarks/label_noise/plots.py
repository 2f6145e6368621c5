"""The figures of the label-noise benchmark, legible at page width.

Both figures have one row of panels per noise level and one column per budget
(mean probability p of a SAM step), so that no panel has more than the kinds
run at one budget:

- ``plot_headline``: each configuration at the radius chosen on validation,
  the fraction of SAM's gain over SGD it keeps (paired per seed, ± s.e.),
  one line per kind, with the radius (and alpha) written by the point. Where
  SAM's gain over SGD is under 3 s.e. (the clean regime), the row shows the
  paired difference to SAM's test accuracy instead; a part without SGD and
  SAM shows test accuracy. The sweep over the radius grid is a table
  (``report.format_sweep``);
- ``plot_flatness``: test accuracy against the top Hessian eigenvalue of the
  training loss, for SGD, SAM and the configurations measured at that budget.

The figures read from ``stats.summarize``'s summary and the flatness rows.
"""

import textwrap

import numpy as np

from benchmarks.label_noise import kinds

WIDTH = 8.0  # inches: drawn for a page about 750 px wide (text >= 12 px)
DPI = 150
SGD_COLOR, SAM_COLOR, RUN_COLOR = 'C0', 'C1', 'C2'
# The kinds' colours in the flatness figure: none is SGD's or SAM's.
KIND_COLORS = ('C2', 'C3', 'C4', 'C5', 'C6', 'C7', 'C8', 'C9', 'black',
               '#8c6d31', '#393b79', '#e7969c')


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  plt.rcParams.update({'font.size': 11, 'axes.titlesize': 11,
                       'axes.labelsize': 11, 'legend.fontsize': 10.5})
  return plt


def _budgets(summary):
  """The mean probabilities p of the kinds, largest (dearest) first."""
  return sorted({row['p'] for block in summary.values()
                 for row in block['rows'].values()
                 if row['kind'] in kinds.KINDS}, reverse=True)


def _budget_title(p):
  return f"p = {p:g}\n{(1 + p) / 2:.3g}× SAM's passes"


def _measure(block):
  """What a row of the headline shows: 'gain', 'diff' (to SAM) or 'acc'."""
  rows = block['rows'].values()
  if any(r.get('gain_kept', {}).get('weak') for r in rows):
    return 'diff'
  if any('gain_kept' in r for r in rows):
    return 'gain'
  return 'diff' if any('diff_vs_SAM' in r for r in rows) else 'acc'


def _value(row, measure):
  """The point and its error bar for ``row``: NaN where there is none."""
  if measure == 'gain':
    s = row.get('gain_kept', {})
    return s.get('mean', np.nan), s.get('sem', np.nan)
  s = row.get('diff_vs_SAM' if measure == 'diff' else 'test_acc')
  if not s or not s['n']:
    return np.nan, np.nan
  return 100 * s['mean'], 100 * s['sem']


def _note(row):
  """The radius (lam when scaled, alpha where not 0) and divergence."""
  text = f'ρ {row["rho"]:.3g}'
  if row['alpha']:
    text += f', α {row["alpha"]:g}'
  if row['diverged']:
    text += f', ✗{row["diverged"]}'
  return text


def plot_headline(summary, path, title):
  """Gain kept per kind at the chosen radius: noise levels x budgets."""
  plt = _pyplot()
  budgets = _budgets(summary)
  blocks = [b for b in summary.values()
            if any(r['kind'] in kinds.KINDS for r in b['rows'].values())]
  if not blocks:
    return
  heights = [0.9 + 0.4 * len({r['kind'] for r in b['rows'].values()
                               if r['kind'] in kinds.KINDS}) for b in blocks]
  fig = plt.figure(figsize=(WIDTH, sum(heights) + 0.6), dpi=DPI,
                   layout='constrained')
  subfigs = fig.subfigures(len(blocks), 1, height_ratios=heights,
                           squeeze=False)[:, 0]
  for subfig, block in zip(subfigs, blocks, strict=True):
    rows = block['rows']
    measure = _measure(block)
    names = [k for k in kinds.KINDS if any(r['kind'] == k
                                           for r in rows.values())]
    axes = subfig.subplots(1, len(budgets), sharex=True, sharey=True,
                           squeeze=False)[0]
    what = {'gain': "fraction of SAM's gain over SGD kept",
            'diff': "test accuracy − SAM's, points (SAM's gain < 3 s.e.)",
            'acc': 'test accuracy, %'}[measure]
    subfig.suptitle(f'{100 * block["noise"]:g}% noisy labels: {what}',
                    fontsize=12, x=0.01, ha='left')
    refs = {}
    if 'SAM' in rows and measure != 'acc':
      refs['SAM'] = 1.0 if measure == 'gain' else 0.0
    if 'SGD' in rows and measure != 'acc':
      refs['SGD'] = _value(rows['SGD'], measure)[0]
    for ax, p in zip(axes, budgets, strict=True):
      drawn = False
      for name, x in refs.items():
        ax.axvline(x, color=SAM_COLOR if name == 'SAM' else SGD_COLOR,
                   lw=1, ls='--', zorder=1)
      for i, kind in enumerate(names):
        row = next((r for r in rows.values() if r['kind'] == kind
                    and r['p'] == p), None)
        if row is None:
          continue
        drawn = True
        x, err = _value(row, measure)
        if not np.isfinite(x):
          continue
        ax.errorbar(x, i, xerr=err if np.isfinite(err) else None,
                    fmt=kinds.KINDS[kind].marker, color=RUN_COLOR, ms=5,
                    capsize=2, mfc='white' if row['diverged'] else RUN_COLOR,
                    zorder=3)
        ax.annotate(_note(row), (x, i), xytext=(0, 4.5),
                    textcoords='offset points', ha='center', va='bottom',
                    fontsize=9.5)
      if not drawn:
        ax.text(0.5, 0.5, 'not run', transform=ax.transAxes, ha='center',
                va='center', color='0.5')
      ax.set_title(_budget_title(p))
      ax.set_yticks(range(len(names)),
                    [kinds.KINDS[k].label for k in names])
      ax.set_ylim(len(names) - 0.4, -0.75)
      ax.grid(axis='x', alpha=0.3)
      ax.tick_params(axis='y', length=0)
  handles = [plt.Line2D([], [], color=SAM_COLOR, ls='--', label='SAM'),
             plt.Line2D([], [], color=SGD_COLOR, ls='--', label='SGD'),
             plt.Line2D([], [], color=RUN_COLOR, marker='o', ls='',
                        label='mean ± s.e. over seeds, paired'),
             plt.Line2D([], [], color=RUN_COLOR, marker='o', mfc='white',
                        ls='', label='✗n: n seeds diverged at that ρ')]
  fig.legend(handles=handles, loc='outside lower center', ncol=4,
             frameon=False)
  fig.suptitle(textwrap.fill(title, 100), fontsize=10)
  fig.savefig(path)
  plt.close(fig)


def plot_flatness(summary, flat, path):
  """Test accuracy against the top Hessian eigenvalue: noise x budgets.

  SGD and SAM in every panel; each kind in one colour and marker throughout,
  named in the legend below. The radii are in ``report.format_flatness``.
  """
  plt = _pyplot()
  import matplotlib.ticker
  blocks = sorted(flat.items(), key=lambda kv: float(kv[0]))
  budgets = _budgets(summary)
  kind_of = {(noise, name): summary[noise]['rows'][name]
             for noise, block in blocks if noise in summary
             for name in block['configs'] if name in summary[noise]['rows']}
  measured = {row['kind'] for row in kind_of.values()}
  style = {'sgd': (SGD_COLOR, 'o', 'SGD'), 'sam': (SAM_COLOR, '*', 'SAM')}
  for i, kind in enumerate(k for k in kinds.KINDS if k in measured):
    style[kind] = (KIND_COLORS[i % len(KIND_COLORS)], kinds.KINDS[kind].marker,
                   kinds.KINDS[kind].label)
  fig, axes = plt.subplots(
      len(blocks), len(budgets), figsize=(WIDTH, 1.2 + 2.6 * len(blocks)),
      dpi=DPI, squeeze=False, sharex='row', sharey='row',
      layout='constrained')
  for ax_row, (noise, block) in zip(axes, blocks, strict=True):
    for ax, p in zip(ax_row, budgets, strict=True):
      for name, row in block['configs'].items():
        info = kind_of.get((noise, name), {'kind': name, 'p': None})
        if info['kind'] in kinds.KINDS and info['p'] != p:
          continue
        color, marker, _ = style.get(info['kind'], ('k', 'x', name))
        lam, acc = row['lambda_max'], row['test_acc']
        if lam.get('n') and acc.get('n'):
          ax.errorbar(lam['mean'], 100 * acc['mean'], xerr=lam['sem'],
                      yerr=100 * acc['sem'], fmt=marker, color=color, ms=6,
                      capsize=2)
      ax.set_xscale('log')
      ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(
          subs=(1.0, 2.0, 5.0)))
      ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
          lambda v, _: f'{v:g}'))
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      ax.grid(alpha=0.3)
    ax_row[0].set_ylabel(f'{100 * float(noise):g}% noisy labels\n'
                         'test accuracy, %')
  for ax, p in zip(axes[0], budgets, strict=True):
    ax.set_title(_budget_title(p))
  for ax in axes[-1]:
    ax.set_xlabel('top Hessian eigenvalue')
  handles = [plt.Line2D([], [], color=c, marker=m, ls='', label=text)
             for c, m, text in style.values()]
  fig.legend(handles=handles, loc='outside lower center', ncol=3,
             frameon=False)
  fig.suptitle('Flatness at the end of training against test accuracy,\n'
               'mean ± s.e. over seeds (SGD and SAM in every panel)',
               fontsize=12)
  fig.savefig(path)
  plt.close(fig)


def plot(summary, flat, path, flat_path, title):
  """The headline figure to ``path``, and the flatness one (if measured)."""
  plot_headline(summary, path, title)
  if flat:
    plot_flatness(summary, flat, flat_path)
