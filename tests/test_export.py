"""What a compiled train step holds on GPU and TPU, checked without the hardware.

``jax.export`` lowers a jitted step for a platform that is not present, so the
StableHLO module that a GPU or TPU would compile can be read here. For a
multi-layer perceptron whose gradient has a known number of ``dot_general``
ops, these tests check that:

- the step with the coin drawn in the graph holds exactly one conditional, and
  the second gradient's ops sit inside it (the SAM branch) and nowhere else;
- nothing in it leaves the device: no custom call (which is how host callbacks
  lower), no infeed/outfeed, no send/recv;
- the two steps of host dispatch (``take_sam=True``/``False``) hold no
  conditional, and two and one gradients' worth of ops respectively.

The module is read as text: debug locations are stripped, then regions and
function bodies are delimited by walking the braces, and calls to private
functions are followed, so ops are counted where they would run.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rst_optax

PLATFORMS = ('cuda', 'tpu')
WIDTHS = (8, 32, 16, 16, 4)  # input, three hidden layers, output
LAYERS = len(WIDTHS) - 1
# One gradient of the loss in the parameters: LAYERS products forward, and
# backward one per weight plus one per layer input except the data's.
DOTS_PER_GRAD = 3 * LAYERS - 1
CONDITIONALS = ('stablehlo.case', 'stablehlo.if')
CALLS = ('call', 'func.call')
# Ops through which a step would leave the device or stop for the host.
OFF_DEVICE = ('stablehlo.custom_call', 'stablehlo.infeed',
              'stablehlo.outfeed', 'stablehlo.send', 'stablehlo.recv')
DOT = 'stablehlo.dot_general'


# ----------------------------------------------------------------------------
# Reading StableHLO text.


def _strip_debug_info(text):
  """Drops ``#locN = ...`` definitions and every `` loc(...)`` annotation."""
  lines = [line for line in text.splitlines() if not line.startswith('#loc')]
  text = '\n'.join(lines)
  out, i = [], 0
  while True:
    j = text.find(' loc(', i)
    if j < 0:
      out.append(text[i:])
      return ''.join(out)
    out.append(text[i:j])
    k, depth, in_string = j + len(' loc('), 1, False
    while depth:
      c = text[k]
      if in_string:
        if c == '\\':
          k += 1
        elif c == '"':
          in_string = False
      elif c == '"':
        in_string = True
      elif c == '(':
        depth += 1
      elif c == ')':
        depth -= 1
      k += 1
    i = k


def _brace_steps(line):
  """The running brace depth changes of ``line``, ignoring quoted strings."""
  steps, in_string, escaped = [], False, False
  for c in line:
    if in_string:
      if escaped:
        escaped = False
      elif c == '\\':
        escaped = True
      elif c == '"':
        in_string = False
    elif c == '"':
      in_string = True
    elif c == '{':
      steps.append(1)
    elif c == '}':
      steps.append(-1)
  return steps


def _regions(lines, start):
  """The regions of the op that opens on ``lines[start]``, as lists of lines.

  Walks the braces from that line: a line wholly inside one of the op's
  regions (nested regions included) belongs to it; a line where the depth
  drops to the op's own level (``}, {``, ``})``) ends one region and may
  open the next. Stops where the op's last region closes.
  """
  regions, current, depth = [], None, 0
  for index in range(start, len(lines)):
    line = lines[index]
    low = depth
    for step in _brace_steps(line):
      depth += step
      low = min(low, depth)
    if index > start and low >= 1:
      current.append(line)
      continue
    # A delimiter line: it closes the current region and/or opens a new one.
    if current is not None and low == 0:
      regions.append(current)
      current = None
    if depth >= 1:
      assert depth == 1, f'unexpected region opener: {line!r}'
      current = []
    elif index > start or regions:
      return regions
  raise AssertionError(f'unbalanced braces after: {lines[start]!r}')


_OP_NAME = re.compile(r'^\s*(?:%[^=]*=\s*)?"?([A-Za-z_][\w.]*)')
_CALLEE = re.compile(r'@([\w$.-]+)')


def _op_name(line):
  """The name of the op that ``line`` starts, or None (delimiters, labels)."""
  match = _OP_NAME.match(line)
  return match.group(1) if match else None


