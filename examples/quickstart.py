"""Quick start: train a small MLP with RST on synthetic data, in plain JAX + Optax.

Run:  python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax

import rst_optax


def init_mlp(key, sizes=(16, 64, 4)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [
      {'w': jax.random.normal(k, (m, n)) / jnp.sqrt(m), 'b': jnp.zeros(n)}
      for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def logits_fn(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def loss_fn(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(params, x), y).mean()


def main(steps=300, batch_size=64):
  key_data, key_model, key_teacher = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_data, (2048, 16))
  y = jnp.argmax(logits_fn(init_mlp(key_teacher), x), axis=-1)  # a teacher net

  params = init_mlp(key_model)
  # The quick start's configuration (docs/getting_started.md): a SAM step
  # every other step with lam = 2, at 0.75x SAM's passes (at smaller p, keep
  # lam = 1: see "Which schedule and rho?" in docs/method.md).
  tx = rst_optax.rst(optax.sgd(0.1, momentum=0.9),
                     schedule=rst_optax.schedules.periodic(2), rho=0.05,
                     lam=2.0)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))  # same batch, other params
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  for step in range(steps):
    i = (step * batch_size) % x.shape[0]
    batch = (x[i:i + batch_size], y[i:i + batch_size])
    params, opt_state, loss = train_step(params, opt_state, batch)
    if step % 50 == 0 or step == steps - 1:
      print(f'step {step:4d}  loss {float(loss):.4f}')

  accuracy = jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y)
  passes = int(opt_state.count + opt_state.sam_steps)
  print(f'train accuracy {float(accuracy):.3f}; {int(opt_state.sam_steps)} SAM '
        f'steps of {steps}; {passes} gradient evaluations (SAM: {2 * steps})')


if __name__ == '__main__':
  main()
