"""User groups for Gymnasium's MuJoCo locomotion envs.

The envs are Gymnasium's own (``gym.make("HalfCheetah-v5")``); this module only
names the groups whose true rewards a population can be built from. Importing
it does not import MuJoCo: the functions read arrays from :class:`Transitions`.

Every function takes transitions with any leading shape ``(...)`` (one step, a
batch, or segments ``(n, L)``) and returns rewards of that shape. They are
called once per group on every env step by
:class:`~egalitarian_rl.preferences.MultiUserPreferenceWrapper`, so they use
builtin ``abs`` and plain arithmetic (cheap on numpy scalars, broadcasting on
arrays) rather than numpy ufuncs, which cost about a microsecond on a scalar.

HalfCheetah-v5 ``info`` (measured, gymnasium 1.4): ``x_position``,
``x_velocity``, ``reward_forward`` (= ``x_velocity``) and ``reward_ctrl``
(``-0.1 * |a|^2``, float32; ``|a|^2 <= 6``, about 2 per step under uniform
random actions). Hopper-v5 and Walker2d-v5 add ``z_distance_from_origin`` and
``reward_survive`` (1.0 while healthy, 0.0 on the step that makes the robot
unhealthy, which ends the episode by default). Reacher-v5's groups read the
fingertip's position from the observation (measured: ``obs[4:6] + obs[8:10]``, the
env's target plus the fingertip's offset from it, equals ``get_body_com("fingertip")``).
"""

from __future__ import annotations

import numpy as np

from egalitarian_rl.preferences.population import GroupRewardLibrary
from egalitarian_rl.preferences.segments import Transitions

#: Speed (m/s) the HalfCheetah "gentle" group wants; a trained PPO runner reaches ~2-5.
GENTLE_SPEED = 1.0
#: Weight on ``|a|^2`` relative to the speed error in "gentle" (``10 * reward_ctrl = -|a|^2``).
GENTLE_CTRL_SCALE = 10.0
#: Observation index of the torso angle (radians) in Hopper-v5 and Walker2d-v5 with the
#: default ``exclude_current_positions_from_observation=True`` (obs = qpos[1:], qvel: z, angle, ...).
TORSO_ANGLE_INDEX = 1


# --- HalfCheetah-v5 ---------------------------------------------------------------------------


def cheetah_fast(t: Transitions) -> np.ndarray:
    """Forward velocity ``x_velocity`` (m/s): the usual HalfCheetah objective without control cost."""
    return t.infos["x_velocity"]


def cheetah_backward(t: Transitions) -> np.ndarray:
    """Backward velocity ``-x_velocity``: maximal conflict with "fast" (its compromise is standing still)."""
    return -t.infos["x_velocity"]


def cheetah_gentle(t: Transitions) -> np.ndarray:
    """Run at a moderate speed with small actions: ``10 * reward_ctrl - |x_velocity - 1|`` = ``-|a|^2 - |v - 1|``.

    Plain ``-|a|^2`` barely conflicts with "fast" (a trained runner already uses
    small actions, measured in docs/DESIGN.md); the speed target makes a fast runner cost
    this group ``|v - 1|`` per step. Best value 0 (standing still costs 1 per step).
    """
    return GENTLE_CTRL_SCALE * t.infos["reward_ctrl"] - abs(t.infos["x_velocity"] - GENTLE_SPEED)


def cheetah_calm(t: Transitions) -> np.ndarray:
    """Stay put with small actions: ``reward_ctrl - |x_velocity|`` (the "calm" group of docs/DESIGN.md). Best value 0."""
    return t.infos["reward_ctrl"] - abs(t.infos["x_velocity"])


HALF_CHEETAH_GROUPS = GroupRewardLibrary(
    {"fast": cheetah_fast, "backward": cheetah_backward, "gentle": cheetah_gentle, "calm": cheetah_calm},
    info_keys=("x_velocity", "reward_ctrl"),
)


# --- Hopper-v5 and Walker2d-v5 ----------------------------------------------------------------


def walker_fast(t: Transitions) -> np.ndarray:
    """Forward velocity ``x_velocity`` (no survival bonus, no control cost)."""
    return t.infos["x_velocity"]


def walker_steady(t: Transitions) -> np.ndarray:
    """Stay healthy and slow: ``reward_survive - |x_velocity|`` (1 per step standing still, 0 for the fall)."""
    return t.infos["reward_survive"] - abs(t.infos["x_velocity"])


def walker_upright(t: Transitions) -> np.ndarray:
    """Stay healthy with the torso vertical: ``reward_survive - |torso angle|`` (angle from ``next_obs``).

    Assumes the default observation layout (``exclude_current_positions_from_observation=True``).
    """
    return t.infos["reward_survive"] - abs(t.next_obs[..., TORSO_ANGLE_INDEX])