_CONSTANT = re.compile(r'^\s*(%[\w#]+)\s*=\s*stablehlo\.constant\b')
_CASE = re.compile(r'^\s*(%[\w#]+)(?::\d+)?\s*=\s*"stablehlo\.case"\((%[\w#]+)\)')
# The name given to a case resolved when compiling (see _mark_platform_cases).
PLATFORM_CASE = 'stablehlo.case_on_platform'


def _mark_platform_cases(lines):
  """Renames the cases that ``jax.lax.platform_dependent`` leaves behind.

  Lowered for one platform, ``platform_dependent`` becomes a ``case`` on a
  constant index (and cases on that one's result): the compiler resolves
  them, and no conditional runs. Such a case is renamed ``PLATFORM_CASE``,
  so that only conditionals decided at run time count as conditionals.
  """
  out, static = [], set()
  for line in lines:
    if _op_name(line) == 'func.func':
      static = set()  # SSA names are local to a function
    constant, case = _CONSTANT.match(line), _CASE.match(line)
    if constant:
      static.add(constant.group(1))
    elif case and case.group(2) in static:
      static.add(case.group(1))
      line = line.replace('"stablehlo.case"', f'"{PLATFORM_CASE}"', 1)
    out.append(line)
  return out


class StableHLO:
  """A lowered module: its functions' bodies, ops counted through calls."""

  def __init__(self, text):
    self.lines = _mark_platform_cases(_strip_debug_info(text).splitlines())
    self.functions = {}
    self._callee_counts = {}
    for index, line in enumerate(self.lines):
      if _op_name(line) == 'func.func':
        name = _CALLEE.search(line).group(1)
        (self.functions[name],) = _regions(self.lines, index)
    assert 'main' in self.functions, 'no @main function in the module'

  def _function_counts(self, name):
    if name not in self._callee_counts:
      self._callee_counts[name] = self.counts(self.functions[name])
    return self._callee_counts[name]

  def counts(self, lines=None):
    """Ops in ``lines`` (default: @main), following calls into their callees."""
    lines = self.functions['main'] if lines is None else lines
    counts = collections.Counter()
    for line in lines:
      name = _op_name(line)
      if name is None:
        continue
      counts[name] += 1
      if name in CALLS:
        counts.update(self._function_counts(_CALLEE.search(line).group(1)))
    return counts

  def conditionals(self, lines=None):
    """The regions of every conditional in ``lines`` (default: everywhere).

    Looks in the function bodies too, so a conditional inside a private
    function is found. Returns one list of regions per conditional.
    """
    lines = self.lines if lines is None else lines
    return [_regions(lines, index) for index, line in enumerate(lines)
            if _op_name(line) in CONDITIONALS]


def _n_conditionals(counts):
  return sum(counts[name] for name in CONDITIONALS)


def _assert_on_device(module):
  """Nothing in the step leaves the device or waits for the host."""
  counts = module.counts()
  off = {name: counts[name] for name in OFF_DEVICE if counts[name]}
  assert not off, f'ops that leave the device: {off}'
  assert 'callback' not in '\n'.join(module.lines), 'a host callback'
  dialects = {name.split('.')[0] for name in counts if '.' in name}
  assert dialects <= {'stablehlo', 'chlo', 'func'}, f'dialects: {dialects}'


def _assert_cond_step(module):
  """One conditional; the second gradient inside its SAM branch only."""
  counts = module.counts()
  assert _n_conditionals(counts) == 1, (
      f'{_n_conditionals(counts)} conditionals reached from @main; want 1')
  assert counts[DOT] == 2 * DOTS_PER_GRAD, (
      f'{counts[DOT]} dot_generals; want two gradients, {2 * DOTS_PER_GRAD}')
  (branches,) = module.conditionals()
  assert len(branches) == 2, f'{len(branches)} branches; want 2'
  # One branch (the base branch) holds no product, the other (the SAM branch)
  # one gradient. Sorted: a case lists the false branch first, an if last.
  per_branch = sorted(module.counts(branch)[DOT] for branch in branches)
  assert per_branch == [0, DOTS_PER_GRAD], (
      f'dot_generals per branch: {per_branch}; want [0, {DOTS_PER_GRAD}]')
  _assert_on_device(module)


