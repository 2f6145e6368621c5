"""The schedule families, mean_probability and matching_lam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rst_optax
from rst_optax import schedules


def values(schedule, steps):
  return np.asarray(jax.vmap(schedule)(jnp.arange(steps, dtype=jnp.int32)))


def test_constant():
  np.testing.assert_allclose(values(schedules.constant(0.3), 5), 0.3)


def test_piecewise_switches_at_the_boundary():
  v = values(schedules.piecewise(0.0, 1.0, boundary=30), 100)
  np.testing.assert_array_equal(v[:30], 0.0)
  np.testing.assert_array_equal(v[30:], 1.0)
  # SAM-then-SGD and the two-level schedule of mean 0.5.
  assert schedules.mean_probability(schedules.piecewise(1.0, 0.0, 30), 100) == (
      pytest.approx(0.3))
  assert schedules.mean_probability(schedules.piecewise(0.2, 0.8, 50), 100) == (
      pytest.approx(0.5))


def test_linear_ramps_then_holds():
  v = values(schedules.linear(0.2, 0.8, total_steps=60), 100)
  np.testing.assert_allclose(v[:61], 0.2 + 0.6 * np.arange(61) / 60, atol=1e-6)
  np.testing.assert_allclose(v[60:], 0.8, atol=1e-7)


def test_trigonometric_is_a_half_cosine():
  total = 80
  v = values(schedules.trigonometric(0.9, 0.1, total_steps=total), 100)
  t = np.minimum(np.arange(100) / total, 1.0)
  np.testing.assert_allclose(v, 0.1 + 0.8 * 0.5 * (1 + np.cos(np.pi * t)),
                             atol=1e-6)
  assert v[0] == pytest.approx(0.9) and v[-1] == pytest.approx(0.1)
  assert schedules.mean_probability(
      schedules.trigonometric(0.0, 1.0, 1000), 1000) == pytest.approx(
          0.5, abs=1e-3)


@pytest.mark.parametrize('p', [0.1, 0.37, 0.9])
def test_paper_linear_increasing_schedule_has_mean_p(p):
  total = 1000
  s = schedules.linear(max(0.0, 2 * p - 1), min(1.0, 2 * p), total)
  assert schedules.mean_probability(s, total) == pytest.approx(p, abs=2e-3)


def test_mean_probability_clips_like_the_coin():
  assert schedules.mean_probability(lambda t: 1.5, 10) == 1.0
  assert schedules.mean_probability(lambda t: -2.0, 10) == 0.0
  assert schedules.mean_probability(0.25, 10) == pytest.approx(0.25)
  # Optax's own schedules work as p(t).
  s = optax.cosine_decay_schedule(1.0, decay_steps=100)
  np.testing.assert_allclose(schedules.mean_probability(s, 100),
                             values(s, 100).mean(), rtol=1e-6)


def test_matching_lam():
  assert schedules.matching_lam(0.5, 100) == pytest.approx(2.0)
  assert schedules.matching_lam(0.25, 100, target=0.5) == pytest.approx(2.0)
  s = schedules.linear(0.0, 1.0, 1000)
  lam = schedules.matching_lam(s, 1000)
  assert lam * schedules.mean_probability(s, 1000) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='mean probability 0'):
    schedules.matching_lam(0.0, 100)
  with pytest.raises(ValueError, match='`target`'):
    schedules.matching_lam(0.5, 100, target=0.0)


def test_schedules_drive_rst():
  s = schedules.piecewise(0.0, 1.0, boundary=10)
  took = rst_optax.decisions(s, 0, 0, 20)
  assert not took[:10].any() and took[10:].all()


@pytest.mark.parametrize('make, name', [
    (lambda: schedules.constant(1.2), '`p`'),
    (lambda: schedules.constant(float('nan')), '`p`'),
    (lambda: schedules.piecewise(0.1, -0.1, 5), '`p_after`'),
    (lambda: schedules.piecewise(0.1, 0.2, -5), '`boundary`'),
    (lambda: schedules.piecewise(0.1, 0.2, 2.5), '`boundary`'),
    (lambda: schedules.linear(2.0, 0.5, 10), '`p_start`'),
    (lambda: schedules.linear(0.0, 0.5, 0), '`total_steps`'),
    (lambda: schedules.trigonometric(0.0, 1.5, 10), '`p_end`'),
    (lambda: schedules.trigonometric(0.0, 1.0, True), '`total_steps`'),
    (lambda: schedules.mean_probability(0.5, 0), '`total_steps`'),
    (lambda: schedules.piecewise(0.0, 1.0, 2**31), 'piecewise: `boundary`'),
    (lambda: schedules.linear(0.0, 1.0, 2**31), 'linear: `total_steps`'),
    (lambda: schedules.trigonometric(0.0, 1.0, 2**31),
     'trigonometric: `total_steps`'),
    (lambda: schedules.mean_probability(0.5, 2**31),
     'mean_probability: `total_steps`'),
    (lambda: schedules.mean_probability(2.0, 10), 'mean_probability: `schedule`'),
    (lambda: schedules.mean_probability(float('nan'), 10),
     'mean_probability: `schedule`'),
    (lambda: schedules.mean_probability(True, 10), 'mean_probability: `schedule`'),
    (lambda: schedules.mean_probability('0.5', 10),
     'mean_probability: `schedule`'),
    (lambda: schedules.matching_lam(2.0, 10), 'matching_lam: `schedule`'),
    (lambda: schedules.matching_lam(lambda t: jnp.nan, 10),
     'matching_lam: `schedule` returned NaN at step 0'),
    (lambda: schedules.matching_lam(0.5, 10, target=True),
     'matching_lam: `target`'),
    (lambda: schedules.matching_lam(0.5, 10, target=np.bool_(True)),
     'matching_lam: `target`'),
    (lambda: schedules.matching_lam(0.5, 10, target=np.str_('1.0')),
     'matching_lam: `target`'),
    (lambda: schedules.matching_lam(0.5, 10, target=np.array('1.0')),
     'matching_lam: `target`'),
    (lambda: schedules.matching_lam(0.5, 10, target=-1.0),
     'matching_lam: `target`'),
    (lambda: schedules.family('cosine', 0.5, 10), 'family: `name`'),
    (lambda: schedules.family('linear', 1.5, 10), 'family: `mean_p`'),
    (lambda: schedules.family('linear', True, 10), 'family: `mean_p`'),
    (lambda: schedules.family('linear', 0.5, 0), 'family: `total_steps`'),
    (lambda: schedules.family('linear', 0.5, 2**31), 'family: `total_steps`'),
    # 1/k for a k past the int32 step count: named as family's, not
    # periodic's `every`.
    (lambda: schedules.family('periodic', 1e-10, 100), 'family: .*`mean_p`'),
    (lambda: schedules.family('periodic', 1 / 2**31, 100),
     'family: .*`mean_p`'),
    # Near 1/3 but not 1/3: not taken for periodic(3).
    (lambda: schedules.family('periodic', 0.331, 100),
     "family: for name='periodic', `mean_p` must be 1/k"),
    (lambda: schedules.family('periodic', 1 / 3 + 1e-7, 100),
     "family: for name='periodic', `mean_p` must be 1/k"),
])
def test_bad_schedule_arguments(make, name):
  with pytest.raises((TypeError, ValueError), match=name):
    make()


def test_schedules_reach_the_last_step():
  last = 2**31 - 1
  assert float(schedules.linear(0.0, 1.0, last)(last - 1)) == pytest.approx(1.0)
  assert float(schedules.trigonometric(0.0, 1.0, last)(last - 1)) == (
      pytest.approx(1.0))
  s = schedules.piecewise(0.0, 1.0, last)
  assert float(s(last - 1)) == 0.0 and float(s(last)) == 1.0


def test_families():
  assert schedules.FAMILIES == ('constant', 'piecewise', 'linear',
                                'trigonometric', 'periodic')
  total = 400
  rising = values(schedules.family('linear', 0.3, total), total)
  np.testing.assert_allclose(rising[[0, total // 2]], [0.0, 0.3], atol=1e-6)
  assert np.all(np.diff(rising) > 0)
  switch = values(schedules.family('piecewise', 0.25, total), total)
  np.testing.assert_array_equal(switch, np.arange(total) >= 300)
  high = values(schedules.family('trigonometric', 0.75, total), total + 1)
  assert high[0] == pytest.approx(0.5) and high[-1] == pytest.approx(1.0)


@pytest.mark.parametrize('name', schedules.FAMILIES)
@pytest.mark.parametrize('mean_p', [0.0, 0.1, 0.5, 0.8, 1.0])
def test_each_family_has_the_mean_it_was_given(name, mean_p):
  total = 1000
  if name == 'periodic' and mean_p == 0.8:  # 1 / 0.8 is not a whole number
    with pytest.raises(ValueError, match="family: for name='periodic', "
                       r'`mean_p` must be 1/k .* got 0.8'):
      schedules.family(name, mean_p, total)
    return
  s = schedules.family(name, mean_p, total)
  assert schedules.mean_probability(s, total) == pytest.approx(
      mean_p, abs=1 / (2 * total) + 1e-6)


@pytest.mark.parametrize('every', [1, 2, 3, 5])
def test_periodic_takes_sam_exactly_every_k_steps_whatever_the_seed(every):
  s = schedules.periodic(every)
  want = np.arange(60) % every == every - 1
  np.testing.assert_array_equal(values(s, 60), want.astype(np.float32))
  for seed in range(3):  # p(t) in {0, 1}: the coin is certain
    plan = rst_optax.decisions(s, seed, 0, 60)
    np.testing.assert_array_equal(plan, want)
  assert schedules.family('periodic', 1 / every, 60)(every - 1) == 1.0
  assert schedules.matching_lam(s, 60 * every) == pytest.approx(every)
  # the in-graph branch takes the same steps as the host-side plan
  tx = rst_optax.rst(optax.sgd(0.1), s, rho=0.1, seed=0)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  grad_fn = lambda p: jax.tree.map(lambda x: 2 * x, p)
  taken = []
  for _ in range(2 * every):
    before = int(state.sam_steps)
    _, state = tx.update(params, state, params, grad_fn=grad_fn)
    taken.append(int(state.sam_steps) > before)
  np.testing.assert_array_equal(taken, want[:2 * every])


@pytest.mark.parametrize('every', [93, 99, 105, 117, 123, 2**31 - 1])
def test_periodic_family_takes_the_nearest_whole_period(every):
  """1 / (1 / k) is just below k for some k: the period is k, not k - 1."""
  s = schedules.family('periodic', 1 / every, 1000)
  steps = np.array([every - 2, every - 1, every, 2 * every - 1, 2 * every])
  steps = steps[steps <= 2**31 - 1]
  np.testing.assert_array_equal(
      [float(s(t)) for t in steps], (steps % every == every - 1))


def test_periodic_refuses_a_period_below_one():
  with pytest.raises(ValueError, match='periodic: `every`'):
    schedules.periodic(0)
  with pytest.raises(TypeError, match='periodic: `every`'):
    schedules.periodic(2.0)
  assert float(schedules.periodic(3)(2**31 - 1)) == float(
      (2**31 - 1) % 3 == 2)


def test_a_vector_schedule_is_refused():
  with pytest.raises(TypeError, match='mean_probability: .*`schedule`.* must '
                     'return a real scalar'):
    schedules.mean_probability(lambda t: jnp.ones(2) / 2, 10)
