"""Gymnasium envs and their user groups, registered under ``egalitarian_rl/``.

Importing ``envs`` (or ``egalitarian_rl``) registers the envs. Every env that
has user groups offers a :class:`~egalitarian_rl.preferences.GroupRewardLibrary`
through :func:`group_library`, so a population is built by name::

    population = envs.make_population("HalfCheetah-v5", {"fast": 0.8, "calm": 0.2})
"""

from __future__ import annotations

import importlib

from gymnasium.envs.registration import register, registry

from egalitarian_rl.preferences.population import GroupRewardLibrary, Population

FAIRGRID_ID = "egalitarian_rl/FairGrid-v0"

if FAIRGRID_ID not in registry:
    register(id=FAIRGRID_ID, entry_point="envs.gridworld:FairGridEnv", max_episode_steps=30)

# env id -> "module:attribute" of its group library, imported on first use so
# that importing envs stays cheap (no MuJoCo or transformers at import time).
_GROUP_LIBRARIES = {
    FAIRGRID_ID: "envs.gridworld:GROUPS",
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


__all__ = ["FAIRGRID_ID", "group_library", "make_population"]
