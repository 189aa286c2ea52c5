"""MaxMinPPO behaves as a stable-baselines3 agent."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import SubprocVecEnv

from egalitarian_rl import MaxMinPPO, envs
from egalitarian_rl.algorithms.aggregation import GroupRewardNormalizer
from egalitarian_rl.rewards.nets import RewardMixture
from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv

FAIRGRID = envs.FAIRGRID_ID
SMALL = {"n_steps": 64, "batch_size": 64, "n_epochs": 2, "device": "cpu"}


def _mixture(k=2, seed=0):
    torch.manual_seed(seed)
    env = gym.make(FAIRGRID)
    return RewardMixture(env.observation_space, env.action_space, k, use_action=False, use_next_state=True, hidden_sizes=(16,))


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), aggregation="egd", seed=0, **SMALL)
    model.learn(256)
    model.save(tmp_path / "maxmin.zip")
    loaded = MaxMinPPO.load(tmp_path / "maxmin.zip", env=gym.make(FAIRGRID), device="cpu")
    obs = np.eye(25, dtype=np.float32)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    # the reward mixture, the rule's state and the group weights travel with the agent
    np.testing.assert_allclose(
        loaded.reward_mixture.predict_rewards(obs, np.zeros(25, dtype=int), obs),
        model.reward_mixture.predict_rewards(obs, np.zeros(25, dtype=int), obs),
    )
    np.testing.assert_allclose(loaded.group_env.weights, model.group_env.weights)
    assert loaded.aggregation.name == "egd"
    for key, value in model.aggregation.state_dict().items():
        np.testing.assert_allclose(loaded.aggregation.state_dict()[key], value)
    np.testing.assert_allclose(loaded.normalizer.mean, model.normalizer.mean)
    loaded.learn(128)  # and it keeps training


def test_learns_with_four_subprocess_workers():
    # "egalitarian_rl.envs:" makes each worker process import the package that registers the id
    venv = make_vec_env(f"egalitarian_rl.envs:{FAIRGRID}", n_envs=4, seed=0, vec_env_cls=SubprocVecEnv)
    try:
        model = MaxMinPPO("MlpPolicy", venv, reward_mixture=_mixture(), aggregation="mean", seed=0, **SMALL)
        returns = []
        for _ in range(12):
            model.learn(4 * 64, reset_num_timesteps=False)
            returns.append(model.group_env.group_return_estimates.mean())
        assert model.num_timesteps == 12 * 256
        assert isinstance(model.get_env(), GroupRewardVecEnv)
        # the mean learned (normalised) return the policy is trained on goes up
        assert np.mean(returns[-3:]) > np.mean(returns[:3]) + 0.5
    finally:
        venv.close()


def test_evaluate_policy_works_on_a_plain_env():
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), seed=0, **SMALL)
    mean_reward, std_reward = evaluate_policy(model, gym.make(FAIRGRID), n_eval_episodes=3)
    assert np.isfinite(mean_reward) and std_reward >= 0


class _RecordRewards(BaseCallback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        self.seen.append(
            (
                np.array(self.locals["rewards"]),
                np.stack([info["learned_group_rewards"] for info in infos]),
                np.array([info["env_reward"] for info in infos]),
                self.model.group_env.weights.copy(),
            )
        )
        return True


def test_a_callback_sees_the_relabelled_reward():
    normalizer = GroupRewardNormalizer.from_data(np.random.default_rng(0).normal(size=(100, 2)))
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), normalizer=normalizer, aggregation="worst_group", seed=0, **SMALL)
    callback = _RecordRewards()
    model.learn(192, callback=callback)
    for rewards, group_rewards, _, weights in callback.seen:
        np.testing.assert_allclose(rewards, group_rewards @ weights, rtol=1e-5, atol=1e-6)
    all_rewards = np.concatenate([s[0] for s in callback.seen])
    all_env = np.concatenate([s[2] for s in callback.seen])
    assert not np.allclose(all_rewards, all_env)  # the env's own reward is not what PPO trains on
    # after a rollout, worst_group puts all weight on one group
    assert sorted(callback.seen[-1][3].tolist()) == [0.0, 1.0]


def test_the_learned_reward_is_what_the_buffer_holds():
    # GAE is computed from the rollout buffer: it must hold the relabelled rewards
    normalizer = GroupRewardNormalizer.from_data(np.random.default_rng(0).normal(size=(100, 2)))
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), normalizer=normalizer, aggregation="mean", seed=0, **SMALL)
    callback = _RecordRewards()
    model.learn(64, callback=callback)
    buffer_rewards = model.rollout_buffer.rewards[:, 0]
    seen = np.array([s[0][0] for s in callback.seen])
    # FairGrid truncates after 30 steps: SB3 adds gamma * V(terminal obs) to that step's reward
    truncated = np.zeros(64, dtype=bool)
    truncated[29::30] = True
    np.testing.assert_allclose(buffer_rewards[~truncated], seen[~truncated], rtol=1e-5)
    assert not np.allclose(buffer_rewards[truncated], seen[truncated])


def test_group_names_must_match_the_mixture():
    with pytest.raises(ValueError, match="3 group names for a reward mixture of 2"):
        MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), group_names=["a", "b", "c"], **SMALL)
    with pytest.raises(ValueError, match="unknown aggregation"):
        MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), aggregation="median", **SMALL)


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(folder.glob("*")))).Reload()
    return {tag: np.array([e.value for e in events.Scalars(tag)]) for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_per_group(tmp_path):
    model = MaxMinPPO(
        "MlpPolicy",
        FAIRGRID,
        reward_mixture=_mixture(),
        aggregation="worst_group",
        group_names=["majority", "minority"],
        tensorboard_log=str(tmp_path),
        seed=0,
        **SMALL,
    )
    model.learn(640)
    scalars = _scalars(tmp_path)
    majority, minority = scalars["groups/weight_majority"], scalars["groups/weight_minority"]
    # worst_group: all weight on one group, and "selected" names it; it is the group with the lower return
    np.testing.assert_allclose(majority + minority, 1.0)
    assert set(np.unique(majority)) <= {0.0, 1.0}
    np.testing.assert_array_equal(scalars["groups/selected"], minority)
    lower = (scalars["groups/return_minority"] < scalars["groups/return_majority"]).astype(float)
    np.testing.assert_array_equal(minority, lower)
    assert np.all(scalars["groups/reward_std_majority"] > 0)


def test_per_sample_min_logs_how_often_each_group_is_the_minimum(tmp_path):
    model = MaxMinPPO(
        "MlpPolicy", FAIRGRID, reward_mixture=_mixture(), aggregation="per_sample_min", group_names=["a", "b"],
        tensorboard_log=str(tmp_path), seed=0, **SMALL,
    )  # fmt: skip
    callback = _RecordRewards()
    model.learn(640, callback=callback)
    scalars = _scalars(tmp_path)
    # no weights and no "selected" group: the rule has neither
    assert not {"groups/weight_a", "groups/selected"} & set(scalars)
    shares = np.stack([scalars["groups/minimum_share_a"], scalars["groups/minimum_share_b"]])
    np.testing.assert_allclose(shares.sum(axis=0), 1.0)
    # the first rollout's share matches the rewards the callback saw
    first = np.concatenate([seen[1] for seen in callback.seen[:64]])
    assert shares[0, 0] == pytest.approx(np.mean(first.argmin(axis=1) == 0))
    assert 0.0 < shares[0].mean() < 1.0


def test_a_reward_mixture_is_required():
    with pytest.raises(ValueError, match="needs reward_mixture"):
        MaxMinPPO("MlpPolicy", FAIRGRID, **SMALL)


def test_observation_normalisation_stays_outside_the_reward_model():
    from stable_baselines3.common.vec_env import VecNormalize

    seen_obs = []
    mixture = _mixture()
    predict = mixture.predict_rewards

    def recording_predict(obs, acts, next_obs):
        seen_obs.append(np.array(obs))
        return predict(obs, acts, next_obs)

    mixture.predict_rewards = recording_predict
    venv = VecNormalize(make_vec_env(FAIRGRID, n_envs=2, seed=0), norm_obs=True, norm_reward=False)
    model = MaxMinPPO("MlpPolicy", venv, reward_mixture=mixture, seed=0, **SMALL)
    model.learn(128)
    assert isinstance(model.get_env(), VecNormalize)
    raw = np.concatenate(seen_obs)
    assert set(np.unique(raw)) <= {0.0, 1.0}  # one-hot cells, not normalised values
    assert model.group_env.num_envs == 2


def test_group_critics_learn_one_value_per_group(tmp_path):
    # Two groups with opposite rewards: under the mean rule the policy gets nothing to chase
    # (a stationary policy), and each head must learn its own group's value, of opposite sign.
    mixture = _mixture()
    with torch.no_grad():
        for layers in (mixture.weights, mixture.biases):
            layers[0][1] = layers[0][0]
            layers[1][1] = -layers[1][0]
    normalizer = GroupRewardNormalizer(2)
    normalizer.update(np.random.default_rng(0).normal(size=(100, 2)))
    normalizer.freeze()
    model = MaxMinPPO(
        "MlpPolicy", make_vec_env(FAIRGRID, n_envs=2, seed=0), reward_mixture=mixture, normalizer=normalizer,
        aggregation="mean", group_critics=True, seed=0, **{**SMALL, "n_epochs": 10},
    )  # fmt: skip
    model.learn(2000)
    obs = model.policy.obs_to_tensor(np.eye(25, dtype=np.float32))[0]
    assert model.policy.predict_group_values(obs).shape == (25, 2)
    assert model.policy.predict_values(obs).shape == (25, 1)  # the aggregate's value, what SB3's bootstrap adds
    buffer = model.rollout_buffer
    returns = buffer.returns.reshape(-1, 2)
    values = model.policy.predict_group_values(model.policy.obs_to_tensor(buffer.observations.reshape(-1, 25))[0]).detach().numpy()

    def explained(group, head):
        return 1 - np.var(returns[:, group] - values[:, head]) / np.var(returns[:, group])

    for group in (0, 1):
        assert explained(group, group) > 0.1
        assert explained(group, 1 - group) < explained(group, group) - 0.5
    assert np.corrcoef(values.T)[0, 1] < -0.5
    model.save(tmp_path / "critics.zip")
    loaded = MaxMinPPO.load(tmp_path / "critics.zip", env=gym.make(FAIRGRID), device="cpu")
    np.testing.assert_allclose(loaded.policy.predict_group_values(obs).detach(), model.policy.predict_group_values(obs).detach(), rtol=1e-6)
    loaded.learn(128)


def test_group_critics_use_sb3_rollout_loop_with_gsde_and_vecnormalize():
    """gSDE noise is resampled and VecNormalize's reward scale reaches the K critics (SB3's own loop runs)."""
    from stable_baselines3.common.vec_env import VecNormalize

    venv = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0), norm_obs=True, norm_reward=True)
    env = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    mixture = RewardMixture(env.observation_space, env.action_space, 2, use_action=True, hidden_sizes=(16,))
    model = MaxMinPPO(
        "MlpPolicy", venv, reward_mixture=mixture, aggregation="softmin", group_critics=True,
        use_sde=True, sde_sample_freq=8, seed=0, **SMALL,
    )  # fmt: skip
    resets = []
    reset_noise = model.policy.reset_noise
    model.policy.reset_noise = lambda n_envs=1: (resets.append(n_envs), reset_noise(n_envs))
    seen = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            # after VecNormalize: the scalar reward SB3 stores, and the wrapper's K group rewards
            seen.append((np.array(self.locals["rewards"]), model._step_group_rewards(), self.model.rollout_buffer.weights.copy()))
            return True

    model.learn(256, callback=Record())
    assert len(resets) >= 256 // 2 // 8  # once per sde_sample_freq steps
    scalar = np.concatenate([s[0] for s in seen])
    combined = np.concatenate([s[1] @ s[2] for s in seen])
    # Pendulum episodes are 200 steps: none of these 128 steps per env is a time-limit truncation
    np.testing.assert_allclose(combined, scalar, rtol=1e-4, atol=1e-5)
    # the buffer holds the K group rewards in those units (the last rollout: 64 steps)
    np.testing.assert_allclose(model.rollout_buffer.rewards, np.stack([s[1] for s in seen[-64:]]), rtol=1e-5)
    assert not np.allclose(model.group_env.last_group_rewards, seen[-1][1])  # VecNormalize did rescale them


def test_group_advantages_are_combined_with_the_rollout_weights():
    from egalitarian_rl.algorithms.maxmin_ppo.group_critics import GroupRolloutBuffer

    env = gym.make(FAIRGRID)
    buffer = GroupRolloutBuffer(3, env.observation_space, env.action_space, gamma=0.5, gae_lambda=1.0, n_groups=2)
    rewards = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    for step in range(3):
        buffer.add(np.zeros((1, 25)), np.zeros((1, 1)), rewards[step : step + 1], np.array([step == 0]), torch.zeros(1, 2), torch.zeros(1))
    buffer.weights = np.array([0.25, 0.75])
    buffer.compute_returns_and_advantage(torch.zeros(1, 2), np.array([True]))
    # with zero values, each group's advantage is its discounted return-to-go
    returns = np.array([[1.0 + 0.0 + 0.25, 0.0 + 1.0 + 0.25], [0.5, 2.5], [1.0, 1.0]])
    np.testing.assert_allclose(buffer.returns[:, 0], returns)
    np.testing.assert_allclose(buffer.advantages[:, 0], returns @ [0.25, 0.75])


def test_group_critics_refuse_per_sample_min():
    with pytest.raises(ValueError, match="linear aggregation"):
        MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), aggregation="per_sample_min", group_critics=True, **SMALL)


def test_set_env_keeps_the_group_weights():
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=_mixture(), aggregation="worst_group", seed=0, **SMALL)
    model.learn(256)
    weights = model.group_env.weights.copy()
    model.set_env(make_vec_env(FAIRGRID, n_envs=1, seed=1))
    np.testing.assert_array_equal(model.group_env.weights, weights)


def test_memory_stays_bounded_without_end_rollout():
    import tracemalloc

    from egalitarian_rl.algorithms.aggregation import make_aggregation

    env = GroupRewardVecEnv(make_vec_env(FAIRGRID, n_envs=1, seed=0), lambda o, a, n, i: np.zeros((1, 2)), make_aggregation("mean"), 2)
    env.reset()
    tracemalloc.start()
    for _ in range(30 * 20):
        env.step(np.array([0]))
    before = tracemalloc.take_snapshot()
    for _ in range(30 * 300):  # 300 more episodes, as under plain PPO nobody calls end_rollout
        env.step(np.array([0]))
    # only what the wrapper allocates (SB3's Monitor keeps its own per-episode lists)
    stats = tracemalloc.take_snapshot().compare_to(before, "filename")
    grown = sum(stat.size_diff for stat in stats if stat.traceback[0].filename.endswith("vec_env.py"))
    tracemalloc.stop()
    assert grown < 2_000
    assert env.end_rollout()["n_episodes"] == 320


def test_accepts_a_fitted_em_mixture_and_checks_its_spaces(fairgrid_population):
    from egalitarian_rl.preferences import collect_preferences
    from egalitarian_rl.rewards import EMRewardMixture

    data = collect_preferences(gym.make(FAIRGRID), fairgrid_population, n_users=6, comparisons_per_user=5, segment_length=5, seed=0)
    em = EMRewardMixture(2, use_action=False, use_next_state=True, hidden_sizes=(8,), seed=0)
    with pytest.raises(Exception, match="fit"):
        MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=em, **SMALL)
    em.fit(data)
    model = MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=em, **SMALL)
    assert model.reward_mixture is em.reward
    cartpole = gym.make("CartPole-v1")
    other = RewardMixture(cartpole.observation_space, cartpole.action_space, 2, use_action=False, use_next_state=True)
    shapes = r"fitted on observations Box of shape \(4,\) but the env's observation space is Box of shape \(25,\)"
    with pytest.raises(ValueError, match=shapes):
        MaxMinPPO("MlpPolicy", FAIRGRID, reward_mixture=other, **SMALL)


def test_signature_reads_like_ppo():
    import inspect

    from stable_baselines3 import PPO

    ours = inspect.signature(MaxMinPPO.__init__).parameters
    theirs = inspect.signature(PPO.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours and ours[name].default == parameter.default, name
    assert ours["reward_mixture"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["aggregation"].default == "per_sample_min"