def _assert_host_step(module, gradients):
  """No conditional; ``gradients`` gradients' worth of dot_generals."""
  counts = module.counts()
  assert _n_conditionals(counts) == 0, (
      f'{_n_conditionals(counts)} conditionals; want none')
  assert counts[DOT] == gradients * DOTS_PER_GRAD, (
      f'{counts[DOT]} dot_generals; want {gradients * DOTS_PER_GRAD}')
  _assert_on_device(module)


# ----------------------------------------------------------------------------
# The model and the train steps.


def _problem():
  """Parameters and a batch; only their shapes and dtypes reach the export."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  params = {
      f'dense_{i}': {'w': normal(n_in, n_out) / np.sqrt(n_in),
                     'b': np.zeros(n_out, np.float32)}
      for i, (n_in, n_out) in enumerate(
          zip(WIDTHS[:-1], WIDTHS[1:], strict=True))
  }
  batch = (normal(16, WIDTHS[0]), normal(16, WIDTHS[-1]))
  return params, batch


def _loss(params, batch):
  x, y = batch
  h = x
  for i in range(LAYERS):
    layer = params[f'dense_{i}']
    h = h @ layer['w'] + layer['b']
    if i < LAYERS - 1:
      h = jax.nn.relu(h)
  return jnp.mean((h - y) ** 2)


def _tx(schedule):
  return rst_optax.rst(optax.sgd(0.1, momentum=0.9), schedule, 0.05, 1.0,
                       seed=0)


def _train_step(tx, loss, take_sam=None):
  def step(params, opt_state, batch):
    grads = jax.grad(loss)(params, batch)
    grad_fn = jax.grad(lambda p: loss(p, batch))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn,
                                   take_sam=take_sam)
    return optax.apply_updates(params, updates), opt_state
  return step


def _export(step, tx, platform):
  params, batch = _problem()
  exported = jax.export.export(jax.jit(step), platforms=(platform,))(
      params, tx.init(params), batch)
  assert exported.platforms == (platform,)
  return StableHLO(exported.mlir_module())


SCHEDULES = {
    'constant_schedule': optax.constant_schedule(0.5),
    'float': 0.5,
}
# The loss as written, and jitted on its own: then its gradients lower to
# private functions that the step calls, and counting must follow the calls.
LOSSES = {'inline': _loss, 'jitted': jax.jit(_loss)}


# ----------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize('loss', LOSSES.values(), ids=LOSSES.keys())
def test_one_gradient_has_the_expected_dot_generals(loss):
  params, batch = _problem()
  exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=('cpu',))(
      params, batch)
  counts = StableHLO(exported.mlir_module()).counts()
  assert counts[DOT] == DOTS_PER_GRAD
  assert _n_conditionals(counts) == 0


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('loss', LOSSES.values(), ids=LOSSES.keys())
@pytest.mark.parametrize('schedule', SCHEDULES.values(), ids=SCHEDULES.keys())
def test_cond_step_holds_second_gradient_in_its_conditional(
    platform, loss, schedule):
  tx = _tx(schedule)
  _assert_cond_step(_export(_train_step(tx, loss), tx, platform))


@pytest.mark.parametrize('platform', PLATFORMS)
@pytest.mark.parametrize('take_sam,gradients', [(True, 2), (False, 1)])
def test_host_dispatch_steps_hold_no_conditional(platform, take_sam, gradients):
  tx = _tx(optax.constant_schedule(0.5))
  step = _train_step(tx, _loss, take_sam=take_sam)
  _assert_host_step(_export(step, tx, platform), gradients)


# The checks above must be able to fail: steps built wrong on purpose.


def _eager_step(tx):
  """The second gradient computed before the cond, handed in as a constant."""
  def step(params, opt_state, batch):
    grads = jax.grad(_loss)(params, batch)
    norm = optax.tree.norm(grads)
    perturbed = jax.tree.map(lambda w, g: w + 0.05 * g / norm, params, grads)
    g_sam = jax.grad(_loss)(perturbed, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=lambda p: g_sam)
    return optax.apply_updates(params, updates), opt_state
  return step


def _callback_step(tx):
  """A host callback inside the SAM branch's gradient."""
  def loss(params, batch):
    value = _loss(params, batch)
    jax.debug.callback(lambda v: None, value)
    return value
  return _train_step(tx, loss)


