"""Learning rewards from preferences: the single Bradley-Terry reward and the EM mixture of K rewards."""

from egalitarian_rl.rewards.bradley_terry import (
    FitResult,
    RewardTrainingError,
    TrainingHistory,
    comparison_log_likelihoods,
    dataset_features,
    fit_bradley_terry,
    train_reward,
)
from egalitarian_rl.rewards.em import Assignment, EMRewardMixture, KSelection, NotFittedError, select_k
from egalitarian_rl.rewards.metrics import (
    AccuracyReport,
    adjusted_rand_index,
    cluster_to_group,
    preference_accuracy,
    purity,
)
from egalitarian_rl.rewards.nets import RewardMixture, space_from_json, space_to_json, spaces_from_dataset

__all__ = [
    "AccuracyReport",
    "Assignment",
    "EMRewardMixture",
    "FitResult",
    "KSelection",
    "NotFittedError",
    "RewardMixture",
    "RewardTrainingError",
    "TrainingHistory",
    "adjusted_rand_index",
    "cluster_to_group",
    "comparison_log_likelihoods",
    "dataset_features",
    "fit_bradley_terry",
    "preference_accuracy",
    "purity",
    "select_k",
    "space_from_json",
    "space_to_json",
    "spaces_from_dataset",
    "train_reward",
]
