"""egalitarian-rl: align RL policies with diverse human preferences (MaxMin-RLHF)."""

from egalitarian_rl.preferences import (
    MultiUserPreferenceWrapper,
    Population,
    PreferenceDataset,
    UserGroup,
    collect_preferences,
)

import envs  # noqa: E402, F401  (registers the egalitarian_rl/ envs)

__version__ = "0.1.0"

__all__ = [
    "MultiUserPreferenceWrapper",
    "Population",
    "PreferenceDataset",
    "UserGroup",
    "__version__",
    "collect_preferences",
]
