"""Reading jaxprs in tests: the conds that choose between RST's branches."""

import jax
import jax.extend


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def gradient_conds(closed_jaxpr) -> int:
  """How many ``cond``s, at any depth, hold a ``dot_general`` in a branch.

  In the tests' models every gradient has a matrix product, so these are the
  conds that choose between RST's branches (the SAM branch evaluates
  ``grad_fn``). ``rst`` may trace others, which hold no product: the choice
  of platform and, on CPU, the norm of the perturbation.
  """

  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'cond' and any(
          'dot_general' in str(branch) for branch in eqn.params['branches']):
        n += 1
      n += sum(count(sub) for sub in _subjaxprs(eqn))
    return n

  return count(closed_jaxpr.jaxpr)
