"""CIFAR-10 with a Flax (Linen) ResNet-18 and RST / G-RST; meant for GPU/TPU.

The CIFAR variant of ResNet-18 (3x3 stem, no max-pool, BatchNorm), the standard
augmentation done in JAX on the device (random crop with 4-pixel zero padding,
horizontal flip), batch 128, SGD with momentum 0.9 and a cosine learning rate,
weight decay; the base optimizer wrapped in ``rst_optax.rst`` (or alone for
``--method sgd``). Linen's ``TrainState`` is :class:`rst_optax.flax_utils.
TrainState`, whose ``apply_gradients`` forwards ``grad_fn`` to ``rst``; the
SAM pass discards its BatchNorm statistics (``flax_utils.linen_grad_fn``).

Data, in this order (nothing is downloaded):
  --data FILE.npz   arrays x_train (N, 32, 32, 3) uint8, y_train, x_test, y_test
  --data DIR        the extracted ``cifar-10-batches-py`` folder (or its parent)
  TensorFlow Datasets, if installed and ``cifar10`` is already prepared.

Run:  python examples/cifar10_resnet.py --data cifar-10-batches-py --method grst
"""

import argparse
import functools
import json
import os
import pickle
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import rst_optax
from rst_optax import flax_utils, schedules

METHODS = ('sgd', 'sam', 'rst', 'grst')
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
HOW_TO_GET_DATA = (
    'CIFAR-10 not found. Get it with one of:\n'
    '  1. download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, '
    'extract it (tar xzf) and pass --data cifar-10-batches-py;\n'
    '  2. pass --data FILE.npz holding x_train (N, 32, 32, 3) uint8, y_train, '
    'x_test, y_test;\n'
    '  3. pip install tensorflow-datasets and run `tfds build cifar10` once '
    '(this script never downloads).')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--data', default=None,
                      help='.npz file or cifar-10-batches-py folder; default: '
                      'TensorFlow Datasets')
  parser.add_argument('--method', default='grst', choices=METHODS)
  parser.add_argument('--p', type=float, default=0.5,
                      help='mean probability of a SAM step (rst, grst)')
  parser.add_argument('--schedule', default='constant',
                      choices=schedules.FAMILIES,
                      help='family of p(t) with mean --p '
                      '(rst_optax.schedules.family)')
  parser.add_argument('--rho', type=float, default=0.05)
  parser.add_argument('--lam', type=float, default=None,
                      help='G-RST weight (default: matching_lam, 1 / mean p)')
  parser.add_argument('--epochs', type=int, default=200)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--lr', type=float, default=0.1)
  parser.add_argument('--weight-decay', type=float, default=5e-4)
  parser.add_argument('--width', type=int, default=64,
                      help='channels of the first stage (64 for ResNet-18)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dispatch', default='auto',
                      choices=('auto', 'host', 'cond'),
                      help='auto: rst_optax.recommended_dispatch()')
  parser.add_argument('--max-steps', type=int, default=None,
                      help='stop after this many steps (smoke tests)')
  parser.add_argument('--out', default='runs/cifar10')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  if not 0.0 < args.p <= 1.0:
    parser.error(f'--p must be in (0, 1]; got {args.p}.')
  try:  # the family's own check of p (periodic needs p = 1/k)
    schedules.family(args.schedule, args.p, total_steps=1)
  except ValueError as e:
    parser.error(f'--schedule {args.schedule} --p {args.p}: {e}')
  return args


def _from_batches(folder):
  """Reads the python-version CIFAR-10 batches (data_batch_1..5, test_batch)."""
  def read(name):
    with open(os.path.join(folder, name), 'rb') as f:
      d = pickle.load(f, encoding='bytes')
    x = np.asarray(d[b'data'], np.uint8).reshape(-1, 3, 32, 32)
    return x.transpose(0, 2, 3, 1), np.asarray(d[b'labels'], np.int32)
  train = [read(f'data_batch_{i}') for i in range(1, 6)]
  x_test, y_test = read('test_batch')
  return {'x_train': np.concatenate([x for x, _ in train]),
          'y_train': np.concatenate([y for _, y in train]),
          'x_test': x_test, 'y_test': y_test}


