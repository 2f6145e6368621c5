"""The configurations of the label-noise benchmark: a table of kinds.

A kind is a way to spend a budget of SAM steps, at any mean probability p of
a SAM step: a schedule p(t), a lam, a scale of the radius, and whether it has
a reuse strength alpha to choose on validation together with the radius.
``KINDS`` is the table (``--kinds`` chooses from it); adding a kind is one
entry there. ``make_configs`` crosses the kinds with the budgets ``--p``,
after the baselines SGD and SAM; ``schedule_of``, ``lam_of`` and ``grid_of``
give each configuration's p(t), lam and the (radius, alpha) pairs it runs at.

The kinds:

- ``rst``: constant p, lam = 1 (plain RST);
- ``grst``: constant p, lam = ``schedules.matching_lam`` (1 / p);
- ``rst_rho``: constant p, lam = 1, rho scaled by 1 / p (SAM's strength
  matched through the radius instead of lam);
- ``linear``, ``trigonometric``: rising p(t) (``schedules.family``), lam = 1;
- ``late``: SGD, then SAM on the last p of the run (family ``piecewise``);
- ``early``: SAM on the first p of the run, then SGD;
- ``every_k_lam``: a SAM step every k = 1 / p steps, deterministic, lam = k
  (the scaling of init2winit's ``factor_sam``);
- ``every_k_rho``: the same steps, rho scaled by k (Composer's SAM);
- ``reuse``: constant p, lam = 1, ``rst(..., reuse=alpha)``: base steps reuse
  the direction of the last SAM step (LookSAM's update on RST's coin);
- ``reuse_fresh``: the same, but a base step reuses only while the last SAM
  step is at most k = 1 / p steps old (the staleness bound,
  ``rst(..., reuse_window=k)``; before that option, alpha was set to 0 on
  the other steps from the host's plan: the same bits);
- ``looksam``: a SAM step every k = 1 / p steps, lam = 1, with reuse
  (LookSAM: ``schedules.periodic(k)`` and ``reuse=alpha``);
- ``sam_short``: SAM for (1 + p) / 2 of the steps, its learning-rate
  schedule compressed to that length: the same gradient evaluations as the
  kinds at p (the fixed-budget baseline);
- ``base_long``: the base optimizer (SGD or AdamW) for 1 + p times the
  steps, its schedule stretched: the same gradient evaluations again.
- ``looksam_warm1``, ``looksam_warm5``: LookSAM whose alpha rises linearly
  from 0 over the first 1 (5) epochs' steps,
  ``reuse=optax.linear_schedule(0.0, alpha, k)`` (``reuse_schedule``; the
  per-step alpha passed from the host is that schedule's value at each step,
  ``alpha_steps``);
- ``looksam_delay5``: LookSAM with no reuse in the first 5 epochs' steps,
  then alpha;
- ``looksam_warm5_rho``: LookSAM whose alpha and rho both rise linearly from
  0 over the first 5 epochs' steps (``rho=optax.linear_schedule(0.0, rho,
  k)`` too, ``rho_schedule``).

The kinds with reuse run at every alpha of ``--alphas`` and are not run by
default (``DEFAULT_KINDS``).

For the scaled kinds the radius grid gives the SAM-equivalent radius, which is
then scaled. A kind without reuse runs at alpha = 0 only.
"""

from typing import NamedTuple


class Kind(NamedTuple):
  """One way to spend a budget, at any mean probability p of a SAM step."""
  label: str  # the configurations are named f'{label} p={p:g}'
  schedule: str  # p(t): 'never', 'always', 'constant', 'linear',
  # 'trigonometric', 'late', 'early' or 'periodic' (every k = 1 / p steps)
  lam: str = '1'  # '1', 'matching' (schedules.matching_lam) or 'k'
  rho_scale: str = '1'  # actual radius = grid radius x '1', '1/p' or 'k'
  reuse: bool = False  # alpha chosen on validation together with rho
  fresh: bool = False  # reuse only up to k = 1 / p steps after a SAM step
  steps: str = '1'  # run length over the recipe's: '1', '(1+p)/2' or '1+p'
  marker: str = 'o'  # in the plots
  warmup: float = 0.0  # epochs over which alpha rises linearly from 0
  delay: float = 0.0  # epochs without reuse at the start
  rho_warmup: bool = False  # rho rises linearly from 0 over the warm-up too