def _custom_call_step(tx):
  """A library kernel (a Cholesky factor: cuSOLVER on GPU) in the gradient."""
  def loss(params, batch):
    b = params['dense_0']['b'][:4]
    factor = jnp.linalg.cholesky(jnp.outer(b, b) + 4.0 * jnp.eye(4))
    return _loss(params, batch) * jnp.sum(jax.lax.stop_gradient(factor))
  return _train_step(tx, loss)


def test_checks_catch_a_gradient_outside_the_conditional():
  tx = _tx(0.5)
  module = _export(_eager_step(tx), tx, 'cuda')
  with pytest.raises(AssertionError, match=r'per branch: \[0, 0\]'):
    _assert_cond_step(module)


def test_checks_catch_a_missing_conditional():
  tx = _tx(0.5)
  module = _export(_train_step(tx, _loss, take_sam=True), tx, 'cuda')
  with pytest.raises(AssertionError, match='0 conditionals'):
    _assert_cond_step(module)


@pytest.mark.parametrize('platform', PLATFORMS)
def test_checks_catch_a_host_callback(platform):
  # jax.export itself refuses a host callback: it will not serialize one, and
  # for a platform absent here lowering one already fails for want of that
  # platform's backend. Were that to change, the callback would lower to a
  # custom call, which the check rejects.
  tx = _tx(0.5)
  try:
    module = _export(_callback_step(tx), tx, platform)
  except (NotImplementedError, ValueError) as error:
    assert 'callback' in str(error) or 'platform' in str(error), error
    return
  with pytest.raises(AssertionError, match='leave the device|callback'):
    _assert_cond_step(module)


def test_checks_catch_a_custom_call():
  tx = _tx(0.5)
  module = _export(_custom_call_step(tx), tx, 'cuda')
  with pytest.raises(AssertionError, match='stablehlo.custom_call'):
    _assert_cond_step(module)


def test_checks_catch_a_gradient_too_many():
  tx = _tx(0.5)
  step = _train_step(tx, _loss, take_sam=True)
  with pytest.raises(AssertionError, match='dot_generals; want 11'):
    _assert_host_step(_export(step, tx, 'tpu'), gradients=1)


def test_region_walk_splits_branches_and_follows_calls():
  text = '\n'.join([
      'module @m {',
      '  func.func public @main(%arg0: tensor<i32> {a = "}{"}) -> tensor<f32> {',
      '    %0 = "stablehlo.case"(%arg0) ({',
      '      %1 = stablehlo.constant dense<1.0> : tensor<f32> loc("{(")',
      '      stablehlo.return %1 : tensor<f32>',
      '    }, {',
      '      %2 = func.call @f() : () -> tensor<f32>',
      '      stablehlo.return %2 : tensor<f32>',
      '    }) : (tensor<i32>) -> tensor<f32>',
      '    return %0 : tensor<f32>',
      '  }',
      '  func.func private @f() -> tensor<f32> {',
      '    %0 = stablehlo.dot_general %a, %b : tensor<f32>',
      '    return %0 : tensor<f32>',
      '  }',
      '}',
  ])
  module = StableHLO(text)
  assert set(module.functions) == {'main', 'f'}
  (branches,) = module.conditionals()
  assert [len(b) for b in branches] == [2, 2]
  assert [module.counts(b)[DOT] for b in branches] == [0, 1]
  assert module.counts()[DOT] == 1
  assert module.counts()['stablehlo.case'] == 1


def test_cases_on_a_constant_index_are_not_counted_as_conditionals():
  lines = [
      'func.func public @main(%arg0: tensor<i32>) -> (tensor<i32>) {',
      '  %c = stablehlo.constant dense<1> : tensor<i32>',
      '  %0 = "stablehlo.case"(%c) ({',
      '    stablehlo.return %c : tensor<i32>',
      '  }) : (tensor<i32>) -> tensor<i32>',
      '  %1:2 = "stablehlo.case"(%0) ({',
      '    stablehlo.return %c, %c : tensor<i32>, tensor<i32>',
      '  }) : (tensor<i32>) -> (tensor<i32>, tensor<i32>)',
      '  %2 = "stablehlo.case"(%arg0) ({',
      '    stablehlo.return %c : tensor<i32>',
      '  }) : (tensor<i32>) -> tensor<i32>',
      '  return %2 : tensor<i32>',
      '}',
  ]
  counts = StableHLO('\n'.join(lines)).counts()
  assert counts[PLATFORM_CASE] == 2 and _n_conditionals(counts) == 1