#: Same groups for Hopper-v5 and Walker2d-v5 (both put z then the torso angle first in obs).
#:
#: Hopper-v5 ``fast`` (0.8) vs ``steady`` (0.2) is the second body of ``benchmarks/mujoco.py``
#: (shipped config ``hopper``). They truly conflict: ``fast`` has no survival bonus, so the
#: quickest way for PPO to earn it is to throw the body forward and fall (an episode of ~150
#: steps); ``steady`` earns 1 per healthy step minus ``|v|``, so it wants the hopper balanced and
#: still for the whole 1000 steps. Each metre forward costs ``steady`` what it gives ``fast``, and a
#: fall ends ``steady``'s stream of +1s. A single reward fitted to the 80/20 answers is mostly
#: speed, and its policy dives. Measured (true returns fast / steady, seed 0, 50k PPO steps,
#: normalised observations): oracle_fast 221 / -93, oracle_steady 0 / 999, single-reward RLHF
#: 141 / 111, MaxMin 14 / 986 (worst_group) and 16 / 984 (per_sample_min). A slow forward shuffle
#: for the whole episode (speed ``v`` for 1000 steps gives ``fast`` ``1000 v`` and ``steady``
#: ``1000 (1 - v)``) is where the groups' z-scored returns are equal: at ``v`` = 0.097 with the
#: random-action statistics MaxMinPPO z-scores with (``benchmarks/maxmin_point.py``), i.e. ``fast``
#: 97 per episode. So MaxMin standing still (``fast`` 13-29) is near its max-min point, and that
#: point gives the majority less than RLHF's dive on most seeds (36, 414, 334 at 100k steps).
#: ``fast`` vs ``upright`` does not make a second body either (design trial 2026-11-25, seed 0, 100k
#: steps, ``worst_group``, true returns fast / upright): single-reward RLHF 595 / 271 serves both
#: groups (its forward hop stays upright enough), and MaxMin 217 / 142 is worse for both.
#: Nor does ``fast`` vs "paced" (``reward_survive - |x_velocity - 0.5|``: stay up and go forward at
#: 0.5 m/s, so a cheap compromise exists; design trial 2026-12-05, the ``hopper`` config with that
#: group, ``rlhf`` and ``maxmin`` only, seeds 0-2, true returns fast / paced): RLHF 162 / 79, 1411 / 83,
#: 89 / 589; MaxMin 438 / 366, 121 / 153, 24 / 524. Over seed pairs MaxMin wins the minority in 6 of
#: 9 (0.67) but the majority in 3 of 9 (0.33): MaxMin learned a steady forward hop on seed 0 only,
#: and EM found the groups on seed 1 with ARI 0.63 only; ``worst_group`` on averaged selections
#: (``average: true, warmup: 10``, as on FairGrid) did no better (897 / -143, 122 / 120, 21 / 521:
#: seed 0 now ran for the majority). The same day on HalfCheetah-v5 (seed 0,
#: 200k steps, normalised observations, true returns fast / minority): against ``gentle`` RLHF
#: 3349 / -3708, MaxMin 2186 / -1945; against "efficient" (``-|a|^2`` alone) RLHF 3561 / -1245,
#: MaxMin 1652 / -404. HalfCheetah's RLHF runs reliably near the majority's reach, so every minority
#: that truly conflicts with speed costs the majority 35-55% at MaxMin's point, far more than the
#: spread between RLHF seeds.
WALKER_GROUPS = GroupRewardLibrary(
    {"fast": walker_fast, "steady": walker_steady, "upright": walker_upright},
    info_keys=("x_velocity", "reward_survive"),
)


# --- Reacher-v5 -------------------------------------------------------------------------------

#: The goals (x, y in metres; the arm reaches 0.01-0.21 m from its base at the origin) of the
#: Reacher groups: one above and one below the x-axis, 0.3 m apart, both 0.16 m from the base.
#: The point halfway between, (0.05, 0), is reachable too: there both groups are 0.15 m from
#: their goal, the max-min compromise.
NORTH_GOAL = (0.05, 0.15)
SOUTH_GOAL = (0.05, -0.15)


def fingertip_distance(t: Transitions, goal: tuple[float, float]) -> np.ndarray:
    """Metres from the fingertip after the step (``next_obs[4:6] + next_obs[8:10]``) to ``goal``.

    Reacher's own target (random each episode, part of the observation) plays no part: the
    groups want the fingertip at their fixed point, like FairGrid's goals A and B.
    """
    tip_x = t.next_obs[..., 4] + t.next_obs[..., 8]
    tip_y = t.next_obs[..., 5] + t.next_obs[..., 9]
    return ((tip_x - goal[0]) ** 2 + (tip_y - goal[1]) ** 2) ** 0.5


def reacher_north(t: Transitions) -> np.ndarray:
    """Fingertip at :data:`NORTH_GOAL`: ``-distance`` (m) per step. Best value 0."""
    return -fingertip_distance(t, NORTH_GOAL)


def reacher_south(t: Transitions) -> np.ndarray:
    """Fingertip at :data:`SOUTH_GOAL`: ``-distance`` (m) per step. Best value 0."""
    return -fingertip_distance(t, SOUTH_GOAL)


#: Reacher-v5 ``north`` vs ``south``: a MuJoCo arm with FairGrid's conflict (two goals, a
#: compromise between them). Each group's optimum costs the other 0.3 m per step; the
#: midpoint costs both 0.15 m. Episodes are 50 steps, so PPO learns a fixed reach in tens of
#: thousands of steps: the cheap MuJoCo domain of ``benchmarks/impossibility.py``.
REACHER_GROUPS = GroupRewardLibrary({"north": reacher_north, "south": reacher_south})
