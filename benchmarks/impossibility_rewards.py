"""The impossibility sweep's minority rewards: the majority's and the minority's true rewards mixed.

At distance ``d`` the minority's true step reward is

    r_d = (1 - d) * r_majority + d * r_minority

and the majority keeps ``r_majority``. Why this is a distance between the groups: the two groups
agree on a fraction ``1 - d`` of what the minority values, so ``d = 0`` makes the groups identical
(nothing to be unfair about), ``d = 1`` gives the minority its own reward of the env's group
library (the shipped conflict), and in between the minority's preferences turn steadily away from
the majority's. On FairGrid (per-step values: majority A 1.0, C 0.8; minority B 1.0, C 0.6) the
minority values A at ``1 - d``, B at ``d`` and the compromise C at ``0.8 - 0.2 d``. The
share-weighted reward with minority share ``s`` prefers A to C exactly when ``s * d < 0.25``, so a
single reward fitted to everyone abandons the minority (it earns ``1 - d`` per step at A, 0 at
``d = 1``) for small shares and large distances: the paper's theorem in one inequality. On
Reacher-v5 the minority's reward is ``-(1 - d) |tip - north| - d |tip - south|``: its best point is
the north goal for ``d < 1/2`` (the groups then want the same place) and the south goal above it.

Every function is named ``<domain>_minority_d<p>_<q>`` for ``d = p / q`` (``fairgrid_minority_d1_3``
is ``d = 1/3``, ``halfcheetah_minority_d1_1`` is ``d = 1``) and resolved on first access by the
module's ``__getattr__``, so a config's ``reward: "benchmarks.impossibility_rewards:<name>"`` works
for any distance, in this process and in any subprocess that imports the module. Each is a
:class:`MixedReward`: it takes :class:`~egalitarian_rl.preferences.Transitions` with any leading
shape and returns rewards of that shape, and pickles by name.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from egalitarian_rl.envs.gridworld import GROUPS as FAIRGRID_GROUPS
from egalitarian_rl.envs.mujoco import HALF_CHEETAH_GROUPS, REACHER_GROUPS

from egalitarian_rl.preferences.population import GroupRewardLibrary
from egalitarian_rl.preferences.segments import Transitions


@dataclass(frozen=True)
class Domain:
    """One setting of the sweep.

    :param config: the shipped config the sweep derives its points from (``egalitarian_rl/experiments/configs``).
    :param majority: the majority's group name in the env's library (it keeps this reward).
    :param minority: the minority's group name in the library (its reward at ``d = 1``).
    :param library: the env's group rewards.
    """

    config: str
    majority: str
    minority: str
    library: GroupRewardLibrary


#: The sweep's domains: FairGrid (majority goal A vs minority goal B), Reacher-v5 (fingertip at the
#: north vs the south point: FairGrid's conflict on a MuJoCo arm) and HalfCheetah-v5 (fast vs calm).
DOMAINS: dict[str, Domain] = {
    "fairgrid": Domain("fairgrid", "majority", "minority", FAIRGRID_GROUPS),
    "reacher": Domain("reacher", "north", "south", REACHER_GROUPS),
    "halfcheetah": Domain("halfcheetah", "fast", "calm", HALF_CHEETAH_GROUPS),
}
_NAME = re.compile(r"^(?P<domain>[a-z0-9]+)_minority_d(?P<p>\d+)_(?P<q>\d+)$")


class MixedReward:
    """``(1 - d) * r_majority + d * r_minority`` of one domain, for ``d`` in ``[0, 1]``.

    :param domain: a key of :data:`DOMAINS`.
    :param distance: ``d``; kept as a fraction so its name (and a config's ``reward`` string) is exact.
    """

    def __init__(self, domain: str, distance: Fraction) -> None:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; choose from {sorted(DOMAINS)}")
        if not 0 <= distance <= 1:
            raise ValueError(f"distance must be in [0, 1], got {distance}")
        self.domain, self.distance = domain, Fraction(distance)
        spec = DOMAINS[domain]
        self._majority: Callable[[Transitions], Any] = spec.library.rewards[spec.majority]
        self._minority: Callable[[Transitions], Any] = spec.library.rewards[spec.minority]
        # Plain floats: the wrapper calls this once per env step, where Fraction arithmetic would dominate.
        self._weight = float(self.distance)

    @property
    def name(self) -> str:
        """The module attribute that resolves to this reward."""
        return mixed_reward_name(self.domain, self.distance)

    def __call__(self, transitions: Transitions) -> np.ndarray:
        return (1.0 - self._weight) * self._majority(transitions) + self._weight * self._minority(transitions)

    def __reduce__(self) -> tuple[Callable[[str], MixedReward], tuple[str]]:
        # The library's rewards can be closures (FairGrid's): pickle the name, not them.
        return _by_name, (self.name,)

    def __repr__(self) -> str:
        return f"MixedReward({self.domain!r}, d={self.distance})"


def mixed_reward_name(domain: str, distance: Fraction) -> str:
    """``<domain>_minority_d<p>_<q>``: the attribute of this module holding that mixed reward."""
    distance = Fraction(distance)
    return f"{domain}_minority_d{distance.numerator}_{distance.denominator}"


def _by_name(name: str) -> MixedReward:
    # Through the module, so the cached global is found first: one object per name in a process.
    reward = getattr(sys.modules[__name__], name)
    assert isinstance(reward, MixedReward)
    return reward


def __getattr__(name: str) -> Any:
    """PEP 562: ``<domain>_minority_d<p>_<q>`` -> its :class:`MixedReward`, created once and cached as a global."""
    match = _NAME.match(name)
    if match is None or match["domain"] not in DOMAINS or int(match["q"]) == 0:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    distance = Fraction(int(match["p"]), int(match["q"]))
    if mixed_reward_name(match["domain"], distance) != name:
        # d2_6 would be a second name for d1_3: one name per reward, so one stage key per point.
        raise AttributeError(f"{name!r}: write the distance in lowest terms ({mixed_reward_name(match['domain'], distance)!r})")
    reward = MixedReward(match["domain"], distance)
    globals()[name] = reward
    return reward
