"""Resumes an RST run from an Orbax checkpoint, in a fresh process.

Run by tests/test_checkpoint.py:

  python tests/_checkpoint_worker.py CKPT_DIR OUT.npz

For each mode (``'cond'``: the coin drawn in the graph; ``'host'``:
:class:`rst_optax.HostDispatch`; each also with ``reuse``, whose state holds
the reuse direction, and with ``reuse`` and ``reuse_window`` (``_window``),
whose state also holds the last SAM step), it restores ``CKPT_DIR/<mode>``
(parameters and the whole optimizer state, PRNG key included), trains on to
``STEPS`` and saves the final parameters and state leaves as ``<mode>/<i>``.
"""

import sys

import _dist_problem as prob
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

import rst_optax

STEPS = 16
HALF = 7
MODES = ('cond', 'host', 'cond_reuse', 'host_reuse', 'cond_window',
         'host_window')
SCHEDULE = rst_optax.schedules.linear(0.2, 0.9, STEPS)
# The '_window' modes: reuse_window=1 at p = 0.25, whose steps 2 and 7 reuse
# (1 step after a SAM step) and 3-5 and 8 do not (so the restored
# last_sam_step decides steps 7 and 8).
WINDOW, WINDOW_SCHEDULE = 1, 0.25


def schedule(mode):
  return WINDOW_SCHEDULE if mode.endswith('_window') else SCHEDULE


def make_tx(mode='cond'):
  return rst_optax.rst(optax.sgd(0.1, momentum=0.9), schedule=schedule(mode),
                       rho=prob.RHO, lam=prob.LAM, seed=prob.SEED,
                       reuse=None if mode in ('cond', 'host') else 0.7,
                       reuse_window=WINDOW if mode.endswith('_window')
                       else None)


def make_trainer(tx, mode, start):
  """A ``step(params, state, t)`` that runs training step ``t``."""
  x, y = prob.make_data(STEPS)
  mode = mode.split('_')[0]

  def train_step(params, state, xb, yb, take_sam=None):
    return prob.global_step(tx, params, state, xb, yb, take_sam=take_sam)

  if mode == 'cond':
    jitted = jax.jit(train_step)
    return lambda params, state, t: jitted(params, state, x[t], y[t])
  dispatch = rst_optax.HostDispatch(train_step, tx, start=start, check_every=3)

  def host_step(params, state, t):
    assert dispatch.step == t
    return dispatch(params, state, x[t], y[t])

  host_step.dispatch = dispatch
  return host_step


def checkpoint_tree(params, state):
  return {'params': params, 'opt_state': state}


def flat_leaves(mode, params, state):
  return {f'{mode}/{i}': np.asarray(leaf) for i, leaf in
          enumerate(jax.tree.leaves(checkpoint_tree(params, state)))}


def main(ckpt_dir, out_path):
  results = {}
  with ocp.StandardCheckpointer() as checkpointer:
    for mode in MODES:
      tx = make_tx(mode)
      template = checkpoint_tree(prob.make_params(),
                                 tx.init(prob.make_params()))
      restored = checkpointer.restore(f'{ckpt_dir}/{mode}', template)
      params, state = restored['params'], restored['opt_state']
      assert type(state) is type(template['opt_state']), type(state)
      start = int(state.count)
      step = make_trainer(tx, mode, start)
      if mode.startswith('host'):
        step.dispatch.check_state(state)
      for t in range(start, STEPS):
        params, state = step(params, state, t)
      results.update(flat_leaves(mode, params, state))
  np.savez(out_path, **results)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