BASELINES = {
    'sgd': Kind('SGD', 'never'),
    'sam': Kind('SAM', 'always', marker='*'),
}
KINDS = {
    'rst': Kind('RST', 'constant'),
    'grst': Kind('G-RST', 'constant', lam='matching', marker='s'),
    'rst_rho': Kind('RST rho/p', 'constant', rho_scale='1/p', marker='P'),
    'linear': Kind('RST linear', 'linear', marker='^'),
    'trigonometric': Kind('RST trigonometric', 'trigonometric', marker='v'),
    'late': Kind('RST late (SGD then SAM)', 'late', marker='>'),
    'early': Kind('RST early (SAM then SGD)', 'early', marker='<'),
    'every_k_lam': Kind('every k, lam x k', 'periodic', lam='k', marker='D'),
    'every_k_rho': Kind('every k, rho x k', 'periodic', rho_scale='k',
                        marker='d'),
    'reuse': Kind('RST + reuse', 'constant', reuse=True, marker='X'),
    'reuse_fresh': Kind('RST + reuse <= k steps', 'constant', reuse=True,
                        fresh=True, marker='x'),
    'looksam': Kind('LookSAM (every k + reuse)', 'periodic', reuse=True,
                    marker='h'),
    'sam_short': Kind('SAM short', 'always', steps='(1+p)/2', marker='*'),
    'base_long': Kind('base long', 'never', steps='1+p', marker='.'),
    'looksam_warm1': Kind('LookSAM, alpha warm-up 1 epoch', 'periodic',
                          reuse=True, marker='H', warmup=1.0),
    'looksam_warm5': Kind('LookSAM, alpha warm-up 5 epochs', 'periodic',
                          reuse=True, marker='H', warmup=5.0),
    'looksam_delay5': Kind('LookSAM, no reuse for 5 epochs', 'periodic',
                           reuse=True, marker='8', delay=5.0),
    'looksam_warm5_rho': Kind('LookSAM, alpha and rho warm-up 5 epochs',
                              'periodic', reuse=True, marker='p', warmup=5.0,
                              rho_warmup=True),
}
DEFAULT_KINDS = tuple(name for name, kind in KINDS.items() if not kind.reuse)


def spec(kind: str) -> Kind:
  """The entry of ``kind``: SGD's, SAM's or one of ``KINDS``."""
  return BASELINES[kind] if kind in BASELINES else KINDS[kind]


class Config(NamedTuple):
  """One configuration: a kind at a budget, without its radius and alpha."""
  name: str
  kind: str  # 'sgd', 'sam' or a key of KINDS
  p: float  # nominal mean probability of a SAM step (SGD 0, SAM 1)
  rho_scale: float  # actual radius = grid radius x rho_scale
  k: int | None  # period of the periodic kinds (and the fresh bound)
  step_scale: float = 1.0  # run length over the recipe's (steps of Kind)


def make_configs(args) -> list[Config]:
  """SGD and SAM (with ``--baselines``; SGD alone with ``--no-sam``), then
  every kind at every budget."""
  out = [Config('SGD', 'sgd', 0.0, 0.0, None),
         Config('SAM', 'sam', 1.0, 1.0, None)] if args.baselines else []
  if not getattr(args, 'sam', True):
    out = [c for c in out if c.kind != 'sam']
  for p in args.p:
    k = round(1.0 / p)
    for name in args.kinds:
      kind = KINDS[name]
      scale = {'1': 1.0, '1/p': 1.0 / p, 'k': float(k)}[kind.rho_scale]
      out.append(Config(f'{kind.label} p={p:g}', name, p, scale,
                        k if kind.schedule == 'periodic' or kind.fresh
                        else None, step_scale(kind, p)))
  return out


def step_scale(kind: Kind, p: float) -> float:
  """The run length of ``kind`` at budget p over the recipe's length."""
  return {'1': 1.0, '(1+p)/2': (1.0 + p) / 2.0, '1+p': 1.0 + p}[kind.steps]


def steps_of(config: Config, total_steps: int) -> int:
  """The number of steps ``config`` runs, the recipe running ``total_steps``."""
  return max(1, round(config.step_scale * total_steps))


