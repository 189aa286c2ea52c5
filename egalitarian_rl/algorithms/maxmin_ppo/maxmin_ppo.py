"""MaxMinPPO: PPO that serves the worst-off group of users (MaxMin-RLHF, Chakraborty et al. 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import SelfBaseAlgorithm
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, BasePolicy, MultiInputActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv, unwrap_vec_normalize, unwrap_vec_wrapper

from egalitarian_rl.algorithms.aggregation import Aggregation, GroupRewardNormalizer, make_aggregation
from egalitarian_rl.algorithms.maxmin_ppo.group_critics import GroupCriticPolicy, GroupRolloutBuffer
from egalitarian_rl.rewards.em import EMRewardMixture
from egalitarian_rl.rewards.nets import RewardMixture
from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv, check_reward_spaces, learned_rewards


class MaxMinPPO(PPO):
    """PPO on an aggregate of K learned group rewards, by default their per-step minimum.

    Every step, the ``reward_mixture`` scores the transition for each of its K
    members (one per recovered user group); the rewards are put on one scale
    by ``normalizer`` and combined by the ``aggregation`` rule into the reward
    PPO trains on. The relabelling happens in a :class:`GroupRewardVecEnv`
    around the training env, i.e. before SB3 computes GAE. After each rollout
    a return-level rule re-weighs the groups from their estimated returns under
    the current policy: ``worst_group`` (the paper's MaxMin step) gives the next
    rollout to the group with the lowest return. The default ``per_sample_min``
    (the paper's released code) trains on ``min_k r_k`` at every step, a
    stationary reward that found the compromise on FairGrid where the
    return-level rules oscillated (``benchmarks/fairgrid_maxmin.py``).

    The arguments up to ``device`` are :class:`stable_baselines3.PPO`'s, with its
    defaults and meanings; the MaxMin arguments are keyword-only.

    :param policy: the policy model (``"MlpPolicy"``, ``"CnnPolicy"``, ... or a class).
    :param env: the training env (gymnasium env, VecEnv or registered id). Its own reward is ignored.
        Inside a ``VecNormalize``, the relabelling goes beneath it: the reward model
        reads raw observations, the policy normalised ones.
    :param reward_mixture: K learned group rewards: a fitted :class:`EMRewardMixture` or its
        ``.reward`` (a :class:`RewardMixture`); its input spaces must match the env's.
        ``None`` only when loading.
    :param aggregation: ``"per_sample_min"``, ``"worst_group"``, ``"softmin"``, ``"egd"``,
        ``"mean"`` or an :class:`Aggregation` (e.g. ``Mean(weights=em.shares_)`` for the
        share-weighted utilitarian baseline).
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

    Tensorboard (after every rollout): ``groups/return_<g>`` each group's estimated
    return (learned, normalised reward) over the episodes finished in the rollout,
    ``groups/weight_<g>`` the next rollout's weights (linear rules), ``groups/selected``
    (``worst_group``: the group trained on), ``groups/minimum_share_<g>`` the fraction of
    steps at which group ``g`` had the lowest reward (what ``per_sample_min`` trains on),
    ``groups/reward_mean_<g>`` / ``groups/reward_std_<g>`` the normaliser's statistics.
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
        learning_rate: float | Schedule = 3e-4,
        n_steps: int = 2048,
        batch_size: int = 64,
        n_epochs: int = 10,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        target_kl: float | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        *,
        reward_mixture: RewardMixture | EMRewardMixture | None = None,
        aggregation: str | Aggregation = "per_sample_min",
        aggregation_kwargs: dict[str, Any] | None = None,
        normalizer: GroupRewardNormalizer | None = None,
        group_names: Sequence[str] | None = None,
        group_critics: bool = False,
        _init_setup_model: bool = True,
    ) -> None:
        if isinstance(reward_mixture, EMRewardMixture):
            reward_mixture = reward_mixture._require_fitted()
        if reward_mixture is not None and not isinstance(reward_mixture, RewardMixture):
            raise TypeError(f"reward_mixture must be a RewardMixture or a fitted EMRewardMixture, got {type(reward_mixture).__name__}")
        self.reward_mixture = reward_mixture
        if isinstance(aggregation, Aggregation):
            self.aggregation = aggregation
        else:
            self.aggregation = make_aggregation(aggregation, **(aggregation_kwargs or {}))
        self.normalizer = normalizer
        self.fit_normalizer_on_first_rollout = normalizer is None
        self.group_names = None if group_names is None else list(group_names)
        self.group_critics = group_critics
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=gamma,
            gae_lambda=gae_lambda,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_advantage,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            target_kl=target_kl,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ set-up
    def _setup_model(self) -> None:
        if self.reward_mixture is None:
            if not getattr(self, "_saved_state", None):
                raise ValueError("MaxMinPPO needs reward_mixture: the K learned group rewards (e.g. EMRewardMixture(...).fit(data))")
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
        if self.group_critics:
            self.rollout_buffer.bind(self._step_group_rewards, self._last_group_values)

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
        check_reward_spaces(self.reward_mixture, env.observation_space, env.action_space)
        return GroupRewardVecEnv(
            env,
            learned_rewards(self.reward_mixture),
            self.aggregation,
            n_groups=self.reward_mixture.n_members,
            normalizer=self.normalizer,
            group_names=self.group_names,
        )

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        """SB3's ``set_env``; the new env is relabelled too and keeps the group weights learned so far."""
        previous = None if self.env is None else unwrap_vec_wrapper(self.env, GroupRewardVecEnv)
        super().set_env(env, force_reset)
        self.env = self._wrap_group_rewards(self.env)
        if isinstance(previous, GroupRewardVecEnv) and previous is not self.group_env:
            self.group_env.weights = previous.weights.copy()
            self.group_env.group_return_estimates = previous.group_return_estimates

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
            # This rollout's rewards are aggregated with these weights: the critics' advantages must be too.
            rollout_buffer.weights = self.group_env.weights.copy()
            self.policy.set_value_weights(rollout_buffer.weights)
        completed = super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        if self.fit_normalizer_on_first_rollout and not self.normalizer.frozen:
            self.normalizer.freeze()
        self._log_groups(self.group_env.end_rollout())
        return completed

    def _step_group_rewards(self) -> np.ndarray:
        """``(n_envs, K)`` the last step's group rewards in the units the scalar reward reached the buffer in.

        The wrapper's normalised group rewards, scaled like the aggregated reward by
        a ``VecNormalize(norm_reward=True)`` above it, plus each group's own
        time-limit bootstrap ``gamma * V_k(terminal obs)`` (SB3 adds the aggregate's).
        """
        group_env = self.group_env
        rewards = np.array(group_env.last_group_rewards, dtype=np.float64)
        normalize = unwrap_vec_normalize(self.env)
        if normalize is not None and normalize.norm_reward:
            rewards = normalize.normalize_reward(rewards)
        for index, (done, info) in enumerate(zip(group_env.last_dones, group_env.last_infos)):
            # VecNormalize rewrote ``terminal_observation`` in these same dicts: it is what the policy sees.
            if done and info.get("terminal_observation") is not None and info.get("TimeLimit.truncated", False):
                terminal_obs = self.policy.obs_to_tensor(info["terminal_observation"])[0]
                with th.no_grad():
                    rewards[index] += self.gamma * self.policy.predict_group_values(terminal_obs)[0].cpu().numpy()
        return rewards

    def _last_group_values(self) -> th.Tensor:
        """``(n_envs, K)`` every group's value of the observations after the rollout's last step."""
        with th.no_grad():
            return self.policy.predict_group_values(obs_as_tensor(self._last_obs, self.device))

    def _log_groups(self, stats: dict[str, Any]) -> None:
        """``groups/*``: each group's estimated return, what the rule did with it, and the scale used."""
        for index, name in enumerate(self.group_names):
            if stats["group_returns"] is not None:
                self.logger.record(f"groups/return_{name}", float(stats["group_returns"][index]))
            if stats["weights"] is not None:
                self.logger.record(f"groups/weight_{name}", float(stats["weights"][index]))
            # The share of steps at which this group had the lowest reward: what per_sample_min trained on.
            self.logger.record(f"groups/minimum_share_{name}", float(stats["minimum_shares"][index]))
            self.logger.record(f"groups/reward_mean_{name}", float(self.normalizer.mean[index]))
            self.logger.record(f"groups/reward_std_{name}", float(self.normalizer.std[index]))
        if self.aggregation.name == "worst_group" and stats["group_returns"] is not None:
            # The group the rule chose by return (with averaging, not the weights' argmax).
            self.logger.record("groups/selected", int(np.argmin(stats["group_returns"])))

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
