"""A picture of the idea: SGD, SAM and RST on a 2-D loss with two minima.

Run from the repository root (matplotlib is in the ``examples`` extra):

    python -m examples.toy_2d            # writes runs/toy_2d/toy_2d.png

The loss has a wide basin around (1, 0), the flat minimum, and on its slope
a narrow pit around (-1, 0.8), the sharp minimum (curvature 50 against 0.3
and 1.5), a local minimum: the smooth minimum of two quadratics. From a start on the
pit's wall, plain gradient descent falls into the pit and stays. SAM looks
at the loss a distance ρ uphill before each step; ρ = 0.4 is wider than the
pit, so from inside it SAM sees the basin's slope and climbs out to the flat
minimum. RST takes a SAM step on about half of the steps (p = 0.5, a coin per
step) with λ = 2 and follows SAM out. All three use the same SGD step size.
The example uses the public API only and runs in seconds on a CPU.
"""

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

import rst_optax
from rst_optax import sharpness

FLAT = (1.0, 0.0)
SHARP = (-1.0, 0.8)
START = (-1.15, 0.9)
SHARP_CURVATURE = 50.0
FLAT_CURVATURES = (0.3, 1.5)  # along x and y
PIT_DEPTH = 0.3  # how far the pit's bottom lies below the basin there
SMOOTHING = 0.05  # temperature of the smooth minimum


def loss_fn(w: jax.Array) -> jax.Array:
  """The smooth minimum of a wide quadratic basin and a narrow pit."""
  x, y = w[0], w[1]

  def basin(x, y):
    return 0.5 * (FLAT_CURVATURES[0] * (x - FLAT[0]) ** 2
                  + FLAT_CURVATURES[1] * (y - FLAT[1]) ** 2)

  pit = (0.5 * SHARP_CURVATURE * ((x - SHARP[0]) ** 2 + (y - SHARP[1]) ** 2)
         + basin(*SHARP) - PIT_DEPTH)
  return -SMOOTHING * jnp.logaddexp(-basin(x, y) / SMOOTHING,
                                    -pit / SMOOTHING)


def optimizers(lr: float, rho: float, seed: int
               ) -> dict[str, optax.GradientTransformation]:
  """SGD, SAM (rst at p = 1) and RST (p = 0.5, λ = 2), one step size."""
  return {
      'SGD': optax.sgd(lr),
      'SAM': rst_optax.rst(optax.sgd(lr), schedule=1.0, rho=rho),
      'RST (p = 0.5, λ = 2)': rst_optax.rst(
          optax.sgd(lr), schedule=0.5, rho=rho, lam=2.0, seed=seed),
  }


def path(tx: optax.GradientTransformation, start: jax.Array, steps: int
         ) -> tuple[jax.Array, Any]:
  """The parameters after each step (the start first), and the final state."""
  grad_fn = jax.grad(loss_fn)

  def step(carry, _):
    w, state = carry
    updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
    w = optax.apply_updates(w, updates)
    return (w, state), w

  (_, state), ws = jax.lax.scan(step, (start, tx.init(start)), None, steps)
  return jnp.concatenate([start[None], ws]), state


def plot(paths: dict[str, jax.Array], passes: dict[str, int], out: str
         ) -> None:
  """The loss's contours and each optimizer's path, to ``out``."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  xs, ys = jnp.meshgrid(jnp.linspace(-2.0, 2.2, 170),
                        jnp.linspace(-1.2, 1.6, 120))
  zs = jax.jit(jax.vmap(jax.vmap(lambda x, y: loss_fn(jnp.array([x, y])))))(
      xs, ys)
  fig, ax = plt.subplots(figsize=(8, 5.2))
  ax.contourf(xs, ys, zs, levels=30, cmap='Greys_r', alpha=0.75)
  ax.contour(xs, ys, zs, levels=30, colors='k', linewidths=0.3, alpha=0.4)
  styles = {'SGD': ('C3', '-'), 'SAM': ('C0', '-'),
            'RST (p = 0.5, λ = 2)': ('C2', '--')}
  for name, ws in paths.items():
    color, line = styles[name]
    ax.plot(ws[:, 0], ws[:, 1], line, color=color, lw=1.8,
            label=f'{name}: {passes[name]:,} gradient evaluations')
    ax.plot(ws[-1, 0], ws[-1, 1], 'o', color=color, ms=7, mec='white')
  ax.plot(*START, 'k^', ms=8, label='start')
  ax.annotate('sharp minimum', SHARP, xytext=(-1.9, 1.35),
              arrowprops={'arrowstyle': '->'})
  ax.annotate('flat minimum', FLAT, xytext=(1.2, -0.9),
              arrowprops={'arrowstyle': '->'})
  ax.set_xlabel('$w_1$')
  ax.set_ylabel('$w_2$')
  ax.set_title('Paths from the same start, same step size')
  ax.legend(loc='upper right', fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def require_matplotlib() -> None:
  """Exits with a message naming the extra, before any work, without
  matplotlib (the figure needs it; the core install does not bring it)."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    sys.exit('examples.toy_2d: the figure needs matplotlib, which the core '
             'install does not bring. From a clone: pip install ".[examples]" '
             '(or pip install matplotlib).')


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=1500)
  parser.add_argument('--lr', type=float, default=0.02)
  parser.add_argument('--rho', type=float, default=0.4)
  parser.add_argument('--seed', type=int, default=0, help="RST's coin")
  parser.add_argument('--out', default=os.path.join('runs', 'toy_2d',
                                                    'toy_2d.png'),
                      help='the figure (docs/figures/toy_2d.png on the '
                      'method page)')
  args = parser.parse_args(argv)
  require_matplotlib()
  start = jnp.array(START)
  paths, results = {}, {}
  for name, tx in optimizers(args.lr, args.rho, args.seed).items():
    ws, state = path(tx, start, args.steps)
    paths[name] = ws
    end = ws[-1]
    curvature, _ = sharpness.top_hessian_eigenvalue(loss_fn, end,
                                                    num_iters=20)
    passes = args.steps + int(getattr(state, 'sam_steps', 0))
    results[name] = {'end': [float(v) for v in end],
                     'loss': float(loss_fn(end)),
                     'top_hessian_eigenvalue': float(curvature),
                     'gradient_evaluations': passes}
    print(f"{name:22s} ends at ({end[0]:+.2f}, {end[1]:+.2f}), loss "
          f"{float(loss_fn(end)):+.3f}, top Hessian eigenvalue "
          f"{float(curvature):5.1f}, {passes} gradient evaluations")
  plot(paths, {k: r['gradient_evaluations'] for k, r in results.items()},
       args.out)
  print(f'wrote {args.out}')
  return results


if __name__ == '__main__':
  main()
