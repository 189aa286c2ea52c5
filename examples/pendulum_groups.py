"""Three user groups for Gymnasium's Pendulum-v1, defined outside the package.

Used by ``examples/pendulum.yaml`` (``groups_from: "pendulum_groups:GROUPS"``) to
show that the pipeline runs on an env the package ships no groups for. Pendulum's
observation is ``(cos theta, sin theta, theta_dot)``; theta = 0 is upright.
A group reward gets :class:`~egalitarian_rl.preferences.Transitions` with any
leading shape ``(...)`` (one step, or ``(n, L)`` segments) and returns ``(...)``.
"""

import numpy as np

from egalitarian_rl.preferences import GroupRewardLibrary, Transitions


def upright(t: Transitions) -> np.ndarray:
    """Keep the pole up: cos(theta) after the step, in [-1, 1]."""
    return np.asarray(t.next_obs)[..., 0]


def still(t: Transitions) -> np.ndarray:
    """Move little: minus the angular speed after the step."""
    return -np.abs(np.asarray(t.next_obs)[..., 2])


def gentle(t: Transitions) -> np.ndarray:
    """Push softly: minus the squared torque."""
    return -np.square(np.asarray(t.acts)).sum(axis=-1)


GROUPS = GroupRewardLibrary({"upright": upright, "still": still, "gentle": gentle})
