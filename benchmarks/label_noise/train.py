"""The training stage of the label-noise benchmark: runs, jobs and flatness.

A job is one (noise level, seed): the seed's noisy labels
(``corrupt_labels``), initialization and data order, shared by every
configuration, radius and alpha the job trains (``run_job``), so that
differences between configurations are paired per seed. A run whose loss
turns NaN or Inf stops there; one whose test accuracy ends at chance level
also counts as diverged (``stats.run_status``).

The branch of every step is decided on the host with ``rst_optax.decisions``
(the coin of ``rst``) and passed to one jitted train step as a static
``take_sam``, where rho and lam are traced arguments: all runs of a process
share two executables (``build_trainer``).

Flatness at the end of training (``measure_flatness``), for SGD, SAM and the
best ``--flat-top`` configurations: the top Hessian eigenvalue of the training
loss and its epsilon-sharpness at a common radius and at the run's own radius
(``rst_optax.sharpness``), on the first ``--flat-n`` training samples with
the labels they were trained on.
"""

import functools
import time

import numpy as np

from benchmarks.label_noise import kinds, stats


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


def make_model(args, length, seed):
  """The ``--model`` network of a run, initialized from ``seed``."""
  from flax import nnx
  if getattr(args, 'model', 'cnn') == 'transformer':
    from benchmarks.label_noise import transformer
    return transformer.Transformer(length, nnx.Rngs(seed))
  from examples import mnist1d_demo as demo
  return demo.CNN(args.width, length, nnx.Rngs(seed))


def recipe_of(args, steps_per_epoch):
  """The base optimizer of ``--model``, hashable (``build_trainer``'s).

  CNN: ``('sgd',)``, SGD with momentum 0.9 and a cosine decay from
  ``--lr``. Transformer: ``('adamw', weight_decay, warmup_steps)``,
  ``optax.adamw`` (decoupled weight decay) with a linear warmup over
  ``--warmup-epochs`` then a cosine decay.
  """
  if getattr(args, 'model', 'cnn') == 'transformer':
    return ('adamw', float(args.weight_decay),
            round(args.warmup_epochs * steps_per_epoch))
  return ('sgd',)


def learning_rate(recipe, total_steps, lr, recipe_steps=None):
  """The learning-rate schedule of ``recipe`` over a run of ``total_steps``.

  ``recipe_steps``: the length the recipe was set for (default
  ``total_steps``); a shorter or longer run (``kinds.steps_of``) compresses
  or stretches the whole schedule, AdamW's warmup included, by
  ``total_steps / recipe_steps``.
  """
  import optax
  if recipe[0] == 'adamw':
    scale = total_steps / (recipe_steps or total_steps)
    warmup = min(round(recipe[2] * scale), total_steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps)
  return optax.cosine_decay_schedule(lr, total_steps)


def base_optimizer(recipe, total_steps, lr, recipe_steps=None):
  """The base optimizer of ``recipe`` with ``learning_rate``'s schedule."""
  import optax
  schedule = learning_rate(recipe, total_steps, lr, recipe_steps)
  if recipe[0] == 'adamw':
    return optax.adamw(schedule, weight_decay=recipe[1])
  return optax.sgd(schedule, momentum=0.9)


