"""egalitarian-rl: align RL policies with diverse human preferences (MaxMin-RLHF)."""

import egalitarian_rl.envs  # noqa: F401  (registers the egalitarian_rl/ envs)
from egalitarian_rl.preferences import (
    MultiUserPreferenceWrapper,
    Population,
    PreferenceDataset,
    UserGroup,
    collect_preferences,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # The agent pulls in torch and stable-baselines3: import it only when asked
    # for, so that ``import egalitarian_rl.envs`` (e.g. in SubprocVecEnv workers) stays light.
    if name == "MaxMinPPO":
        from egalitarian_rl.algorithms.maxmin_ppo import MaxMinPPO

        return MaxMinPPO
    raise AttributeError(f"module 'egalitarian_rl' has no attribute {name!r}")


__all__ = [
    "MaxMinPPO",
    "MultiUserPreferenceWrapper",
    "Population",
    "PreferenceDataset",
    "UserGroup",
    "__version__",
    "collect_preferences",
]
