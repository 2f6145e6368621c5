"""RST with an Equinox model: a small MLP with BatchNorm, on synthetic data.

Run from the repository root (``pip install ".[equinox]"`` first):

    python -m examples.equinox_example --steps 300

It trains the same model twice, with the same RST coin: once with the coin
drawn inside the jitted step (``eqx.filter_jit``, a ``lax.cond`` picks the
branch), once with the branch decided on the host (``rst_optax.HostDispatch``
with ``jit=eqx.filter_jit``: one executable per branch). Both take the same
SAM steps and end with the same model.

The pieces, in the order the train step uses them:

- ``eqx.filter_value_and_grad`` for the first pass, which returns the loss,
  the new BatchNorm state (``eqx.nn.State``) and the gradient;
- ``eqx.filter(model, eqx.is_inexact_array)``: the arrays of the model, which
  ``tx.init`` and ``tx.update`` see (``None`` in place of everything else);
- ``rst_optax.equinox_utils.eqx_grad_fn``: the gradient at other arrays, for
  the SAM branch. It puts them back into the model with ``eqx.combine`` and
  runs the perturbed pass from the state the first pass started from; the
  state that pass computes is dropped, so the running statistics come from
  the first pass only.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rst_optax
from rst_optax import equinox_utils

SEED = 0
SCHEDULE = 0.5  # p(t): half of the steps are SAM steps
BATCH_SIZE = 64


class MLP(eqx.Module):
  """Linear - BatchNorm - ReLU - Linear, on one example (vmap adds the batch)."""

  hidden: eqx.nn.Linear
  norm: eqx.nn.BatchNorm
  out: eqx.nn.Linear

  def __init__(self, key: jax.Array):
    k1, k2 = jax.random.split(key)
    self.hidden = eqx.nn.Linear(4, 32, key=k1)
    self.norm = eqx.nn.BatchNorm(32, axis_name='batch', mode='batch')
    self.out = eqx.nn.Linear(32, 1, key=k2)

  def __call__(self, x: jax.Array, state: eqx.nn.State):
    h, state = self.norm(self.hidden(x), state)
    return self.out(jax.nn.relu(h)), state


def make_data(n: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """``n`` examples of a noisy nonlinear function of 4 inputs."""
  kx, kn = jax.random.split(key)
  x = jax.random.normal(kx, (n, 4))
  w = jnp.array([1.0, -2.0, 0.5, 1.5])  # the same function for every call
  y = jnp.sin(x @ w)[:, None] + 0.1 * jax.random.normal(kn, (n, 1))
  return np.asarray(x), np.asarray(y)


def loss_fn(model: MLP, state: eqx.nn.State, x: jax.Array, y: jax.Array):
  """Mean squared error on a batch, and the new BatchNorm state."""
  batched = jax.vmap(model, axis_name='batch', in_axes=(0, None),
                     out_axes=(0, None))
  pred, state = batched(x, state)
  return jnp.mean((pred - y) ** 2), state


def make_train_step(tx: optax.GradientTransformationExtraArgs):
  """The train step; ``take_sam`` is for HostDispatch (None: the coin)."""

  def train_step(model, state, opt_state, x, y, take_sam=None):
    (loss, new_state), grads = eqx.filter_value_and_grad(
        loss_fn, has_aux=True)(model, state, x, y)
    # What rst sees: the arrays of the model (None in place of the rest).
    params = eqx.filter(model, eqx.is_inexact_array)
    # The gradient at perturbed arrays, eqx.combine-d with the rest of the
    # model; it starts from `state` and drops the state it computes.
    grad_fn = equinox_utils.eqx_grad_fn(loss_fn, model, state, x, y,
                                        has_aux=True)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=grad_fn, take_sam=take_sam)
    return eqx.apply_updates(model, updates), new_state, opt_state, loss

  return train_step


@eqx.filter_jit
def eval_loss(model: MLP, state: eqx.nn.State, x: jax.Array, y: jax.Array):
  """The loss with the running statistics (BatchNorm in inference mode)."""
  return loss_fn(eqx.nn.inference_mode(model), state, x, y)[0]


def train(dispatch: str, steps: int, log_every: int) -> dict:
  """Trains the MLP with RST (SGD with momentum as the base) for ``steps``."""
  x_train, y_train = make_data(2048, jax.random.key(1))
  x_test, y_test = make_data(512, jax.random.key(2))
  model, state = eqx.nn.make_with_state(MLP)(jax.random.key(SEED))
  tx = rst_optax.rst(optax.sgd(0.05, momentum=0.9), schedule=SCHEDULE,
                     rho=0.05, seed=SEED)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  train_step = make_train_step(tx)
  if dispatch == 'host':
    step = rst_optax.HostDispatch(train_step, tx, jit=eqx.filter_jit)
  else:
    step = eqx.filter_jit(train_step)

  first_loss = float(eval_loss(model, state, x_test, y_test))
  batches = len(x_train) // BATCH_SIZE
  for t in range(steps):
    i = (t % batches) * BATCH_SIZE
    x, y = x_train[i:i + BATCH_SIZE], y_train[i:i + BATCH_SIZE]
    model, state, opt_state, loss = step(model, state, opt_state, x, y)
    if log_every and (t + 1) % log_every == 0:
      print(f'{dispatch}: step {t + 1}, train loss {float(loss):.4f}')

  result = {
      'first_loss': first_loss,
      'final_loss': float(eval_loss(model, state, x_test, y_test)),
      'sam_steps': int(opt_state.sam_steps),
      'params': eqx.filter(model, eqx.is_inexact_array),
  }
  if dispatch == 'host':
    result['compilations'] = step.compilations
  return result


def main(steps: int = 300, log_every: int = 50) -> dict:
  """Trains with both dispatch modes; returns their results by mode."""
  results = {mode: train(mode, steps, log_every) for mode in ('cond', 'host')}
  for mode, r in results.items():
    print(f'{mode}: test loss {r["first_loss"]:.4f} -> {r["final_loss"]:.4f}, '
          f'{r["sam_steps"]} SAM steps of {steps} '
          f'({steps + r["sam_steps"]} gradient passes)')
  return results


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--log-every', type=int, default=50)
  args = parser.parse_args()
  main(args.steps, args.log_every)
