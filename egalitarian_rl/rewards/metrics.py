"""How good are learned rewards and recovered groups? Preference accuracy, ARI, purity.

Accuracy convention: a comparison is predicted correctly when the sign of
``R(a) - R(b)`` matches the strict label. Comparisons labelled "equal" (0.5)
are **excluded** (a tie has no side to get right); a predicted difference of
exactly zero on a strict comparison counts as half right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from egalitarian_rl.preferences.dataset import PreferenceDataset
from egalitarian_rl.rewards.bradley_terry import dataset_features
from egalitarian_rl.rewards.nets import RewardMixture


@dataclass
class AccuracyReport:
    """Held-out preference accuracy, overall and per true group.

    :param overall: accuracy over all strict comparisons (NaN if there are none).
    :param per_group: true group name -> accuracy over that group's users' strict comparisons
        (NaN for a group without any); users of unknown group count only in ``overall``.
    :param n_strict: number of strict (non-tie) comparisons scored.
    :param n_per_group: true group name -> its number of strict comparisons.
    """

    overall: float
    per_group: dict[str, float] = field(default_factory=dict)
    n_strict: int = 0
    n_per_group: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"overall": ..., "<group>": ...}`` for logging."""
        return {"overall": self.overall, **self.per_group}


@torch.no_grad()
def return_differences(reward: RewardMixture, dataset: PreferenceDataset, discount: float = 1.0, chunk_size: int = 256) -> np.ndarray:
    """``R_k(a_i) - R_k(b_i)`` for every comparison and member, ``(N, K)``."""
    features_a, features_b = dataset_features(reward, dataset)
    out = [
        reward.returns_from_features(features_a[s : s + chunk_size], discount)
        - reward.returns_from_features(features_b[s : s + chunk_size], discount)
        for s in range(0, len(dataset), chunk_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, reward.n_members), dtype=np.float32)


def accuracy_from_differences(differences: np.ndarray, dataset: PreferenceDataset) -> AccuracyReport:
    """Accuracy of predicted return differences ``(N,)`` against ``dataset``'s labels (ties excluded)."""
    differences = np.asarray(differences, dtype=np.float64)
    if differences.shape != (len(dataset),):
        raise ValueError(f"differences must be ({len(dataset)},), got {differences.shape}")
    strict = dataset.labels != 0.5
    predicted = np.where(differences > 0, 1.0, np.where(differences < 0, 0.0, 0.5))
    # 1 when the predicted side matches, 0 when opposite, 0.5 for a predicted exact tie.
    correct = 1.0 - np.abs(predicted - dataset.labels)
    groups = dataset.comparison_groups()

    def mean(mask: np.ndarray) -> float:
        return float(correct[mask].mean()) if mask.any() else float("nan")

    report = AccuracyReport(mean(strict), n_strict=int(strict.sum()))
    for index, name in enumerate(dataset.group_names):
        mask = strict & (groups == index)
        report.per_group[name] = mean(mask)
        report.n_per_group[name] = int(mask.sum())
    return report


def preference_accuracy(
    reward: RewardMixture, dataset: PreferenceDataset, members: np.ndarray | int = 0, discount: float = 1.0
) -> AccuracyReport:
    """Held-out preference accuracy of ``reward`` on ``dataset``, overall and per true group.

    :param reward: a learned reward (K members).
    :param dataset: comparisons to score (typically held out); ties are excluded.
    :param members: which member predicts each comparison: one index for all, or ``(N,)``
        per comparison (for a mixture: each comparison's user's assigned member).
    :param discount: as used in training.
    """
    differences = return_differences(reward, dataset, discount)
    members = np.broadcast_to(np.asarray(members, dtype=np.int64), (len(dataset),))
    if len(dataset) and (members.min() < 0 or members.max() >= reward.n_members):
        raise ValueError(f"member index out of range for {reward.n_members} members")
    return accuracy_from_differences(differences[np.arange(len(dataset)), members], dataset)


def _known(true_groups: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true_groups, clusters = np.asarray(true_groups), np.asarray(clusters)
    if true_groups.shape != clusters.shape:
        raise ValueError(f"true groups {true_groups.shape} and clusters {clusters.shape} differ in shape")
    known = true_groups >= 0  # -1 = unknown group: left out of the comparison
    return true_groups[known], clusters[known]


def adjusted_rand_index(true_groups: np.ndarray, clusters: np.ndarray) -> float:
    """Adjusted Rand index of recovered ``clusters`` ``(U,)`` against ``true_groups`` ``(U,)`` (-1 = unknown, skipped).

    1 = identical partitions (up to relabelling), ~0 = chance.
    """
    true_groups, clusters = _known(true_groups, clusters)
    if len(true_groups) == 0:
        return float("nan")
    return float(adjusted_rand_score(true_groups, clusters))


def purity(true_groups: np.ndarray, clusters: np.ndarray) -> float:
    """Share of users whose cluster's most common true group is their own (-1 = unknown, skipped)."""
    true_groups, clusters = _known(true_groups, clusters)
    if len(true_groups) == 0:
        return float("nan")
    total = 0
    for cluster in np.unique(clusters):
        total += np.bincount(true_groups[clusters == cluster]).max()
    return float(total / len(true_groups))


def cluster_to_group(true_groups: np.ndarray, clusters: np.ndarray, n_clusters: int) -> np.ndarray:
    """``(n_clusters,)`` the most common true group in each cluster (-1 for a cluster with no known user)."""
    true_groups, clusters = _known(true_groups, clusters)
    mapping = np.full(n_clusters, -1, dtype=np.int64)
    for cluster in range(n_clusters):
        members = true_groups[clusters == cluster]
        if len(members):
            mapping[cluster] = int(np.bincount(members).argmax())
    return mapping