def load_cifar10(data=None):
  """CIFAR-10 as uint8 NHWC images and int32 labels; never downloads.

  Raises:
    FileNotFoundError: with the ways to get the data, if none is found.
  """
  if data is not None:
    if os.path.isfile(data) and data.endswith('.npz'):
      with np.load(data) as f:
        arrays = {k: f[k] for k in ('x_train', 'y_train', 'x_test', 'y_test')}
    else:
      for folder in (data, os.path.join(data, 'cifar-10-batches-py')):
        if os.path.isfile(os.path.join(folder, 'test_batch')):
          arrays = _from_batches(folder)
          break
      else:
        raise FileNotFoundError(f'--data {data!r}: no .npz file or CIFAR-10 '
                                f'batches there.\n{HOW_TO_GET_DATA}')
  else:
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise FileNotFoundError(HOW_TO_GET_DATA) from None
    try:
      train, test = tfds.as_numpy(tfds.load(
          'cifar10', split=['train', 'test'], batch_size=-1,
          as_supervised=True, download=False))
    except Exception as e:  # tfds raises its own errors for missing data.
      raise FileNotFoundError(f'{e}\n{HOW_TO_GET_DATA}') from None
    arrays = {'x_train': train[0], 'y_train': train[1],
              'x_test': test[0], 'y_test': test[1]}
  arrays = {k: np.asarray(v, np.uint8 if k[0] == 'x' else np.int32)
            for k, v in arrays.items()}
  if arrays['x_train'].ndim != 4 or arrays['x_train'].shape[-1] != 3:
    raise ValueError('CIFAR-10: x_train must be (N, H, W, 3) uint8 images; got '
                     f'shape {arrays["x_train"].shape}.')
  return arrays


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a (projected) shortcut."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9)
    conv = functools.partial(nn.Conv, use_bias=False)
    y = conv(self.features, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(norm()(y))
    y = norm()(conv(self.features, (3, 3), padding=1)(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm()(conv(self.features, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, four stages of 2 blocks.

  ``stages`` below 4 keeps only the first stages (a smaller net of the same
  kind, for quick tests); ``width`` is the channels of the first stage.
  """
  num_classes: int = 10
  width: int = 64
  stages: int = 4

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage in range(self.stages):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides)(x, train)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def augment(key, images):
  """Random crop with 4-pixel zero padding and random horizontal flip."""
  n, h, w, c = images.shape
  k_crop, k_flip = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  offsets = jax.random.randint(k_crop, (n, 2), 0, 9)
  crop = jax.vmap(
      lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
          padded, offsets)
  flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
  return jnp.where(flip, crop[:, :, ::-1], crop)


def normalize(images):
  return (images.astype(jnp.float32) / 255.0 - MEAN) / STD


def make_tx(args, total_steps):
  """The optimizer and its p(t) (None for SGD)."""
  lr = optax.cosine_decay_schedule(args.lr, total_steps)
  base = optax.chain(optax.add_decayed_weights(args.weight_decay),
                     optax.sgd(lr, momentum=0.9))
  if args.method == 'sgd':
    return optax.with_extra_args_support(base), None
  if args.method == 'sam':
    return rst_optax.rst(base, 1.0, rho=args.rho, seed=args.seed), 1.0
  schedule = schedules.family(args.schedule, args.p, total_steps)
  lam = 1.0
  if args.method == 'grst':
    lam = (args.lam if args.lam is not None
           else schedules.matching_lam(schedule, total_steps))
  tx = rst_optax.rst(base, schedule, rho=args.rho, lam=lam, seed=args.seed)
  return tx, schedule


def loss_fn(params, batch_stats, apply_fn, images, labels):
  logits, updates = apply_fn({'params': params, 'batch_stats': batch_stats},
                             images, train=True, mutable=['batch_stats'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, updates['batch_stats']


def train_step(state, x, y, idx, key, take_sam=None):
  """One step on the batch ``x[idx]``; ``take_sam`` as for ``rst``."""
  images = normalize(augment(key, x[idx]))
  labels = y[idx]
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, state.apply_fn, images, labels)
  # The SAM pass: same batch, statistics of the perturbed pass dropped.
  grad_fn = flax_utils.linen_grad_fn(loss_fn, state.batch_stats,
                                     state.apply_fn, images, labels,
                                     has_aux=True)
  state = state.apply_gradients(grads=grads, grad_fn=grad_fn,
                                take_sam=take_sam, batch_stats=batch_stats)
  return state, loss


@functools.partial(jax.jit, static_argnames='apply_fn')
def _correct(params, batch_stats, apply_fn, images, labels, mask):
  logits = apply_fn({'params': params, 'batch_stats': batch_stats},
                    normalize(images), train=False)
  return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)


def evaluate(state, x, y, batch_size=1000):
  """Test accuracy, in fixed-size batches (the last one padded and masked)."""
  correct = 0
  for start in range(0, len(y), batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    pad = batch_size - len(yb)
    mask = np.concatenate([np.ones(len(yb)), np.zeros(pad)]).astype(np.float32)
    xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
    yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
    correct += int(_correct(state.params, state.batch_stats, state.apply_fn,
                            xb, yb, mask))
  return correct / len(y)


def main(argv=None):
  """Trains and evaluates; returns the final metrics."""
  args = parse_args(argv)
  try:
    data = load_cifar10(args.data)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  dispatch = (rst_optax.recommended_dispatch() if args.dispatch == 'auto'
              else args.dispatch)
  n_train = len(data['y_train'])
  steps_per_epoch = n_train // args.batch_size
  if steps_per_epoch < 1:
    sys.exit(f'error: {n_train} training images < --batch-size '
             f'{args.batch_size}.')
  total_steps = steps_per_epoch * args.epochs
  run_steps = min(total_steps, args.max_steps or total_steps)
  tx, schedule = make_tx(args, total_steps)

  model = ResNet18(width=args.width)
  key_init, key_aug = jax.random.split(jax.random.key(args.seed))
  variables = jax.jit(functools.partial(model.init, train=False))(
      key_init, jnp.zeros((1, *data['x_train'].shape[1:])))
  state = flax_utils.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=tx)
  if schedule is not None and dispatch == 'host':
    step = rst_optax.HostDispatch(train_step, tx)
  else:
    step = jax.jit(train_step)
  x, y = jnp.asarray(data['x_train']), jnp.asarray(data['y_train'])
  print(f'CIFAR-10: {n_train} train / {len(data["y_test"])} test images of '
        f'{data["x_train"].shape[1:]}; ResNet-18 width {args.width}; '
        f'{args.method} (p {args.p}, {args.schedule}, rho {args.rho}); '
        f'{run_steps} steps; dispatch {dispatch} on {jax.default_backend()}')

  rng = np.random.default_rng(args.seed)
  history, t, start = [], 0, time.perf_counter()
  # disable=None: no bar when the output is not a terminal (a log, CI).
  progress = tqdm(total=run_steps, unit='step',
                  disable=True if args.no_progress else None)
  while t < run_steps:
    order = rng.permutation(n_train)
    for i in range(steps_per_epoch):
      if t == run_steps:
        break
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      state, loss = step(state, x, y, idx, jax.random.fold_in(key_aug, t))
      t += 1
      progress.update()
    sam_steps = int(state.opt_state.sam_steps) if schedule is not None else 0
    acc = evaluate(state, data['x_test'], data['y_test'])  # after each epoch
    history.append({'step': t, 'loss': float(loss), 'test_acc': acc,
                    'sam_steps': sam_steps, 'passes': t + sam_steps,
                    'time_s': time.perf_counter() - start})
    progress.write(f'step {t}: loss {float(loss):.4f}, test accuracy '
                   f'{100 * acc:.2f}%, {sam_steps} SAM steps, '
                   f'{t + sam_steps} gradient evaluations')
  progress.close()
  result = {'settings': vars(args) | {'dispatch': dispatch,
                                      'total_steps': total_steps},
            'final': history[-1], 'history': history,
            'batch_stats': state.batch_stats}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f'{args.method}_seed{args.seed}.json'),
            'w') as f:
    json.dump({k: v for k, v in result.items() if k != 'batch_stats'}, f,
              indent=1)
  return result


if __name__ == '__main__':
  main()
