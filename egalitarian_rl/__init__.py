"""egalitarian-rl: align RL policies with diverse human preferences (MaxMin-RLHF)."""

import envs  # noqa: F401  (registers the egalitarian_rl/ envs)
from egalitarian_rl.preferences import (
    MultiUserPreferenceWrapper,
    Population,
    PreferenceDataset,
    UserGroup,
    collect_preferences,
)

__version__ = "0.1.0"

__all__ = [
    "MultiUserPreferenceWrapper",
    "Population",
    "PreferenceDataset",
    "UserGroup",
    "__version__",
    "collect_preferences",
]
