"""The preference layer: populations, answering, collection and the dataset file format."""

import math
import zipfile

import gymnasium as gym
import numpy as np
import pytest

from egalitarian_rl import envs
from egalitarian_rl.preferences import (
    Population,
    PreferenceDataset,
    PreferenceDatasetError,
    Transitions,
    UserGroup,
    collect_preferences,
    rollout_segments,
    sample_pairs,
)

FAIRGRID = "egalitarian_rl/FairGrid-v0"


def _collect(seed=0, n_users=20, per_user=10, **answering):
    population = envs.make_population(FAIRGRID, {"majority": 0.8, "minority": 0.2}, **answering)
    env = gym.make(FAIRGRID, random_start=True)
    return population, collect_preferences(env, population, n_users, per_user, segment_length=10, seed=seed)


def _true_diff(population, data):
    groups = data.comparison_groups()
    returns_a = population.group_rewards(data.segments_a).sum(axis=1)
    returns_b = population.group_rewards(data.segments_b).sum(axis=1)
    rows = np.arange(len(data))
    return returns_a[rows, groups] - returns_b[rows, groups]


# ------------------------------------------------------------- population
def test_users_are_assigned_by_share():
    population, _ = _collect()
    user_groups = population.make_users(100)
    assert np.bincount(user_groups).tolist() == [80, 20]
    assert np.bincount(population.make_users(7)).tolist() == [6, 1]


def test_bad_population_is_rejected():
    reward = lambda t: t.next_obs[..., 0]  # noqa: E731
    with pytest.raises(ValueError, match="sum to 1"):
        Population([UserGroup("a", reward, 0.5), UserGroup("b", reward, 0.4)])
    with pytest.raises(ValueError, match="unique"):
        Population([UserGroup("a", reward, 0.5), UserGroup("a", reward, 0.5)])
    with pytest.raises(ValueError, match="unknown group"):
        envs.make_population(FAIRGRID, {"nobody": 1.0})
    with pytest.raises(ValueError, match="get no users"):
        Population([UserGroup("a", reward, 0.99), UserGroup("b", reward, 0.01)]).make_users(10)


def test_group_rewards_broadcast_over_any_leading_shape(fairgrid_population):
    segments = rollout_segments(gym.make(FAIRGRID, random_start=True), 8, 5, seed=1)
    batched = fairgrid_population.group_rewards(segments)
    assert batched.shape == (8, 5, 2)
    one = fairgrid_population.step_rewards(segments.obs[3, 2], segments.acts[3, 2], segments.next_obs[3, 2], {})
    np.testing.assert_array_equal(one, batched[3, 2])


def test_large_beta_labels_follow_the_labelling_groups_return():
    population, data = _collect(n_users=100, per_user=30, beta=50.0)
    diff = _true_diff(population, data)
    strict = diff != 0
    agree = (data.labels[strict] == 1.0) == (diff[strict] > 0)
    assert agree.mean() >= 0.95
    assert (data.labels[diff == 0] == 0.5).all()


def test_groups_disagree_on_the_same_pairs(fairgrid_population):
    segments = rollout_segments(gym.make(FAIRGRID, random_start=True), 2000, 10, seed=3)
    returns = fairgrid_population.group_rewards(segments).sum(axis=1)
    pairs = sample_pairs(2000, 5000, np.random.default_rng(0))
    diff = returns[pairs[:, 0]] - returns[pairs[:, 1]]
    both_strict = (diff != 0).all(axis=1)
    assert (np.sign(diff[both_strict, 0]) != np.sign(diff[both_strict, 1])).mean() > 0.2


def test_small_beta_labels_approach_a_coin_flip():
    population, data = _collect(n_users=100, per_user=30, beta=1e-3)
    diff = _true_diff(population, data)
    strict = diff != 0
    agree = (data.labels[strict] == 1.0) == (diff[strict] > 0)
    assert abs(agree.mean() - 0.5) < 0.05


def test_teacher_noise_mistakes_equal_skip_and_myopia():
    rng = np.random.default_rng(0)
    returns_a, returns_b = rng.normal(size=20000), rng.normal(size=20000)
    reward = lambda t: t.next_obs  # noqa: E731
    labels, _ = UserGroup("g", reward, 1.0, mistake_rate=0.2).answer(returns_a, returns_b, rng)
    assert abs(((labels == 1) != (returns_a > returns_b)).mean() - 0.2) < 0.02
    labels, _ = UserGroup("g", reward, 1.0, equal_threshold=0.5).answer(returns_a, returns_b, rng)
    np.testing.assert_array_equal(labels == 0.5, np.abs(returns_a - returns_b) <= 0.5)
    _, answered = UserGroup("g", reward, 1.0, skip_threshold=1.0).answer(returns_a, returns_b, rng)
    np.testing.assert_array_equal(answered, np.maximum(returns_a, returns_b) >= 1.0)
    myopic = UserGroup("g", lambda t: t.next_obs[..., 0], 1.0, myopic_discount=0.5)
    segment = Transitions(np.zeros((1, 3, 1)), np.zeros((1, 3)), np.ones((1, 3, 1)), {})
    assert myopic.segment_returns(segment)[0] == pytest.approx(0.25 + 0.5 + 1.0)
    with pytest.raises(ValueError, match="mistake_rate"):
        UserGroup("g", reward, 1.0, mistake_rate=1.5)
    assert math.isinf(UserGroup("g", reward, 1.0).beta)  # noise is off by default


