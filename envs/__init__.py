"""Gymnasium envs and their user groups, registered under ``egalitarian_rl/``.

Importing ``egalitarian_rl.envs`` (or ``egalitarian_rl``) registers the envs. Every env that
has user groups offers a :class:`~egalitarian_rl.preferences.GroupRewardLibrary`
through :func:`group_library`, so a population is built by name::

    population = envs.make_population("HalfCheetah-v5", {"fast": 0.8, "calm": 0.2})
"""

from __future__ import annotations

import importlib

from gymnasium.envs.registration import register, registry

from egalitarian_rl.preferences.population import GroupRewardLibrary, Population

FAIRGRID_ID = "egalitarian_rl/FairGrid-v0"
MO_HALFCHEETAH_ID = "egalitarian_rl/MOHalfCheetah-v0"
MO_HOPPER_ID = "egalitarian_rl/MOHopper-v0"
TEXTGEN_ID = "egalitarian_rl/TextGen-v0"

# String entry points: nothing below imports MuJoCo or mo_gymnasium until an env is made.
_REGISTRATIONS = {
    FAIRGRID_ID: dict(entry_point="egalitarian_rl.envs.gridworld:FairGridEnv", max_episode_steps=30),
    # Env reward with weights (1, 0.1) = HalfCheetah-v5's reward; the groups read info["vector_reward"].
    MO_HALFCHEETAH_ID: dict(
        entry_point="egalitarian_rl.envs.mo:make_mo_env",
        max_episode_steps=1000,
        kwargs={"mo_env_id": "mo-halfcheetah-v5", "weights": (1.0, 0.1)},
    ),
    MO_HOPPER_ID: dict(entry_point="egalitarian_rl.envs.mo:make_mo_env", max_episode_steps=1000, kwargs={"mo_env_id": "mo-hopper-v5"}),
    # No TimeLimit: the env truncates itself after max_new_tokens, a constructor argument.
    TEXTGEN_ID: dict(entry_point="egalitarian_rl.envs.textgen:TextGenEnv"),
}
for _env_id, _spec in _REGISTRATIONS.items():
    if _env_id not in registry:
        register(id=_env_id, **_spec)

# env id -> "module:attribute" of its group library, imported on first use so
# that importing envs stays cheap (no MuJoCo or transformers at import time).
# Gymnasium's own ids are listed too: their groups read the env's info / obs.
_GROUP_LIBRARIES = {
    FAIRGRID_ID: "egalitarian_rl.envs.gridworld:GROUPS",
    MO_HALFCHEETAH_ID: "egalitarian_rl.envs.mo:MO_HALFCHEETAH_GROUPS",
    MO_HOPPER_ID: "egalitarian_rl.envs.mo:MO_HOPPER_GROUPS",
    "HalfCheetah-v5": "egalitarian_rl.envs.mujoco:HALF_CHEETAH_GROUPS",
    "Hopper-v5": "egalitarian_rl.envs.mujoco:WALKER_GROUPS",
    "Walker2d-v5": "egalitarian_rl.envs.mujoco:WALKER_GROUPS",
    "Reacher-v5": "egalitarian_rl.envs.mujoco:REACHER_GROUPS",
    "CartPole-v1": "egalitarian_rl.envs.classic:CARTPOLE_GROUPS",
    TEXTGEN_ID: "egalitarian_rl.envs.text_groups:TEXT_GROUPS",
}


def group_library(env_id: str) -> GroupRewardLibrary:
    """The named true group rewards available for ``env_id``."""
    if env_id not in _GROUP_LIBRARIES:
        raise ValueError(f"no user groups are defined for env {env_id!r}; known: {sorted(_GROUP_LIBRARIES)}")
    module_name, attribute = _GROUP_LIBRARIES[env_id].split(":")
    return getattr(importlib.import_module(module_name), attribute)


def make_population(env_id: str, shares: dict[str, float], **answering: float | None) -> Population:
    """Population of ``env_id``'s named groups with ``shares`` (see :meth:`GroupRewardLibrary.population`)."""
    return group_library(env_id).population(shares, **answering)


__all__ = ["FAIRGRID_ID", "MO_HALFCHEETAH_ID", "MO_HOPPER_ID", "TEXTGEN_ID", "group_library", "make_population"]
