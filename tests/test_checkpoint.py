"""Save RSTState with Orbax mid-run, resume in a fresh process: bit-identical.

The uninterrupted run and the checkpoint at step ``HALF`` happen here; one
subprocess (tests/_checkpoint_worker.py) restores both dispatch modes' states
and trains on. Its final parameters and state must equal, bit for bit, those
of the run that never stopped.
"""

import pathlib
import subprocess
import sys

import _checkpoint_worker as worker
import _dist_problem as prob
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import rst_optax

WORKER = pathlib.Path(__file__).with_name('_checkpoint_worker.py')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Uninterrupted runs in both modes, checkpointed at step HALF; and the
  subprocess's resumed runs."""
  tmp = tmp_path_factory.mktemp('checkpoint')
  uninterrupted, saved = {}, {}
  with ocp.StandardCheckpointer() as checkpointer:
    for mode in worker.MODES:
      tx = worker.make_tx(mode)
      params = prob.make_params()
      state = tx.init(params)
      step = worker.make_trainer(tx, mode, start=0)
      for t in range(worker.STEPS):
        if t == worker.HALF:
          checkpointer.save(tmp / mode, worker.checkpoint_tree(params, state))
          saved[mode] = state
        params, state = step(params, state, t)
      uninterrupted[mode] = worker.flat_leaves(mode, params, state)
    checkpointer.wait_until_finished()
  out = tmp / 'resumed.npz'
  proc = subprocess.run([sys.executable, str(WORKER), str(tmp), str(out)],
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  with np.load(out) as resumed:
    return uninterrupted, saved, dict(resumed)


@pytest.mark.parametrize('mode', worker.MODES)
def test_resumed_run_is_bit_identical_to_uninterrupted(runs, mode):
  uninterrupted, _, resumed = runs
  want = uninterrupted[mode]
  assert sorted(k for k in resumed if k.startswith(f'{mode}/')) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_checkpoint_is_mid_run_and_both_halves_take_both_branches(runs):
  """The split is at a step where it matters: decisions on both sides of it
  include both branches, so a resumed coin that drew differently would
  change the result."""
  _, saved, _ = runs
  for mode, state in saved.items():
    decisions = rst_optax.decisions(worker.schedule(mode), prob.SEED, 0,
                                    worker.STEPS)
    assert int(state.count) == worker.HALF
    assert int(state.sam_steps) == decisions[:worker.HALF].sum()
    for half in (decisions[:worker.HALF], decisions[worker.HALF:]):
      assert 0 < half.sum() < len(half)


@pytest.mark.parametrize('suffix', ['', '_reuse', '_window'])
def test_both_modes_end_in_the_same_state(runs, suffix):
  uninterrupted, _, _ = runs
  cond, host = (list(uninterrupted[mode + suffix].values())
                for mode in ('cond', 'host'))
  for a, b in zip(cond, host, strict=True):
    np.testing.assert_array_equal(a, b)


def test_restored_state_keeps_the_key_and_dtypes(runs, tmp_path):
  """RSTState round-trips through Orbax as a plain pytree: same structure,
  dtypes (int32 counters, uint32 key data) and values."""
  _, saved, _ = runs
  state = saved['cond']
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'state', state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / 'state', state)
  assert isinstance(restored, rst_optax.RSTState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                  strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert restored.key.dtype == np.uint32


def test_the_reuse_direction_is_saved_and_restored(runs):
  _, saved, _ = runs
  state = saved['cond_reuse']
  assert type(state) is rst_optax.RSTReuseState
  assert int(state.sam_steps) > 0
  assert any(np.any(np.asarray(leaf) != 0)
             for leaf in jax.tree.leaves(state.reuse_direction))


def test_the_last_sam_step_is_saved_and_decides_the_steps_after_resuming(
    runs):
  """With ``reuse_window``: the state holds the last SAM step, and the steps
  after the checkpoint are ones that it decides (step HALF reuses, one step
  after a SAM step, and the next one does not), so a resumed run that lost
  it would differ (test_resumed_run_is_bit_identical_to_uninterrupted)."""
  _, saved, _ = runs
  decisions = rst_optax.decisions(worker.WINDOW_SCHEDULE, prob.SEED, 0,
                                  worker.STEPS)
  last = np.flatnonzero(decisions[:worker.HALF])[-1]
  assert worker.HALF - last == worker.WINDOW
  assert not decisions[worker.HALF] and not decisions[worker.HALF + 1]
  for mode in ('cond_window', 'host_window'):
    state = saved[mode]
    assert type(state) is rst_optax.RSTWindowState
    assert state.last_sam_step.dtype == np.int32
    assert int(state.last_sam_step) == last
    assert any(np.any(np.asarray(leaf) != 0)
               for leaf in jax.tree.leaves(state.reuse_direction))


OLD_CHECKPOINT = pathlib.Path(__file__).with_name('data') / 'checkpoint_v0_2'


def test_a_checkpoint_written_by_version_0_2_restores_and_resumes(runs):
  """``tests/data/checkpoint_v0_2`` was written by rst_optax 0.2 (before
  ``reuse``): the 'cond' run of this module at step HALF. It restores into
  today's RSTState and trains on to the same bits as today's run."""
  uninterrupted, _, _ = runs
  tx = worker.make_tx()
  template = worker.checkpoint_tree(prob.make_params(),
                                    tx.init(prob.make_params()))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(OLD_CHECKPOINT.resolve(), template)
  params, state = restored['params'], restored['opt_state']
  assert type(state) is rst_optax.RSTState and int(state.count) == worker.HALF
  step = worker.make_trainer(tx, 'cond', start=worker.HALF)
  for t in range(worker.HALF, worker.STEPS):
    params, state = step(params, state, t)
  got = worker.flat_leaves('cond', params, state)
  assert got.keys() == uninterrupted['cond'].keys()
  for key, value in uninterrupted['cond'].items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


OLD_REUSE_CHECKPOINT = OLD_CHECKPOINT.with_name('checkpoint_v0_2_reuse')


def test_a_reuse_checkpoint_written_before_reuse_window_resumes(runs):
  """``tests/data/checkpoint_v0_2_reuse`` was written by rst_optax at commit
  c109114 (``reuse`` without ``reuse_window``, RSTReuseState of five fields):
  the 'cond_reuse' run of this module at step HALF. It restores into
  today's ``rst(reuse=...)`` and trains on to the same bits as today's run."""
  uninterrupted, _, _ = runs
  tx = worker.make_tx('cond_reuse')
  template = worker.checkpoint_tree(prob.make_params(),
                                    tx.init(prob.make_params()))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(OLD_REUSE_CHECKPOINT.resolve(), template)
  params, state = restored['params'], restored['opt_state']
  assert type(state) is rst_optax.RSTReuseState
  assert int(state.count) == worker.HALF
  step = worker.make_trainer(tx, 'cond_reuse', start=worker.HALF)
  for t in range(worker.HALF, worker.STEPS):
    params, state = step(params, state, t)
  got = worker.flat_leaves('cond_reuse', params, state)
  assert got.keys() == uninterrupted['cond_reuse'].keys()
  for key, value in uninterrupted['cond_reuse'].items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


# Restoring across kinds (docs/checkpointing.md, "With reuse").


def _ckpt_problem():
  params = {'w': np.linspace(-1.0, 1.0, 3).astype(np.float32),
            'b': np.float32(0.5)}
  loss = lambda p: jnp.sum(jnp.sin(3 * p['w'])) + p['b'] ** 2
  return params, loss


def _sam_step(tx, state, params, loss):
  return tx.update(jax.grad(loss)(params), state, params,
                   grad_fn=jax.grad(loss), take_sam=True)[1]


def test_restoring_across_kinds(tmp_path):
  params, loss = _ckpt_problem()
  plain = rst_optax.rst(optax.sgd(0.1), 0.5)
  reusing = rst_optax.rst(optax.sgd(0.1), 0.5, reuse=0.5)
  with ocp.StandardCheckpointer() as checkpointer:
    for name, tx in (('plain', plain), ('reusing', reusing)):
      checkpointer.save(tmp_path / name,
                        _sam_step(tx, tx.init(params), params, loss))
    # Orbax refuses a restore into the other kind.
    for name, other in (('plain', reusing), ('reusing', plain)):
      with pytest.raises(ValueError, match='reuse_direction'):
        checkpointer.restore(tmp_path / name, other.init(params))
    old = checkpointer.restore(tmp_path / 'plain', plain.init(params))
  # The documented way to add reuse: nothing reused until the next SAM step.
  state = rst_optax.RSTReuseState(
      *old, reuse_direction=reusing.init(params).reuse_direction)
  g = jax.grad(loss)(params)
  d, state = reusing.update(g, state, params, grad_fn=jax.grad(loss),
                            take_sam=False)
  np.testing.assert_array_equal(d['w'], -0.1 * g['w'])
  assert int(state.count) == int(old.count) + 1


def test_restoring_into_a_narrower_mask_and_resetting_the_buffer(tmp_path):
  params, loss = _ckpt_problem()
  wide = rst_optax.rst(optax.sgd(0.1), 0.5, reuse=0.5)
  narrow = rst_optax.rst(optax.sgd(0.1), 0.5, reuse=0.5,
                         mask={'w': True, 'b': False})
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'wide',
                      _sam_step(wide, wide.init(params), params, loss))
    state = checkpointer.restore(tmp_path / 'wide', narrow.init(params))
    # The other way, a narrower mask's state into a wider one: refused.
    checkpointer.save(tmp_path / 'narrow', narrow.init(params))
    widened = checkpointer.restore(tmp_path / 'narrow')
  u = state.reuse_direction
  assert isinstance(u['b'], optax.MaskedNode)
  assert float(np.linalg.norm(u['w'])) < 0.999  # no longer a unit vector
  state = state._replace(reuse_direction=narrow.init(params).reuse_direction)
  g = jax.grad(loss)(params)
  d, _ = narrow.update(g, state, params, grad_fn=jax.grad(loss),
                       take_sam=False)
  np.testing.assert_array_equal(d['w'], -0.1 * g['w'])
  widened = wide.init(params)._replace(
      reuse_direction=widened['reuse_direction'])
  with pytest.raises(ValueError, match=r"missing leaves: \['b'\].*if `mask` "
                     'changed'):
    wide.update(g, widened, params, grad_fn=jax.grad(loss))
