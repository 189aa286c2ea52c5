"""User groups for Gymnasium's classic-control envs: cheap envs for tests and demos.

CartPole-v1 has an empty ``info``, so its groups read the observation
(``[cart position, cart velocity, pole angle, pole angular velocity]``).
"""

from __future__ import annotations

import numpy as np

from egalitarian_rl.preferences.population import GroupRewardLibrary
from egalitarian_rl.preferences.segments import Transitions


def cartpole_left(t: Transitions) -> np.ndarray:
    """Cart position after the step, negated: prefers the cart on the left."""
    return -t.next_obs[..., 0]


def cartpole_right(t: Transitions) -> np.ndarray:
    """Cart position after the step: prefers the cart on the right."""
    return t.next_obs[..., 0]


CARTPOLE_GROUPS = GroupRewardLibrary({"left": cartpole_left, "right": cartpole_right})
