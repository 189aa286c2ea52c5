"""The people: groups, users, their comparisons."""

from egalitarian_rl.preferences.collect import collect_preferences
from egalitarian_rl.preferences.dataset import PreferenceDataset, PreferenceDatasetError
from egalitarian_rl.preferences.population import GroupRewardLibrary, Population, RewardFn, UserGroup
from egalitarian_rl.preferences.segments import Transitions, rollout_segments, sample_pairs
from egalitarian_rl.preferences.wrappers import GROUP_REWARDS_KEY, MultiUserPreferenceWrapper

__all__ = [
    "GROUP_REWARDS_KEY",
    "GroupRewardLibrary",
    "MultiUserPreferenceWrapper",
    "Population",
    "PreferenceDataset",
    "PreferenceDatasetError",
    "RewardFn",
    "Transitions",
    "UserGroup",
    "collect_preferences",
    "rollout_segments",
    "sample_pairs",
]
