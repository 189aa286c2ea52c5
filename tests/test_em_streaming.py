"""EM on large data (issue 10, Scale): pooled segments, streamed chunks, a memory flag that is honoured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egalitarian_rl.preferences import Population, PreferenceDataset, Transitions, UserGroup
from egalitarian_rl.preferences.dataset import PooledPreferenceDataset, PreferenceDatasetError
from egalitarian_rl.rewards import EMRewardMixture, adjusted_rand_index
from egalitarian_rl.rewards.bradley_terry import build_comparison_features, dataset_features, pair_logits, train_reward
from egalitarian_rl.rewards.nets import RewardMixture, spaces_from_dataset

torch.set_num_threads(1)

#: Three groups of unequal size reading one coordinate, as em_scaling's fast / backward / calm.
POPULATION = Population(
    [
        UserGroup("up", lambda t: t.next_obs[..., 0], 0.6),
        UserGroup("down", lambda t: -t.next_obs[..., 0], 0.3),
        UserGroup("calm", lambda t: -np.abs(t.next_obs[..., 0]), 0.1),
    ]
)
EM_SETTINGS = dict(use_next_state=True, hidden_sizes=(16,), seed=0, batch_size=32, final_epochs=10)


def pooled_dataset(n_users: int = 60, per_user: int = 20, n_pool: int = 150, length: int = 4, seed: int = 0) -> PooledPreferenceDataset:
    """Comparisons of segments drawn from a pool of ``n_pool`` (each segment used several times)."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n_pool, length, 3)).astype(np.float32)
    pool = Transitions(obs, rng.uniform(-1, 1, (n_pool, length, 2)).astype(np.float32), obs + 0.1, {})
    user_groups = POPULATION.make_users(n_users)
    user_ids = np.repeat(np.arange(n_users), per_user)
    first = rng.integers(n_pool, size=len(user_ids))
    pairs = np.stack([first, (first + rng.integers(1, n_pool, size=len(user_ids))) % n_pool], axis=1)
    labels, _ = POPULATION.label(pool.index(pairs[:, 0]), pool.index(pairs[:, 1]), user_groups[user_ids], rng)
    return PooledPreferenceDataset(pool, pairs, user_ids, labels, np.arange(n_users), user_groups, POPULATION.group_names)