def schedule_of(config: Config, total_steps: int):
  """p(t) of ``config`` (a float or an optax.Schedule) and a hashable key.

  Two configurations with the same key take the same steps for a seed.
  """
  from rst_optax import schedules
  p, schedule = config.p, spec(config.kind).schedule
  if schedule == 'never':
    return 0.0, ('sgd',)
  if schedule == 'always':
    return 1.0, ('sam',)
  if schedule in ('constant', 'linear', 'trigonometric'):
    return schedules.family(schedule, p, total_steps), (schedule, p)
  if schedule == 'late':
    return schedules.family('piecewise', p, total_steps), ('late', p)
  if schedule == 'early':
    return schedules.piecewise(1.0, 0.0, round(p * total_steps)), ('early', p)
  return schedules.periodic(config.k), ('every', config.k)


def lam_of(config: Config, schedule, total_steps: int) -> float:
  """The lam of ``config`` whose p(t) is ``schedule``."""
  from rst_optax import schedules
  lam = spec(config.kind).lam
  if lam == 'matching':
    return schedules.matching_lam(schedule, total_steps)
  if lam == 'k':
    return float(config.k)
  return 1.0


def grid_of(config: Config, rhos, alphas=(0.0,)):
  """The (grid radius, alpha) pairs ``config`` runs at, alpha first.

  SGD (and ``base_long``) runs once, at (0, 0). A kind without reuse runs
  at every radius of ``rhos`` with alpha = 0; a kind with reuse at every
  pair of ``rhos`` and ``alphas``.
  """
  if spec(config.kind).schedule == 'never':  # SGD and base_long: no radius
    return [(0.0, 0.0)]
  alphas = alphas if spec(config.kind).reuse else (0.0,)
  return [(rho, alpha) for alpha in alphas for rho in rhos]


def longest_gap(plan) -> int:
  """The longest run of base steps in ``plan`` after its first SAM step."""
  import numpy as np
  idx = np.flatnonzero(np.asarray(plan, bool))
  if not len(idx):
    return 0
  gaps = np.diff(np.append(idx, len(plan))) - 1
  return int(gaps.max())


def reuse_schedule(kind: str, alpha: float, steps_per_epoch: int):
  """The ``reuse`` of ``kind`` at strength ``alpha``: the float ``alpha``, or
  the optax schedule of its warm-up or delay, with its length in steps.

  Returns ``(reuse, steps)``: ``steps`` is 0 for a constant ``alpha``. The
  warm-up is ``optax.linear_schedule(0.0, alpha, steps)``, the delay
  ``optax.join_schedules`` of 0 for ``steps`` steps and then ``alpha``, as a
  user would pass them to ``rst(..., reuse=...)``.
  """
  import optax
  entry = spec(kind)
  if entry.warmup and entry.delay:
    raise ValueError(f'kind {kind!r}: a warm-up or a delay, not both.')
  if entry.warmup:
    steps = max(1, round(entry.warmup * steps_per_epoch))
    return optax.linear_schedule(0.0, alpha, steps), steps
  if entry.delay:
    steps = max(1, round(entry.delay * steps_per_epoch))
    return optax.join_schedules([optax.constant_schedule(0.0),
                                 optax.constant_schedule(alpha)], [steps]), steps
  return alpha, 0


def rho_schedule(kind: str, rho: float, steps_per_epoch: int):
  """The ``rho`` of ``kind``: the float ``rho``, or, for a kind with
  ``rho_warmup``, ``optax.linear_schedule(0.0, rho, steps)`` over its
  warm-up; with the length in steps (0 for a constant)."""
  import optax
  entry = spec(kind)
  if not entry.rho_warmup:
    return rho, 0
  steps = max(1, round(entry.warmup * steps_per_epoch))
  return optax.linear_schedule(0.0, rho, steps), steps


def alpha_steps(reuse, total_steps: int):
  """The alpha of every step 0 .. ``total_steps`` - 1, float32, as ``rst``
  evaluates ``reuse`` at its step count (a float: that float everywhere).

  The host passes these to the jitted step, which gives ``rst`` the step's
  value as a constant ``reuse``: the same alpha as ``rst(..., reuse=reuse)``
  computes at each step (tests/test_label_noise.py checks the updates
  bit for bit).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  if not callable(reuse):
    return np.full(total_steps, reuse, np.float32)
  # One jitted call per step on an int32 scalar count, as rst evaluates it
  # (a vectorized evaluation may differ in the last bit).
  at = jax.jit(lambda c: jnp.asarray(reuse(c), jnp.float32))
  return np.asarray([at(jnp.int32(t)) for t in range(total_steps)],
                    np.float32)