@functools.cache
def build_trainer(graphdef, total_steps, lr, recipe=('sgd',),
                  recipe_steps=None):
  """The jitted train step and evaluation, shared by every run of a process.

  Cached: the jobs of a process with the same model, run length, learning
  rate and base recipe (``recipe_of``) reuse the compiled executables; a
  configuration that runs another number of steps gets its own.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import rst_optax

  base = base_optimizer(recipe, total_steps, lr, recipe_steps)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def make_tx(schedule, rho, lam, seed, alpha=0.0, window=None):
    return rst_optax.rst(base, schedule, rho=rho, lam=lam, seed=seed,
                         reuse=alpha, reuse_window=window)

  @functools.partial(jax.jit,
                     static_argnames=('take_sam', 'reusing', 'window'))
  def train_step(params, opt_state, rho, lam, alpha, x, y, idx, take_sam,
                 reusing, window=None):
    xb, yb = x[idx], y[idx]
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
    # The branch is the static take_sam, decided on the host from the run's
    # schedule and seed, so the schedule given here is never drawn; rho, lam
    # and alpha are traced, so every run shares this step's two executables
    # (two more for the kinds with reuse, whose state holds the direction,
    # and two more per reuse window).
    tx = make_tx(1.0, rho, lam, 0, alpha if reusing else 0.0,
                 window if reusing else None)
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


def train_one(trainer, params0, data, y_train, schedule, rho, lam, seed,
              orders, total_steps, alpha=0.0, fresh=None, reuse=None,
              rho_schedule=None):
  """One run; returns its record and final parameters (None if diverged).

  ``orders``: the batches of each epoch, at least ``total_steps`` in all;
  the run takes the first ``total_steps``.
  ``alpha``: the reuse strength (0: none). ``fresh``: if given, an int k:
  base steps reuse only while the last SAM step is at most k steps old
  (``rst(..., reuse_window=k)``). ``reuse``: if given, a schedule of
  alpha (``kinds.reuse_schedule``), whose value at each step is passed;
  ``rho_schedule`` likewise for rho (``kinds.rho_schedule``).
  """
  import jax
  import jax.numpy as jnp

  import rst_optax
  make_tx, train_step, evaluate, _ = trainer
  window = fresh if alpha else None
  tx = make_tx(schedule, rho, lam, seed, alpha, window)
  opt_state = tx.init(params0)
  plan = rst_optax.decisions(schedule, seed, 0, total_steps)
  alphas = np.full(total_steps, alpha, np.float32)
  if reuse is not None:
    alphas = kinds.alpha_steps(reuse, total_steps)
  x, y = jnp.asarray(data['x']), jnp.asarray(y_train)
  rho_a, lam_a = np.float32(rho), np.float32(lam)
  rho_t = (kinds.alpha_steps(rho_schedule, total_steps)
           if rho_schedule is not None else None)
  params, t, wall, status, history = params0, 0, 0.0, 'ok', []
  for order in orders:
    if t == total_steps:  # a shorter run than the orders (kinds.steps_of)
      break
    start = time.perf_counter()
    for idx in order[:total_steps - t]:
      params, opt_state, loss = train_step(
          params, opt_state, rho_a if rho_t is None else rho_t[t], lam_a,
          alphas[t], x, y, idx,
          take_sam=bool(plan[t]), reusing=bool(alpha), window=window)
      t += 1
    loss = float(loss)  # waits for the epoch
    history.append(loss)
    wall += time.perf_counter() - start
    if not np.isfinite(loss):
      status = 'nan'
      break
  record = {'steps': t, 'sam_steps': int(plan[:t].sum()), 'wall_s': wall,
            # the run's cost as planned (a diverged run stops early)
            'passes': total_steps + int(plan.sum()),
            'longest_gap': kinds.longest_gap(plan)}
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
    status = stats.run_status(acc['train_noisy_loss'], acc['test_acc'])
  if status == 'nan':
    record.update(test_acc=float('nan'), val_acc=float('nan'))
  record['status'] = status
  if status != 'ok':  # the last batch's loss per epoch, to see it diverge
    record['loss_history'] = history
  final = ([np.asarray(v) for v in jax.tree.leaves(params)]
           if status != 'nan' else None)
  return record, final


def warm_up(trainer, params0, data, y_train, batch, reuse=False,
            windows=(), branches=(False, True)):
  """Compiles the train step outside the timed loops: its ``branches``
  (values of ``take_sam``), and those of the step with reuse if ``reuse``,
  and with each reuse window of ``windows``."""
  import jax
  make_tx, train_step, evaluate, _ = trainer
  idx = np.arange(batch, dtype=np.int32)
  variants = [(0.0, None)] + ([(0.5, None)] if reuse else []) + [
      (0.5, k) for k in windows]
  for alpha, window in variants:
    opt_state = make_tx(0.5, 0.05, 1.0, 0, alpha, window).init(params0)
    for take_sam in branches:
      jax.block_until_ready(train_step(
          params0, opt_state, np.float32(0.05), np.float32(1.0),
          np.float32(alpha), jax.numpy.asarray(data['x']),
          jax.numpy.asarray(y_train), idx, take_sam=take_sam,
          reusing=bool(alpha), window=window))


def run_job(args, noise, seed):
  """Every configuration, radius and alpha for one (noise, seed).

  Returns the run records, the final parameters of each run by
  ``(config, rho_grid, alpha)`` (None if it diverged to NaN) and the sizes
  of the job (steps, splits).
  """
  import math

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
  model = make_model(args, data['x'].shape[1], seed)
  graphdef, params0 = nnx.split(model, nnx.Param)
  params0 = jax.tree.map(jax.numpy.asarray, params0)
  recipe = recipe_of(args, steps_per_epoch)
  configs = kinds.make_configs(args)
  warmed = set()

  def trainer_of(steps, config):  # compiled outside the timed loops, once
    trainer = build_trainer(graphdef, steps, args.lr, recipe, total_steps)
    spec = kinds.spec(config.kind)
    branches = {'never': (False,), 'always': (True,)}.get(
        spec.schedule, (False, True))
    windows = (config.k,) if spec.fresh else ()
    if (steps, branches, spec.reuse, windows) not in warmed:
      warm_up(trainer, params0, data, y_train, batch, spec.reuse, windows,
              branches)
      warmed.add((steps, branches, spec.reuse, windows))
    return trainer

  longest = max(kinds.steps_of(c, total_steps) for c in configs)
  rng = np.random.default_rng(seed)  # the data order of every run
  orders = [rng.permutation(n_train)[:steps_per_epoch * batch].reshape(
      steps_per_epoch, batch).astype(np.int32)
            for _ in range(max(args.epochs,
                               math.ceil(longest / steps_per_epoch)))]
  done, records, finals = {}, [], {}
  for config in configs:
    steps = kinds.steps_of(config, total_steps)
    schedule, key = kinds.schedule_of(config, steps)
    lam = kinds.lam_of(config, schedule, steps)
    fresh = config.k if kinds.spec(config.kind).fresh else None
    rhos = args.rhos
    if config.kind == 'sam' and getattr(args, 'sam_rhos', None):
      rhos = args.sam_rhos
    for rho_grid, alpha in kinds.grid_of(config, rhos, args.alphas):
      rho = rho_grid * config.rho_scale
      reuse, ramp = kinds.reuse_schedule(config.kind, alpha, steps_per_epoch)
      rho_ramp, rho_steps = kinds.rho_schedule(config.kind, rho,
                                               steps_per_epoch)
      ramp_key = (config.kind, ramp, rho_steps) if ramp or rho_steps else None
      run_key = (key, steps, round(rho, 9), round(lam, 9), alpha, fresh,
                 ramp_key)
      if run_key not in done:  # e.g. RST rho/p at one grid point = RST at 2x
        done[run_key] = train_one(
            trainer_of(steps, config), params0, data, y_train,
            schedule, rho, lam, seed, orders, steps, alpha, fresh,
            reuse if ramp else None, rho_ramp if rho_steps else None)
      record, final = done[run_key]
      records.append(dict(record) | {
          'config': config.name, 'kind': config.kind, 'p': config.p,
          'rho_grid': rho_grid, 'rho': rho, 'lam': lam, 'alpha': alpha,
          'seed': seed, 'noise': noise,
          'noise_replaced': float(replaced.mean()),
          'noise_changed': float((y_train != data['y']).mean())})
      finals[(config.name, rho_grid, alpha)] = final
  return records, finals, {'total_steps': total_steps, 'n_train': n_train,
                           'n_val': len(data['y_val']),
                           'n_test': len(data['y_test'])}


@functools.cache
def _flatness_fn(model, width, length, flat_iters, flat_steps):
  """The jitted flatness measures for one model shape, compiled once."""
  import argparse

  import jax
  from flax import nnx

  from rst_optax import sharpness
  graphdef, template = nnx.split(make_model(argparse.Namespace(
      model=model, width=width), length, 0), nnx.Param)
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
      getattr(args, 'model', 'cnn'), args.width, data['x'].shape[1],
      args.flat_iters, args.flat_steps)
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




def measure_flatness(args, summary, finals):
  """The flatness of SGD, SAM and the best ``--flat-top`` configurations.

  ``summary``: ``stats.summarize``'s; ``finals``: the final parameters by
  ``(noise, seed, config, rho_grid, alpha)``. Per noise level, each
  configuration at its chosen radius and alpha: mean and s.e. over seeds of
  each measure, and the configuration's test accuracy and radius.
  """
  flat = {}
  for key, block in summary.items():
    noise = block['noise']
    names = stats.flat_targets(block, args.flat_top)
    rows = {n: block['rows'][n] for n in names}
    own = {n: row['rho'] for n, row in rows.items()}
    per_seed = {}
    for seed in block['seeds']:
      params = {n: finals[(noise, seed, n, row['rho_grid'], row['alpha'])]
                for n, row in rows.items()}
      per_seed[seed] = flatness(args, noise, seed, params, own)
    configs = {}
    for n, row in rows.items():
      vals = [per_seed[s][n] for s in block['seeds'] if n in per_seed[s]]
      configs[n] = {m: stats.stats([v.get(m, np.nan) for v in vals]) for m in (
          'lambda_max', 'eps_sharpness', 'eps_sharpness_own', 'train_loss')}
      configs[n]['test_acc'] = row['test_acc']
      configs[n]['rho'] = row['rho']
      configs[n]['alpha'] = row['alpha']
    flat[key] = {'radius': args.flat_radius, 'configs': configs,
                 'per_seed': {str(s): v for s, v in per_seed.items()}}
  return flat
