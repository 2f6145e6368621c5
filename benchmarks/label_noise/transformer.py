"""The transformer of the label-noise benchmark: a small pre-LN ViT on MNIST-1D.

The 40-sample signal is cut into ``length // patch`` non-overlapping patches
(8 of 5 by default), each a token: a linear patch embedding plus a learned
position embedding, then ``depth`` pre-LayerNorm blocks

.. math::

  h \\leftarrow h + \\mathrm{MHA}(\\mathrm{LN}(h)), \\qquad
  h \\leftarrow h + W_2\\,\\mathrm{GELU}(W_1\\,\\mathrm{LN}(h)),

a final LayerNorm, the mean over tokens and a linear head to the 10 classes.
No dropout: the regularization under study is SAM's (and AdamW's decoupled
weight decay, set in ``train.build_trainer``).
"""

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  """One pre-LayerNorm block: attention, then a GELU MLP, each residual."""

  def __init__(self, width: int, heads: int, mlp_ratio: int,
               rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    h = h + self.attn(self.ln1(h))
    return h + self.fc2(jax.nn.gelu(self.fc1(self.ln2(h))))


class Transformer(nnx.Module):
  """Patch tokens, ``depth`` pre-LN blocks, final LN, mean-pool, linear head.

  Args:
    length: samples per signal (40 for MNIST-1D); a multiple of ``patch``.
    rngs: the initialization's random streams.
    patch: samples per token.
    width: the embedding width.
    depth: the number of blocks.
    heads: attention heads per block (``width`` divisible by it).
    mlp_ratio: the MLP's hidden width over ``width``.

  Example::

    model = Transformer(40, nnx.Rngs(0))
    logits = model(jnp.zeros((128, 40)))  # (128, 10)
  """

  def __init__(self, length: int, rngs: nnx.Rngs, patch: int = 5,
               width: int = 64, depth: int = 2, heads: int = 4,
               mlp_ratio: int = 2, classes: int = 10):
    if length % patch:
      raise ValueError(f'Transformer: length {length} is not a multiple of '
                       f'patch {patch}.')
    if width % heads:
      raise ValueError(f'Transformer: width {width} is not divisible by '
                       f'heads {heads}.')
    self.patch = patch
    self.embed = nnx.Linear(patch, width, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(
        rngs.params(), (length // patch, width)))
    self.blocks = nnx.List([Block(width, heads, mlp_ratio, rngs)
                            for _ in range(depth)])
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    tokens = x.reshape(x.shape[0], -1, self.patch)  # (batch, tokens, patch)
    h = self.embed(tokens) + self.pos[...]
    for block in self.blocks:
      h = block(h)
    return self.head(jnp.mean(self.ln(h), axis=1))
