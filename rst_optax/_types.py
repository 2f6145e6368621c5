"""Type aliases of the public API, and the limit of the step count."""

from collections.abc import Callable

import jax
import numpy as np
import optax

# A hyperparameter of the step count t: a number, or an ``optax.Schedule``.
ScalarOrSchedule = float | jax.Array | optax.Schedule

# The coin's seed: an int, or a JAX PRNG key (typed, or raw uint32 key data).
Seed = int | jax.Array

# ``grad_fn(params) -> grads``: the minibatch gradient at other parameters.
GradFn = Callable[[optax.Params], optax.Updates]

# The last step: the step count is int32 and stops there (optax.safe_increment).
MAX_STEP = int(np.iinfo(np.int32).max)