def test_collection_accepts_models_and_callables_and_is_seeded(fairgrid_population):
    from stable_baselines3 import PPO

    env = gym.make(FAIRGRID, random_start=True)
    model = PPO("MlpPolicy", env, n_steps=64, seed=0, device="cpu")
    from_model = collect_preferences(env, fairgrid_population, 5, 4, 10, behaviour=model, seed=0)
    from_callable = collect_preferences(env, fairgrid_population, 5, 4, 10, behaviour=lambda obs: 4, seed=0)
    assert len(from_model) == 20 and (from_callable.segments_a.acts == 4).all()
    again = collect_preferences(env, fairgrid_population, 5, 4, 10, seed=7)
    np.testing.assert_array_equal(collect_preferences(env, fairgrid_population, 5, 4, 10, seed=7).labels, again.labels)
    with pytest.raises(ValueError, match="unknown behaviour"):
        collect_preferences(env, fairgrid_population, 5, 4, 10, behaviour="greedy")


def test_segments_do_not_cross_episode_boundaries():
    # FairGrid episodes last 30 steps: segments of 7 fit 4 times, the first 2 steps are dropped.
    env = gym.make(FAIRGRID)
    segments = rollout_segments(env, 8, 7, seed=0)
    for episode in (0, 4):
        for i in range(episode, episode + 3):  # consecutive windows of one episode, in time order
            np.testing.assert_array_equal(segments.next_obs[i, -1], segments.obs[i + 1, 0])


# ---------------------------------------------------------------- dataset
def test_splits_and_concatenation():
    _, data = _collect(n_users=20, per_user=10)
    train, test = data.split_by_user(0.25, seed=0)
    assert set(train.users).isdisjoint(test.users) and train.n_users + test.n_users == 20
    assert len(train) + len(test) == len(data)
    train, test = data.split_by_comparison(0.2, seed=0)
    assert (test.comparisons_per_user() == 2).all() and train.n_users == test.n_users == 20
    joined = PreferenceDataset.concatenate([train, test])
    assert len(joined) == len(data) and joined.n_users == 20


def test_save_load_round_trips_exactly(tmp_path):
    _, data = _collect()
    path = data.save(tmp_path / "prefs.npz")
    loaded = PreferenceDataset.load(path)
    for name in ("user_ids", "labels", "users", "user_groups"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(data, name))
        assert getattr(loaded, name).dtype == getattr(data, name).dtype
    for side in ("segments_a", "segments_b"):
        for got, want in zip(getattr(loaded, side)[:3], getattr(data, side)[:3]):
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype
    assert loaded.group_names == data.group_names and loaded.metadata == data.metadata
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind


def test_truncated_file_is_rejected(tmp_path):
    path = _collect()[1].save(tmp_path / "prefs.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PreferenceDatasetError, match="truncated or corrupt"):
        PreferenceDataset.load(path)


def test_file_with_pickled_objects_is_refused_without_unpickling(tmp_path):
    """An .npz holding an object array (what a pickle payload needs) is refused; the message never suggests unpickling."""
    path = tmp_path / "evil.npz"
    np.savez(path, labels=np.array([{"run": "code"}], dtype=object))
    with pytest.raises(PreferenceDatasetError, match="pickled objects, which are never loaded") as err:
        PreferenceDataset.load(path)
    assert "unsafe" not in str(err.value) and "allow_pickle" not in str(err.value)


def test_tampered_file_is_rejected(tmp_path):
    path = _collect()[1].save(tmp_path / "prefs.npz")
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["labels"] = 1.0 - arrays["labels"]  # still valid labels: only the checksum catches it
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, value)
    with pytest.raises(PreferenceDatasetError, match="checksum mismatch"):
        PreferenceDataset.load(path)


def _fields(data, **changes):
    fields = dict(
        user_ids=data.user_ids,
        segments_a=data.segments_a,
        segments_b=data.segments_b,
        labels=data.labels,
        users=data.users,
        user_groups=data.user_groups,
        group_names=data.group_names,
    )
    fields.update(changes)
    return fields


def test_wrong_shape_is_rejected():
    data = _collect()[1]
    short = data.segments_b._replace(obs=data.segments_b.obs[:, :-1])
    with pytest.raises(PreferenceDatasetError, match="wrong shape"):
        PreferenceDataset(**_fields(data, segments_b=short))


