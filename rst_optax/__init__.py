"""rst_optax: Randomized Sharpness-Aware Training (RST, G-RST) for Optax."""

from rst_optax import schedules, sharpness
from rst_optax._coin import coin
from rst_optax._decisions import decisions, iter_decisions
from rst_optax._dispatch import HostDispatch, recommended_dispatch
from rst_optax._rst import RSTReuseState, RSTState, RSTWindowState, rst
from rst_optax._types import GradFn, ScalarOrSchedule, Seed

__version__ = '0.2.0.dev0'

__all__ = [
    'GradFn',
    'HostDispatch',
    'RSTReuseState',
    'RSTState',
    'RSTWindowState',
    'ScalarOrSchedule',
    'Seed',
    'coin',
    'decisions',
    'iter_decisions',
    'recommended_dispatch',
    'rst',
    'schedules',
    'sharpness',
]
