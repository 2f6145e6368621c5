"""How much of the update the reused SAM direction makes, under SGD and AdamW.

A targeted probe for the question "why does reuse hurt with AdamW?": on one
seed of the 20%-noise task, each model (the CNN and the transformer) is
trained with each base optimizer (SGD with momentum 0.9 at lr 0.1, and AdamW
at lr 4e-3, weight decay 0.05; constant rates) for ``--warm`` plain steps.
There, one SAM step stores LookSAM's direction (``g_v``, the part of the SAM
gradient orthogonal to the plain one) and the next ``--k`` steps are run
twice from the same state: with the plain gradient ``g_t`` and with
``g_t + alpha * ||g_t|| / ||g_v|| * g_v`` (``rst``'s reuse). The share of
the reused term in the update is

.. math::

  s = \\frac{\\lVert \\Delta_{\\text{reuse}} - \\Delta_{\\text{plain}}\\rVert}
            {\\lVert \\Delta_{\\text{plain}} \\rVert}

over the k steps (Delta: the change of the parameters). By construction the
reused term is alpha times the gradient's norm, so an optimizer linear in
its input (SGD) gives s near alpha; an optimizer that rescales per
coordinate (Adam) can give much more. Also reported: the cosine between the
reuse-induced displacement and the stored direction.

Run ``python -m benchmarks.label_noise.reuse_share``; it prints a Markdown
table and writes ``benchmarks/results/transformer_reuse_share.json``.
"""

import argparse
import json
import os
import time

import numpy as np


def probe(model_name, opt_name, alpha_values, warm, k, rho, seed, data):
  """The share of the reused term for one (model, optimizer)."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from benchmarks.label_noise import train
  model = train.make_model(argparse.Namespace(model=model_name, width=25),
                           data['x'].shape[1], seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = (optax.sgd(0.1, momentum=0.9) if opt_name == 'sgd'
        else optax.adamw(4e-3, weight_decay=0.05))

  def loss_fn(w, x, y):
    logits = nnx.merge(graphdef, w)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad = jax.jit(jax.grad(loss_fn))

  @jax.jit
  def step(w, state, g):
    updates, state = tx.update(g, state, w)
    return optax.apply_updates(w, updates), state

  y_train, _ = train.corrupt_labels(data['y'], 0.2, seed)
  rng = np.random.default_rng(seed)
  n = len(y_train)
  x, y = jnp.asarray(data['x']), jnp.asarray(y_train)

  def batch():
    idx = rng.choice(n, 128, replace=False)
    return x[idx], y[idx]

  state = tx.init(params)
  for _ in range(warm):
    params, state = step(params, state, grad(params, *batch()))
  xb, yb = batch()
  g = grad(params, xb, yb)
  norm = optax.tree.norm(g)
  g_s = grad(jax.tree.map(lambda w, d: w + rho * d / norm, params, g), xb, yb)
  dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_s),
                                           jax.tree.leaves(g), strict=True))
  g_v = jax.tree.map(lambda s, d: s - dot / norm**2 * d, g_s, g)
  params, state = step(params, state, g_s)  # the SAM step itself
  batches = [batch() for _ in range(k)]
  flat = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])

  def run(alpha):
    w, s = params, state
    for xb, yb in batches:
      g_t = grad(w, xb, yb)
      scale = alpha * optax.tree.norm(g_t) / optax.tree.norm(g_v)
      w, s = step(w, s, jax.tree.map(lambda a, b, c=scale: a + c * b, g_t,
                                     g_v))
    return flat(w) - flat(params)

  plain = run(0.0)
  out = []
  for alpha in alpha_values:
    extra = run(alpha) - plain
    v = flat(g_v)
    out.append({'model': model_name, 'optimizer': opt_name, 'alpha': alpha,
                'share': float(np.linalg.norm(extra) / np.linalg.norm(plain)),
                # the displacement goes against the direction: cosine with -g_v
                'cos_with_direction': float(-extra @ v / (
                    np.linalg.norm(extra) * np.linalg.norm(v)))})
  return out


def main(argv=None):
  """Runs the probe on the 2 x 2 (model x optimizer) design; the rows."""
  parser = argparse.ArgumentParser(prog='python -m '
                                   'benchmarks.label_noise.reuse_share')
  parser.add_argument('--warm', type=int, default=300)
  parser.add_argument('--k', type=int, default=5)
  parser.add_argument('--rho', type=float, default=0.1)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='benchmarks/results/'
                      'transformer_reuse_share.json')
  args = parser.parse_args(argv)
  from examples import mnist1d_demo as demo
  data = demo.load_data(5000, 500, 'runs')
  start = time.perf_counter()
  rows = []
  for model in ('cnn', 'transformer'):
    for opt in ('sgd', 'adamw'):
      rows += probe(model, opt, (0.25, 0.5), args.warm, args.k, args.rho,
                    args.seed, data)
  print('| model | optimizer | α | share of the reused term in the update '
        '| cos(displacement, −g_v) |\n|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['optimizer']} | {r['alpha']:g} | "
          f"{r['share']:.3f} | {r['cos_with_direction']:.3f} |")
  with open(args.out, 'w') as f:
    json.dump({'settings': vars(args), 'machine': demo.machine(),
               'load_average': os.getloadavg(),
               'elapsed_s': time.perf_counter() - start, 'rows': rows}, f,
              indent=1)
  return rows


if __name__ == '__main__':
  main()