def test_nan_in_a_segment_is_rejected():
    data = _collect()[1]
    obs = data.segments_a.obs.copy()
    obs[3, 2, 1] = np.nan
    with pytest.raises(PreferenceDatasetError, match="NaN or infinite value in segments_a.obs"):
        PreferenceDataset(**_fields(data, segments_a=data.segments_a._replace(obs=obs)))


def test_label_outside_the_valid_set_is_rejected():
    data = _collect()[1]
    labels = data.labels.copy()
    labels[0] = 0.7
    with pytest.raises(PreferenceDatasetError, match="label outside"):
        PreferenceDataset(**_fields(data, labels=labels))


def test_unknown_user_id_is_rejected():
    data = _collect()[1]
    user_ids = data.user_ids.copy()
    user_ids[5] = 999
    with pytest.raises(PreferenceDatasetError, match=r"unknown user id \[999\]"):
        PreferenceDataset(**_fields(data, user_ids=user_ids))


def test_missing_file_and_non_dataset_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        PreferenceDataset.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(PreferenceDatasetError, match="not a preference dataset"):
        PreferenceDataset.load(tmp_path / "other.npz")


def test_held_out_comparisons_never_show_a_training_segment(tmp_path):
    _, data = _collect(n_users=20, per_user=10)
    assert data.segment_ids.shape == (len(data), 2) and data.folds.shape == (len(data),)
    # The shared pool is reused: without folds most held-out comparisons would show training segments.
    assert len(np.unique(data.segment_ids)) < 2 * len(data)
    for seed in range(3):
        train, test = data.split_by_comparison(0.2, seed=seed)
        assert len(train) + len(test) == len(data)
        assert np.intersect1d(train.segment_ids, test.segment_ids).size == 0
        assert (test.comparisons_per_user() == 2).all()  # one answer per fold and user: exact strata
    # The ids survive saving, subsets and concatenation; the guarantee then holds by components too.
    loaded = PreferenceDataset.load(data.save(tmp_path / "prefs.npz"))
    np.testing.assert_array_equal(loaded.segment_ids, data.segment_ids)
    np.testing.assert_array_equal(loaded.folds, data.folds)
    no_folds = PreferenceDataset(**_fields(data, segment_ids=data.segment_ids))
    train, test = no_folds.split_by_comparison(0.25, seed=0)
    assert np.intersect1d(train.segment_ids, test.segment_ids).size == 0 and 0.15 < len(test) / len(data) < 0.35
    # A dataset whose comparisons all share segments cannot be split honestly: say so.
    chained = np.stack([np.arange(len(data)), np.arange(1, len(data) + 1)], axis=1)
    with pytest.raises(ValueError, match="one fold"):
        PreferenceDataset(**_fields(data, segment_ids=chained)).split_by_comparison(0.2)
    with pytest.raises(PreferenceDatasetError, match="more than one fold"):
        PreferenceDataset(**_fields(data, segment_ids=chained, folds=data.folds))


def test_files_without_segment_ids_still_load_and_split_per_comparison(tmp_path):
    _, data = _collect(n_users=20, per_user=10)
    old = PreferenceDataset(**_fields(data))  # what files saved before segment ids looked like
    loaded = PreferenceDataset.load(old.save(tmp_path / "old.npz"))
    assert loaded.segment_ids is None and loaded.folds is None
    train, test = loaded.split_by_comparison(0.2, seed=0)
    assert (test.comparisons_per_user() == 2).all() and len(train) == 160


def test_segments_keep_the_end_of_terminating_episodes_and_never_hang():
    import gymnasium as gym

    from egalitarian_rl.preferences.segments import rollout_segments

    env = gym.make("CartPole-v1")  # random play falls after ~20 steps: the fall must be inside a segment
    segments = rollout_segments(env, n_segments=50, segment_length=8, seed=0)
    assert segments.obs.shape[:2] == (50, 8)
    # the last step of the first segment of every episode is where the pole fell (|angle| or |x| out of bounds)
    fell = (np.abs(segments.next_obs[:, -1, 2]) > 0.2095) | (np.abs(segments.next_obs[:, -1, 0]) > 2.4)
    assert fell.mean() > 0.3
    with pytest.raises(ValueError, match="choose segment_length <= "):
        rollout_segments(gym.make("CartPole-v1"), n_segments=2, segment_length=600, seed=0)


def test_concatenating_separate_collections_keeps_an_honest_split():
    _, first = _collect(seed=0, n_users=20, per_user=10)
    _, second = _collect(seed=1, n_users=20, per_user=10)
    # Pool indices of two collections collide: each keeps its own pool and folds.
    joined = PreferenceDataset.concatenate([first, second])
    assert len(np.unique(joined.folds)) == 20 and len(np.unique(joined.segment_ids)) > len(np.unique(first.segment_ids))
    train, test = joined.split_by_comparison(0.2, seed=0)
    assert len(test) > 0 and np.intersect1d(train.segment_ids, test.segment_ids).size == 0
    # Parts of one collection go back together with their folds.
    train, test = first.split_by_comparison(0.2, seed=0)
    assert PreferenceDataset.concatenate([train, test]).folds is not None
