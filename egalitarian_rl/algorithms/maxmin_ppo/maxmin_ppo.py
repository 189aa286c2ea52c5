"""MaxMinPPO: PPO that serves the worst-off group of users (MaxMin-RLHF, Chakraborty et al. 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import SelfBaseAlgorithm
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, BasePolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv, unwrap_vec_normalize, unwrap_vec_wrapper

from egalitarian_rl.algorithms.aggregation import Aggregation, GroupRewardNormalizer, make_aggregation
from egalitarian_rl.algorithms.maxmin_ppo.group_critics import GroupCriticPolicy, GroupRolloutBuffer
from egalitarian_rl.rewards.nets import RewardMixture
from egalitarian_rl.rewards.vec_env import LEARNED_GROUP_REWARDS_KEY, GroupRewardVecEnv, learned_rewards


class MaxMinPPO(PPO):
    """PPO on an aggregate of K learned group rewards, by default the worst-off group's.

    Every step, the ``reward_mixture`` scores the transition for each of its K
    members (one per recovered user group); the rewards are put on one scale
    by ``normalizer`` and combined by the ``aggregation`` rule into the reward
    PPO trains on. The relabelling happens in a :class:`GroupRewardVecEnv`
    around the training env, i.e. before SB3 computes GAE. After each rollout
    the rule re-weighs the groups from their estimated returns under the
    current policy: ``worst_group`` (the paper's MaxMin) gives the next
    rollout to the group with the lowest return.

    :param policy: the policy model (``"MlpPolicy"``, ``"CnnPolicy"``, ... or a class).
    :param env: the training env (gymnasium env, VecEnv or registered id). Its own reward is ignored.
        Inside a ``VecNormalize``, the relabelling goes beneath it: the reward model
        reads raw observations, the policy normalised ones.
    :param reward_mixture: K learned group rewards, e.g. ``EMRewardMixture(...).fit(data).reward``.
        ``None`` only when loading.
    :param aggregation: ``"worst_group"``, ``"per_sample_min"``, ``"softmin"``, ``"egd"``,
        ``"mean"`` or an :class:`Aggregation`.
    :param aggregation_kwargs: arguments of the rule (``tau`` for softmin, ``eta`` for egd, ...).
    :param normalizer: fixed per-group reward statistics (e.g. ``GroupRewardNormalizer.from_data``
        on the preference segments). ``None``: the statistics of the first rollout
        (the untrained policy), then frozen, so every group is measured as its gain
        over what an untrained policy gives it. Frozen statistics keep the reward
        stationary for the critic.
    :param group_names: names of the K groups for logs (``groups/return_<name>``).
    :param group_critics: one value head per group (``"MlpPolicy"`` only, linear rules only):
        each head learns its group's value, each group gets its own GAE, and the
        rule's weights combine the advantages. ``False``: one critic on the aggregated reward.
    :param ppo_kwargs: everything else goes to :class:`stable_baselines3.PPO`.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        reward_mixture: RewardMixture | None = None,
        aggregation: str | Aggregation = "worst_group",
        aggregation_kwargs: dict[str, Any] | None = None,
        normalizer: GroupRewardNormalizer | None = None,
        group_names: Sequence[str] | None = None,
        group_critics: bool = False,
        _init_setup_model: bool = True,
        **ppo_kwargs: Any,
    ) -> None:
        self.reward_mixture = reward_mixture
        if isinstance(aggregation, Aggregation):
            self.aggregation = aggregation
        else:
            self.aggregation = make_aggregation(aggregation, **(aggregation_kwargs or {}))
        self.normalizer = normalizer
        self.fit_normalizer_on_first_rollout = normalizer is None
        self.group_names = None if group_names is None else list(group_names)
        self.group_critics = group_critics
        super().__init__(policy, env, _init_setup_model=False, **ppo_kwargs)
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ set-up
    def _setup_model(self) -> None:
        if self.reward_mixture is None:
            if not getattr(self, "_saved_state", None):
                raise ValueError("MaxMinPPO needs reward_mixture: the K learned group rewards (e.g. EMRewardMixture(...).fit(data).reward)")
            # Loading: the config and tensors come from the zip (see ``save``).
            self.reward_mixture = RewardMixture.from_config(self._saved_state["reward_mixture_config"])
        if getattr(self, "_saved_state", None):
            self._restore_group_state(self._saved_state)
        n_groups = self.reward_mixture.n_members
        if self.group_names is None:
            self.group_names = [f"group_{k}" for k in range(n_groups)]
        if len(self.group_names) != n_groups:
            raise ValueError(f"{len(self.group_names)} group names for a reward mixture of {n_groups} members")
        if self.normalizer is None:
            self.normalizer = GroupRewardNormalizer(n_groups)
        if self.env is not None:
            self.env = self._wrap_group_rewards(self.env)
        if self.group_critics:
            self._use_group_critics(n_groups)
        super()._setup_model()

    def _use_group_critics(self, n_groups: int) -> None:
        if not self.aggregation.is_linear:
            raise ValueError(f"group_critics needs a linear aggregation rule; {self.aggregation.name!r} is not (use one critic)")
        if not issubclass(GroupCriticPolicy, self.policy_class):
            raise ValueError(f"group_critics works with 'MlpPolicy', not {self.policy_class.__name__}")
        self.policy_class = GroupCriticPolicy
        self.policy_kwargs = {**self.policy_kwargs, "n_critics": n_groups}
        self.rollout_buffer_class = GroupRolloutBuffer
        self.rollout_buffer_kwargs = {**self.rollout_buffer_kwargs, "n_groups": n_groups}

    def _wrap_group_rewards(self, env: VecEnv) -> VecEnv:
        """Relabel ``env``'s rewards; beneath a ``VecNormalize``, so the reward model sees raw observations."""
        if unwrap_vec_wrapper(env, GroupRewardVecEnv) is not None:
            return env
        normalize = unwrap_vec_normalize(env)
        if normalize is not None:
            normalize.venv = self._relabel(normalize.venv)
            return env
        return self._relabel(env)

    def _relabel(self, env: VecEnv) -> GroupRewardVecEnv:
        return GroupRewardVecEnv(
            env,
            learned_rewards(self.reward_mixture),
            self.aggregation,
            n_groups=self.reward_mixture.n_members,
            normalizer=self.normalizer,
            group_names=self.group_names,
        )

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        super().set_env(env, force_reset)
        self.env = self._wrap_group_rewards(self.env)

    @property
    def group_env(self) -> GroupRewardVecEnv:
        """The wrapper that relabels rewards (holds the current group weights)."""
        group_env = None if self.env is None else unwrap_vec_wrapper(self.env, GroupRewardVecEnv)
        assert isinstance(group_env, GroupRewardVecEnv), "MaxMinPPO has no training env"
        return group_env

    # ---------------------------------------------------------------- training
    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: RolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """SB3's rollout (rewards relabelled by the wrapper), then re-weigh the groups."""
        if self.group_critics:
            completed = self._collect_group_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        else:
            completed = super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        if self.fit_normalizer_on_first_rollout and not self.normalizer.frozen:
            self.normalizer.freeze()
        stats = self.group_env.end_rollout()
        self._log_groups(stats)
        return completed

    def _collect_group_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: GroupRolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """The rollout loop with K critics: each group's normalised reward goes to its own head."""
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()
        weights = self.group_env.weights.copy()  # the weights this rollout's rewards are aggregated with
        for _ in range(n_rollout_steps):
            with th.no_grad():
                actions, values, log_probs = self.policy(obs_as_tensor(self._last_obs, self.device))
            actions = actions.cpu().numpy()
            env_actions = actions
            if isinstance(self.action_space, spaces.Box):
                env_actions = (
                    self.policy.unscale_action(actions)
                    if self.policy.squash_output
                    else np.clip(actions, self.action_space.low, self.action_space.high)
                )
            new_obs, rewards, dones, infos = env.step(env_actions)
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            group_rewards = np.stack([info[LEARNED_GROUP_REWARDS_KEY] for info in infos]).astype(np.float32)
            # A time-limit truncation is not an end: every group's reward is
            # bootstrapped with its own head's value of the terminal observation.
            for index in np.flatnonzero(dones):
                if infos[index].get("TimeLimit.truncated", False) and infos[index].get("terminal_observation") is not None:
                    with th.no_grad():
                        terminal_obs = self.policy.obs_to_tensor(infos[index]["terminal_observation"])[0]
                        group_rewards[index] += self.gamma * self.policy.predict_values(terminal_obs)[0].cpu().numpy()
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.reshape(-1, 1)
            rollout_buffer.add(self._last_obs, actions, group_rewards, self._last_episode_starts, values, log_probs)
            self._last_obs = new_obs
            self._last_episode_starts = dones
        with th.no_grad():
            last_values = self.policy.predict_values(obs_as_tensor(new_obs, self.device))
        rollout_buffer.compute_returns_and_advantage(last_values, dones, weights)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _log_groups(self, stats: dict[str, Any]) -> None:
        for index, name in enumerate(self.group_names):
            if stats["group_returns"] is not None:
                self.logger.record(f"groups/return_{name}", float(stats["group_returns"][index]))
            self.logger.record(f"groups/weight_{name}", float(stats["weights"][index]))
            self.logger.record(f"groups/reward_mean_{name}", float(self.normalizer.mean[index]))
            self.logger.record(f"groups/reward_std_{name}", float(self.normalizer.std[index]))
        self.logger.record("groups/selected", int(np.argmax(stats["weights"])))

    # ----------------------------------------------------------------- storage
    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, tensors = super()._get_torch_save_params()
        return [*state_dicts, "reward_mixture"], tensors

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "reward_mixture", "aggregation", "normalizer"]

    def save(self, path: Any, exclude: Any = None, include: Any = None) -> None:
        """SB3 ``save`` plus the mixture (tensors + JSON config) and the group weights and statistics."""
        self._saved_state = self._group_state()
        super().save(path, exclude=exclude, include=include)

    def _group_state(self) -> dict[str, Any]:
        # Plain lists and numbers only: stored as JSON inside SB3's zip.
        return {
            "reward_mixture_config": self.reward_mixture.config(),
            "aggregation": self.aggregation.name,
            "aggregation_config": self.aggregation.config(),
            "aggregation_state": {k: np.asarray(v).tolist() for k, v in self.aggregation.state_dict().items()},
            "normalizer_state": {k: np.asarray(v).tolist() for k, v in self.normalizer.state_dict().items()},
            "weights": None if self.env is None else self.group_env.weights.tolist(),
        }

    def _restore_group_state(self, state: dict[str, Any]) -> None:
        self.aggregation = make_aggregation(state["aggregation"], **state["aggregation_config"])
        self.aggregation.load_state_dict({k: np.asarray(v) for k, v in state["aggregation_state"].items()})
        self.normalizer = GroupRewardNormalizer(self.reward_mixture.n_members)
        self.normalizer.load_state_dict({k: np.asarray(v) for k, v in state["normalizer_state"].items()})
        self._restored_weights = state.get("weights")

    @classmethod
    def load(cls: type[SelfBaseAlgorithm], path: Any, env: GymEnv | None = None, **kwargs: Any) -> SelfBaseAlgorithm:
        model = super().load(path, env=env, **kwargs)
        weights = getattr(model, "_restored_weights", None)
        if weights is not None and model.env is not None:
            model.group_env.weights = np.asarray(weights)
        return model