def materialised(data: PooledPreferenceDataset) -> PreferenceDataset:
    """The same comparisons with every segment copied per comparison (the classic form)."""
    return PreferenceDataset(
        data.user_ids, data.segments_a, data.segments_b, data.labels, data.users, data.user_groups, data.group_names,
        segment_ids=data.segment_ids,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data() -> PooledPreferenceDataset:
    return pooled_dataset()


@pytest.fixture(scope="module")
def default_fit(data) -> EMRewardMixture:
    return EMRewardMixture(3, **EM_SETTINGS).fit(data)


# ----------------------------------------------------------------------------- the pooled dataset
def test_pooled_dataset_reads_like_a_per_comparison_one(data):
    np.testing.assert_array_equal(data.segments_a.obs, data.segment_pool.obs[data.segment_ids[:, 0]])
    np.testing.assert_array_equal(data.segments_b.acts, data.segment_pool.acts[data.segment_ids[:, 1]])
    assert data.segment_length == 4 and data.n_segments == 150
    part = data.for_users(data.users[:5])
    assert isinstance(part, PooledPreferenceDataset) and part.segment_pool is data.segment_pool
    assert len(part) == 5 * 20 and part.n_users == 5
    train, test = data.split_by_user(0.25, seed=0)
    assert isinstance(test, PooledPreferenceDataset) and len(train) + len(test) == len(data)
    obs_space, act_space = spaces_from_dataset(data)
    assert obs_space.shape == (3,) and act_space.shape == (2,)


def test_pooled_dataset_rejects_ids_outside_the_pool(data):
    with pytest.raises(PreferenceDatasetError, match="outside the pool"):
        PooledPreferenceDataset(
            data.segment_pool, data.segment_ids + 150, data.user_ids, data.labels, data.users, data.user_groups, data.group_names
        )


# ----------------------------------------------------------------------------- the segment table
def test_table_normalisation_and_logits_equal_the_per_comparison_ones(data):
    obs_space, act_space = spaces_from_dataset(data)
    pooled_reward = RewardMixture(obs_space, act_space, 2, use_next_state=True)
    classic_reward = RewardMixture(obs_space, act_space, 2, use_next_state=True)
    classic_reward.load_state_dict(pooled_reward.state_dict())
    table = build_comparison_features(pooled_reward, data, fit_normalization=True)
    features_a, features_b = dataset_features(classic_reward, materialised(data), fit_normalization=True)
    # Each pool segment weighted by how often comparisons use it: the per-comparison statistics.
    torch.testing.assert_close(pooled_reward.input_shift, classic_reward.input_shift)
    torch.testing.assert_close(pooled_reward.input_scale, classic_reward.input_scale)
    assert table.n_segments == 150  # encoded once each, not 2 * 1,200 times
    with torch.no_grad():
        expected = classic_reward.returns_from_features(features_a) - classic_reward.returns_from_features(features_b)
    torch.testing.assert_close(pair_logits(pooled_reward, table), expected, rtol=1e-5, atol=1e-5)
    streamed = build_comparison_features(pooled_reward, data, cache=False, chunk_size=7)
    assert streamed.cache is None and streamed.n_chunks == 22
    torch.testing.assert_close(pair_logits(pooled_reward, streamed), expected, rtol=1e-5, atol=1e-5)


def test_train_reward_on_a_table_equals_training_on_tensors(data):
    obs_space, act_space = spaces_from_dataset(data)
    rewards = [RewardMixture(obs_space, act_space, 2, use_next_state=True) for _ in range(2)]
    rewards[1].load_state_dict(rewards[0].state_dict())
    labels = torch.as_tensor(data.labels)
    weights = torch.as_tensor(np.eye(2)[data.user_groups[data.user_index()] % 2], dtype=torch.float32)
    table = build_comparison_features(rewards[0], data, fit_normalization=True)
    features_a, features_b = dataset_features(rewards[1], materialised(data), fit_normalization=True)
    settings = dict(epochs=2, lr=1e-2, batch_size=32, weight_decay=1e-3)
    first = train_reward(rewards[0], table, None, labels, weights, generator=torch.Generator().manual_seed(1), **settings)
    second = train_reward(rewards[1], features_a, features_b, labels, weights, generator=torch.Generator().manual_seed(1), **settings)
    np.testing.assert_allclose(first.train_loss, second.train_loss, rtol=1e-4)
    for p, q in zip(rewards[0].parameters(), rewards[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="features_b must be None"):
        train_reward(rewards[0], table, features_b, labels, weights, epochs=1, lr=1e-2, batch_size=32)


# ----------------------------------------------------------------------------- EM
def test_pooled_fit_recovers_the_groups_as_the_per_comparison_fit(data, default_fit):
    classic = EMRewardMixture(3, **EM_SETTINGS).fit(materialised(data))
    ari_pooled = adjusted_rand_index(data.user_groups, default_fit.assignments_)
    ari_classic = adjusted_rand_index(data.user_groups, classic.assignments_)
    assert ari_pooled >= 0.9 and abs(ari_pooled - ari_classic) <= 0.05
    plan = default_fit.memory_plan_
    assert plan["cache_features"] and plan["n_segments"] == 150  # no flag: cached, the pool encoded once
    assert classic.memory_plan_["n_segments"] == 2 * len(data)


def test_memory_flag_streams_in_chunks_and_recovers_the_same_groups(data, default_fit):
    roomy = EMRewardMixture(3, **EM_SETTINGS).memory_plan(data)
    # Room for neither the cached table nor a full 512-segment chunk: about 50 segments per chunk.
    budget = roomy["estimated_mb"] - roomy["cache_mb"] - (512 - 50) * roomy["chunk_mb_per_segment"]
    streamed = EMRewardMixture(3, **EM_SETTINGS, max_memory_mb=budget).fit(data)
    plan = streamed.memory_plan_
    assert not plan["cache_features"] and 45 <= plan["chunk_segments"] <= 50 and plan["n_chunks"] >= 3
    assert plan["estimated_mb"] <= budget
    assert streamed.hyperparameters()["max_memory_mb"] == budget
    ari_default = adjusted_rand_index(data.user_groups, default_fit.assignments_)
    ari_streamed = adjusted_rand_index(data.user_groups, streamed.assignments_)
    assert ari_streamed >= ari_default - 0.02 and ari_streamed >= 0.9
    # Re-encoding per chunk computes the same inputs: the fitted likelihoods agree.
    np.testing.assert_allclose(streamed.user_log_likelihoods(data), default_fit.user_log_likelihoods(data), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bad", [0, -5, float("nan"), "2GB", True])
def test_bad_memory_flag_is_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="max_memory_mb must be a positive number"):
        EMRewardMixture(3, max_memory_mb=bad)


def test_budget_below_the_per_comparison_arrays_is_a_clear_error(data):
    with pytest.raises(ValueError, match=r"max_memory_mb=0.01 is too small for 1,200 comparisons of 150 segments"):
        EMRewardMixture(3, **EM_SETTINGS, max_memory_mb=0.01).fit(data)


# ----------------------------------------------------------------------------- epochs capped in comparisons
def test_member_batches_cap_keeps_members_in_proportion_on_fresh_subsets():
    from egalitarian_rl.rewards.bradley_terry import _member_batches

    rows = [torch.arange(600), 600 + torch.arange(300), 900 + torch.arange(100)]
    generator = torch.Generator().manual_seed(0)
    drawn = []
    for _ in range(2):
        index, mask, steps = _member_batches(rows, 32, generator, max_rows=60)
        assert steps == 2  # ceil(60 / 32): the epoch's cost follows the cap, not the 600 rows
        assert mask.sum((0, 2)).tolist() == [60, 30, 10]  # every member keeps 10% of its rows
        member_0 = index[:, 0][mask[:, 0] > 0]
        assert len(member_0.unique()) == 60 and bool((member_0 < 600).all())
        drawn.append(set(member_0.tolist()))
    assert drawn[0] != drawn[1]  # a fresh subset every epoch


def test_epoch_cap_at_or_above_the_data_changes_nothing(data):
    obs_space, act_space = spaces_from_dataset(data)
    rewards = [RewardMixture(obs_space, act_space, 3, use_next_state=True) for _ in range(2)]
    rewards[1].load_state_dict(rewards[0].state_dict())
    table = build_comparison_features(rewards[0], data, fit_normalization=True)
    labels = torch.as_tensor(data.labels)
    weights = torch.as_tensor(np.eye(3)[data.user_groups[data.user_index()]], dtype=torch.float32)
    settings = dict(epochs=2, lr=1e-2, batch_size=32)
    full = train_reward(rewards[0], table, None, labels, weights, generator=torch.Generator().manual_seed(1), **settings)
    capped = train_reward(
        rewards[1], table, None, labels, weights, generator=torch.Generator().manual_seed(1), max_epoch_comparisons=len(data), **settings
    )
    assert full.train_loss == capped.train_loss and full.steps == capped.steps
    for p, q in zip(rewards[0].parameters(), rewards[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    largest = int(np.bincount(data.user_groups[data.user_index()]).max())
    assert full.steps == 2 * -(-largest // 32)
    small = train_reward(rewards[1], table, None, labels, weights, max_epoch_comparisons=64, **settings)
    assert small.steps == 2 * 2  # two epochs of ceil(64 / 32) steps
    with pytest.raises(ValueError, match="max_epoch_comparisons must be >= 1"):
        train_reward(rewards[1], table, None, labels, weights, max_epoch_comparisons=0, **settings)


def test_em_with_epochs_of_a_few_comparisons_still_recovers_the_groups(data, default_fit):
    # About 650 training comparisons in the largest group: every epoch trains on a third of them.
    capped = EMRewardMixture(3, **EM_SETTINGS, max_epoch_comparisons=200).fit(data)
    ari_default = adjusted_rand_index(data.user_groups, default_fit.assignments_)
    ari_capped = adjusted_rand_index(data.user_groups, capped.assignments_)
    assert ari_capped >= 0.9 and ari_capped >= ari_default - 0.05
    assert capped.hyperparameters()["max_epoch_comparisons"] == 200
    assert default_fit.hyperparameters()["max_epoch_comparisons"] == 100_000  # default: no cap on small data


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "100k"])
def test_bad_epoch_cap_is_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="max_epoch_comparisons must be an integer >= 1 or None"):
        EMRewardMixture(3, max_epoch_comparisons=bad)
