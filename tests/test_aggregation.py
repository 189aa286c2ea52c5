"""The math of the group-reward aggregation rules and the per-group normaliser (numpy only, fast)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from egalitarian_rl.algorithms.aggregation import (
    AGGREGATIONS,
    Aggregation,
    AggregationResult,
    ExponentiatedGradient,
    GroupRewardNormalizer,
    Mean,
    PerSampleMin,
    SoftMin,
    WorstGroup,
    make_aggregation,
)

K = 3


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def group_rewards(rng: np.random.Generator) -> np.ndarray:
    """(n_steps, n_envs, K) rewards with distinct group means."""
    return rng.normal(size=(16, 4, K)) + np.array([0.0, -1.0, 0.5])


def assert_on_simplex(weights: np.ndarray, k: int = K) -> None:
    assert weights.shape == (k,)
    assert np.all(weights >= 0)
    assert np.isclose(weights.sum(), 1.0)


# --------------------------------------------------------------------------- individual rules
def test_worst_group_picks_argmin_and_lowest_index_on_ties(group_rewards: np.ndarray) -> None:
    rule = WorstGroup()
    result = rule.aggregate(group_rewards, np.array([0.3, -2.0, 1.0]))
    np.testing.assert_array_equal(result.weights, [0.0, 1.0, 0.0])
    assert result.selected_group == 1
    np.testing.assert_array_equal(result.rewards, group_rewards[..., 1])
    np.testing.assert_array_equal(rule.weights(np.array([0.0, -1.0, -1.0])), [0.0, 1.0, 0.0])


def test_averaged_worst_group_trains_on_the_frequency_of_past_selections(group_rewards: np.ndarray) -> None:
    rule = make_aggregation("worst_group", average=True)
    history = [np.array([0.3, -2.0, 1.0]), np.array([0.3, 2.0, 1.0]), np.array([-1.0, 2.0, 1.0]), np.array([5.0, -2.0, 1.0])]
    picked = []
    for returns in history:
        result = rule.aggregate(group_rewards, returns)
        picked.append(int(np.argmin(returns)))
        # The group chosen by return, as in the paper, even when the weights' argmax is another one.
        assert result.selected_group == picked[-1]
        np.testing.assert_allclose(result.weights, np.bincount(picked, minlength=K) / len(picked))
        np.testing.assert_allclose(result.rewards, group_rewards @ result.weights)
    assert result.selected_group == 1 and int(np.argmax(result.weights)) in (0, 1)
    # The counts survive a save and a rebuild from the config.
    again = make_aggregation(rule.name, **rule.config())
    again.load_state_dict(rule.state_dict())
    np.testing.assert_allclose(again.weights(np.array([0.0, 1.0, 2.0])), rule.weights(np.array([0.0, 1.0, 2.0])))
    with pytest.raises(ValueError, match="average must be true or false"):
        WorstGroup(average="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative counts"):
        WorstGroup(average=True).load_state_dict({"selections": np.array([1.0, -1.0]), "calls": np.array(2)})


def test_worst_group_warmup_trains_on_uniform_weights_then_counts_them_as_a_prior(group_rewards: np.ndarray) -> None:
    rule = WorstGroup(average=True, warmup=3)
    for _ in range(3):
        np.testing.assert_allclose(rule.weights(np.array([0.0, -1.0, 1.0])), np.full(K, 1 / K))
    # the first selection after the warm-up joins 3 uniform rollouts (1 per group): (1, 2, 1) / 4
    np.testing.assert_allclose(rule.weights(np.array([0.0, -1.0, 1.0])), [0.25, 0.5, 0.25])
    again = make_aggregation(rule.name, **rule.config())
    again.load_state_dict(rule.state_dict())
    np.testing.assert_allclose(again.weights(np.array([-5.0, 0.0, 0.0])), [0.4, 0.4, 0.2])
    # without averaging: uniform during the warm-up, then the paper's one-hot rule
    plain = WorstGroup(warmup=1)
    np.testing.assert_allclose(plain.weights(np.array([0.0, -1.0, 1.0])), np.full(K, 1 / K))
    np.testing.assert_array_equal(plain.weights(np.array([0.0, -1.0, 1.0])), [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="warmup must be a whole number"):
        WorstGroup(warmup=-1)


def test_per_sample_min_is_elementwise_min_and_not_linear(group_rewards: np.ndarray) -> None:
    rule = PerSampleMin()
    assert not rule.is_linear
    result = rule.aggregate(group_rewards, np.zeros(K))
    np.testing.assert_array_equal(result.rewards, np.min(group_rewards, axis=-1))
    assert result.selected_group is None
    # Its weights are how often each group was the minimum, and no weight vector reproduces the min.
    expected_freq = np.bincount(group_rewards.argmin(-1).ravel(), minlength=K) / group_rewards[..., 0].size
    np.testing.assert_allclose(result.weights, expected_freq)
    assert not np.allclose(result.rewards, group_rewards @ result.weights)
    assert result.diagnostics["min_minus_mean"] < 0
    with pytest.raises(NotImplementedError, match="not a weighted sum"):
        rule.weights(np.zeros(K))


def test_mean_is_the_average_or_given_shares(group_rewards: np.ndarray) -> None:
    result = Mean().aggregate(group_rewards, np.array([5.0, -3.0, 0.0]))
    np.testing.assert_allclose(result.rewards, group_rewards.mean(axis=-1))
    np.testing.assert_allclose(result.weights, np.full(K, 1 / K))
    shares = Mean(weights=[8, 1, 1]).aggregate(group_rewards, np.zeros(K))
    np.testing.assert_allclose(shares.weights, [0.8, 0.1, 0.1])
    np.testing.assert_allclose(shares.rewards, group_rewards @ np.array([0.8, 0.1, 0.1]))


def test_softmin_limits_worst_group_and_mean(group_rewards: np.ndarray) -> None:
    returns = np.array([0.2, -0.4, 1.5])
    cold = SoftMin(tau=1e-6).aggregate(group_rewards, returns)
    worst = WorstGroup().aggregate(group_rewards, returns)
    np.testing.assert_allclose(cold.weights, worst.weights, atol=1e-12)
    np.testing.assert_allclose(cold.rewards, worst.rewards, atol=1e-9)
    hot = SoftMin(tau=1e6).aggregate(group_rewards, returns)
    np.testing.assert_allclose(hot.weights, np.full(K, 1 / K), atol=1e-5)
    np.testing.assert_allclose(hot.rewards, group_rewards.mean(-1), atol=1e-4)
    # The soft minimum lies between the min and the mean, closing in on each at its limit.
    assert np.isclose(cold.diagnostics["softmin_value"], returns.min(), atol=1e-4)
    assert np.isclose(hot.diagnostics["softmin_value"], returns.mean(), atol=1e-4)
    middle = SoftMin(tau=0.5).aggregate(group_rewards, returns).diagnostics["softmin_value"]
    assert returns.min() < middle < returns.mean()


def test_softmin_weights_are_stable_for_extreme_inputs() -> None:
    weights = SoftMin(tau=1e-300).weights(np.array([1e300, -1e300, 0.0]))
    np.testing.assert_array_equal(weights, [0.0, 1.0, 0.0])
    weights = SoftMin(tau=np.inf).weights(np.array([1e300, -1e300, 0.0]))
    np.testing.assert_allclose(weights, np.full(K, 1 / K))
    weights = SoftMin(tau=1.0).weights(np.array([1000.0, 1000.0, 5000.0]))
    np.testing.assert_allclose(weights, [0.5, 0.5, 0.0])


def test_egd_stays_on_simplex_under_many_random_updates(rng: np.random.Generator) -> None:
    assert ExponentiatedGradient().current_weights is None  # K not known yet
    rule = ExponentiatedGradient(eta=0.5, num_groups=K)
    np.testing.assert_allclose(rule.current_weights, np.full(K, 1 / K))  # starts uniform
    for _ in range(2000):
        returns = rng.normal(size=K) * rng.choice([1e-6, 1.0, 1e6]) + rng.normal() * 1e3
        assert_on_simplex(rule.weights(returns))
    assert rule.num_updates == 2000


def test_egd_shifts_weight_towards_the_worse_group() -> None:
    rule = ExponentiatedGradient(eta=0.2)
    first = rule.weights(np.array([1.0, -1.0, 1.0]))
    assert first[1] > 1 / K > first[0]
    assert np.isclose(first[0], first[2])
    previous = first
    for _ in range(10):
        current = rule.weights(np.array([1.0, -1.0, 1.0]))
        assert current[1] > previous[1]
        previous = current
    # After the worse group catches up and overtakes, weight flows back to the others.
    later = rule.weights(np.array([-1.0, 1.0, -1.0]))
    assert later[1] < previous[1]


def test_egd_running_scale_is_unit_free_and_fixed_scale_is_not() -> None:
    returns = [np.array([0.0, -1.0, 0.5]), np.array([0.1, -0.5, 0.3]), np.array([0.0, 0.2, -0.1])]
    small, large = ExponentiatedGradient(eta=0.3), ExponentiatedGradient(eta=0.3)
    for r in returns:
        np.testing.assert_allclose(small.weights(r), large.weights(1000.0 * r + 7.0))
    # With scale=None and K=2 the first step multiplies the weight ratio by exp(2 * eta), whatever the gap.
    w = ExponentiatedGradient(eta=0.3).weights(np.array([5.0, -123.0]))
    assert np.isclose(w[1] / w[0], np.exp(0.6))
    # A fixed scale is the textbook update w_k ∝ exp(-eta * r_k / c).
    fixed = ExponentiatedGradient(eta=0.3, scale=2.0).weights(np.array([1.0, -1.0]))
    np.testing.assert_allclose(fixed, np.exp([-0.15, 0.15]) / np.exp([-0.15, 0.15]).sum())
    # Equal returns: no information, no step.
    np.testing.assert_allclose(ExponentiatedGradient().weights(np.full(K, 4.0)), np.full(K, 1 / K))


def test_egd_state_dict_round_trip(rng: np.random.Generator) -> None:
    rule = ExponentiatedGradient(eta=0.4)
    for _ in range(5):
        rule.weights(rng.normal(size=K))
    state = rule.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    clone = ExponentiatedGradient(eta=0.4)
    clone.load_state_dict(state)
    next_returns = rng.normal(size=K)
    np.testing.assert_allclose(rule.weights(next_returns), clone.weights(next_returns))
    with pytest.raises(ValueError, match="K=2"):
        ExponentiatedGradient(num_groups=2).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        clone.load_state_dict({"log_weights": state["log_weights"]})


def test_egd_recovers_a_group_after_a_long_lag() -> None:
    # Plain products would underflow to an absorbing 0 here; log-weights do not.
    rule = ExponentiatedGradient(eta=5.0, scale=1.0)
    for _ in range(200):
        rule.weights(np.array([10.0, -10.0]))
    for _ in range(300):
        w = rule.weights(np.array([-10.0, 10.0]))
    assert w[0] > 0.99


# --------------------------------------------------------------------------- properties shared by rules
@pytest.mark.parametrize("name", ["worst_group", "softmin", "egd", "mean"])
def test_linear_rules_reward_is_group_rewards_at_weights(name: str, group_rewards: np.ndarray) -> None:
    rule = make_aggregation(name)
    assert rule.is_linear and rule.name == name
    result = rule.aggregate(group_rewards, np.array([0.4, -0.1, 0.9]))
    assert isinstance(result, AggregationResult)
    assert result.rewards.shape == group_rewards.shape[:-1]
    assert_on_simplex(result.weights)
    np.testing.assert_allclose(result.rewards, group_rewards @ result.weights)
    assert {"worst_group_return", "return_spread", "weights_entropy", "reward_mean"} <= set(result.diagnostics)
    assert all(isinstance(v, float) for v in result.diagnostics.values())


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_rules_accept_any_leading_shape(name: str, rng: np.random.Generator) -> None:
    batch = rng.normal(size=(10, K))  # e.g. a language model's (batch, K)
    result = make_aggregation(name).aggregate(batch, batch.mean(0))
    assert result.rewards.shape == (10,)


# --------------------------------------------------------------------------- validation and the factory
@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_rules_reject_bad_shapes_and_values(name: str, group_rewards: np.ndarray) -> None:
    rule: Aggregation = make_aggregation(name)
    returns = np.zeros(K)
    with pytest.raises(ValueError, match="last axis"):
        rule.aggregate(group_rewards[..., :2], returns)
    with pytest.raises(ValueError, match=r"shape \(K,\)"):
        rule.aggregate(group_rewards, np.zeros((K, 1)))
    with pytest.raises(ValueError, match="leading axis"):
        rule.aggregate(group_rewards[0, 0], returns)
    bad = group_rewards.copy()
    bad[2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"group_rewards contains 1 NaN value\(s\), the first at index \(2, 1, 0\)"):
        rule.aggregate(bad, returns)
    with pytest.raises(ValueError, match="group_returns contains 1 infinite"):
        rule.aggregate(group_rewards, np.array([0.0, np.inf, 0.0]))
    # K is fixed by the first successful call, not by the failed ones above.
    assert rule.num_groups is None
    rule.aggregate(group_rewards, returns)
    assert rule.num_groups == K
    with pytest.raises(ValueError, match="set up for K=3"):
        rule.aggregate(group_rewards[..., :2], np.zeros(2))


def test_make_aggregation_names_and_bad_arguments() -> None:
    assert set(AGGREGATIONS) == {"worst_group", "per_sample_min", "softmin", "egd", "mean"}
    assert isinstance(make_aggregation("Worst-Group"), WorstGroup)
    assert make_aggregation("softmin", tau=0.25).tau == 0.25
    with pytest.raises(ValueError, match=r"unknown aggregation 'maxmin'; valid names are \['egd', 'mean'"):
        make_aggregation("maxmin")
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau must be a number > 0"):
            make_aggregation("softmin", tau=tau)
    for eta in (0.0, -0.1, float("inf")):
        with pytest.raises(ValueError, match="eta must be a finite number > 0"):
            make_aggregation("egd", eta=eta)
    with pytest.raises(ValueError, match="scale must be None"):
        make_aggregation("egd", scale=0.0)
    with pytest.raises(ValueError, match=r"unexpected argument\(s\) \['tua'\]"):
        make_aggregation("softmin", tua=0.1)
    with pytest.raises(ValueError, match="non-negative"):
        make_aggregation("mean", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="num_groups=3"):
        Mean(weights=[1.0, 1.0], num_groups=3)


# --------------------------------------------------------------------------- normaliser
def test_normalizer_running_stats_match_numpy_across_uneven_batches(rng: np.random.Generator) -> None:
    scales = np.array([1.0, 100.0, 0.01])
    batches = [rng.normal(loc=[3.0, -50.0, 0.2], size=(n, K)) * scales for n in (1, 7, 0, 250, 3)]
    batches.append(rng.normal(size=(4, 5, K)) * scales)  # any leading shape counts as samples
    normalizer = GroupRewardNormalizer(K)
    for batch in batches:
        normalizer.update(batch)
    everything = np.concatenate([b.reshape(-1, K) for b in batches])
    assert normalizer.count == len(everything)
    np.testing.assert_allclose(normalizer.mean, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(normalizer.std, everything.std(0), rtol=1e-10)
    z = normalizer.normalize(everything)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(z.std(0), everything.std(0) / np.sqrt(everything.var(0) + normalizer.eps), rtol=1e-10)
    assert set(normalizer.log_dict()) >= {"normalizer/count", "normalizer/mean_0", "normalizer/std_2"}


def test_normalizer_from_data_is_frozen_and_freeze_stops_updates(rng: np.random.Generator) -> None:
    data = rng.normal(size=(100, K))
    fixed = GroupRewardNormalizer.from_data(data)
    assert fixed.frozen
    before = fixed.state_dict()
    fixed.update(rng.normal(size=(50, K)) + 10.0)
    np.testing.assert_array_equal(fixed.mean, before["mean"])
    np.testing.assert_allclose(fixed.normalize(data), (data - data.mean(0)) / np.sqrt(data.var(0) + 1e-8))
    running = GroupRewardNormalizer.from_data(data, frozen=False)
    running.update(data)
    assert running.count == 200
    # Before any data: mean 0, variance 1, i.e. (almost) the identity.
    np.testing.assert_allclose(GroupRewardNormalizer(K).normalize(data), data, rtol=1e-7)


def test_normalizer_state_dict_round_trip(rng: np.random.Generator) -> None:
    normalizer = GroupRewardNormalizer(K, eps=1e-6)
    normalizer.update(rng.normal(size=(30, K)))
    normalizer.freeze()
    state = normalizer.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    buffer = io.BytesIO()
    np.savez(buffer, **state)  # plain arrays: savable and loadable without pickle
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:
        clone = GroupRewardNormalizer(K)
        clone.load_state_dict(dict(loaded))
    x = rng.normal(size=(5, K))
    np.testing.assert_array_equal(clone.normalize(x), normalizer.normalize(x))
    assert clone.frozen and clone.count == 30 and clone.eps == 1e-6
    with pytest.raises(ValueError, match=r"shape \(2,\) for K=2"):
        GroupRewardNormalizer(2).load_state_dict(state)


def test_normalizer_rejects_bad_input() -> None:
    normalizer = GroupRewardNormalizer(K)
    with pytest.raises(ValueError, match="K=3 groups on its last axis"):
        normalizer.update(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        normalizer.update(np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError, match="infinite"):
        normalizer.normalize(np.array([[0.0, -np.inf, 1.0]]))
    with pytest.raises(ValueError, match="at least one sample"):
        GroupRewardNormalizer.from_data(np.zeros((0, K)))
    with pytest.raises(ValueError, match="num_groups"):
        GroupRewardNormalizer(0)
    with pytest.raises(ValueError, match="eps"):
        GroupRewardNormalizer(K, eps=0.0)
    assert normalizer.count == 0  # failed calls changed nothing


def test_combine_applies_given_weights_without_changing_state():
    from egalitarian_rl.algorithms.aggregation import make_aggregation

    rewards = np.array([[1.0, -2.0], [0.5, 3.0]])
    egd = make_aggregation("egd", eta=0.5)
    weights = egd.weights(np.array([0.0, 1.0]))
    before = egd.state_dict()
    np.testing.assert_allclose(egd.combine(rewards, weights), rewards @ weights)
    for key, value in egd.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    np.testing.assert_array_equal(make_aggregation("per_sample_min").combine(rewards, weights), [-2.0, 0.5])


def test_config_rebuilds_the_rule():
    from egalitarian_rl.algorithms.aggregation import make_aggregation

    for name, kwargs in [("softmin", {"tau": 0.3}), ("egd", {"eta": 0.2}), ("mean", {"weights": [0.8, 0.2]}), ("worst_group", {})]:
        rule = make_aggregation(name, **kwargs)
        again = make_aggregation(rule.name, **rule.config())
        returns = np.array([1.0, -0.5])
        np.testing.assert_allclose(again.weights(returns), make_aggregation(name, **kwargs).weights(returns))


def test_fixed_weights_apply_from_the_first_rollout() -> None:
    from stable_baselines3.common.env_util import make_vec_env

    from egalitarian_rl import envs
    from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv, true_rewards

    np.testing.assert_allclose(Mean().initial_weights(4), np.full(4, 0.25))
    np.testing.assert_allclose(WorstGroup(average=True, warmup=2).initial_weights(2), [0.5, 0.5])
    with pytest.raises(ValueError, match="2 weights given for 3 groups"):
        Mean(weights=[0.8, 0.2]).initial_weights(3)
    # The relabelling wrapper trains its very first rollout on the rule's fixed weights, not 50/50.
    venv = make_vec_env(envs.FAIRGRID_ID, n_envs=1)
    wrapped = GroupRewardVecEnv(venv, true_rewards(), Mean(weights=[0.8, 0.2]), 2)
    np.testing.assert_allclose(wrapped.weights, [0.8, 0.2])
    wrapped.close()
