"""The pipeline: collect -> fit -> train -> evaluate -> report.

Each stage saves its artefacts under ``out_dir/seed_<s>/`` and is skipped when
they already exist, so an interrupted run resumes where it stopped and a
changed report costs no retraining. Delete a stage's files to redo it.

Methods, all trained with the same PPO settings and budget:

- ``rlhf``: SB3 PPO on the single Bradley-Terry reward (standard RLHF);
- ``maxmin``: :class:`MaxMinPPO` on the EM mixture with the configured rule (worst_group by default);
- ``mean``: :class:`MaxMinPPO` with the utilitarian mean of the mixture;
- ``oracle_<group>``: SB3 PPO on that group's *true* reward (a reference, not RLHF).

Every policy is then judged by every group's true return.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure as configure_logger
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from egalitarian_rl import envs
from egalitarian_rl.algorithms.aggregation import GroupRewardNormalizer, make_aggregation
from egalitarian_rl.algorithms.maxmin_ppo import MaxMinPPO
from egalitarian_rl.evaluation import build_metrics, evaluate_group_returns, format_group_table, write_report
from egalitarian_rl.evaluation.callbacks import GroupReturnCallback
from egalitarian_rl.experiments.config import ConfigError, ExperimentConfig
from egalitarian_rl.io import save_json_atomic
from egalitarian_rl.preferences import MultiUserPreferenceWrapper, PreferenceDataset, collect_preferences
from egalitarian_rl.preferences.segments import concatenate_transitions
from egalitarian_rl.rewards import (
    EMRewardMixture,
    RewardMixture,
    adjusted_rand_index,
    fit_bradley_terry,
    preference_accuracy,
    purity,
    select_k,
)
from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv, learned_rewards, true_rewards


class Pipeline:
    """Runs one :class:`ExperimentConfig`.

    :param config: the experiment.
    :param progress_bar: show progress bars for collection and training.
    :param log: where progress messages go.
    """

    def __init__(self, config: ExperimentConfig, progress_bar: bool = True, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.progress_bar = progress_bar
        self.log = log
        self.out_dir = Path(config.out_dir)
        self._validate()
        self.population = envs.make_population(
            config.env_id,
            config.groups,
            beta=config.collect.beta if config.collect.beta is not None else float("inf"),
            mistake_rate=config.collect.mistake_rate,
        )
        self.group_names = list(self.population.group_names)
        self.methods = [m for m in config.methods if m != "oracle"]
        if "oracle" in config.methods:
            self.methods += [f"oracle_{name}" for name in self.group_names]

    def _validate(self) -> None:
        """Fail before any work on what the config gets wrong."""
        config = self.config
        try:
            gym.spec(config.env_id)
        except gym.error.Error as err:
            raise ConfigError(f"env_id: unknown env {config.env_id!r} ({err})") from None
        try:
            envs.make_population(config.env_id, config.groups)
        except ValueError as err:
            raise ConfigError(f"groups: {err}") from None
        try:
            make_aggregation(config.train.aggregation, **config.train.aggregation_kwargs)
        except ValueError as err:
            raise ConfigError(f"train.aggregation: {err}") from None
        if config.reward.n_members is not None and config.reward.n_members > config.collect.n_users:
            raise ConfigError(f"reward.n_members: K={config.reward.n_members} is more than the {config.collect.n_users} users")

    # ------------------------------------------------------------------ paths
    def seed_dir(self, seed: int) -> Path:
        return self.out_dir / f"seed_{seed}"

    def _threads(self) -> None:
        torch.set_num_threads(self.config.train.torch_threads)

    # ---------------------------------------------------------------- collect
    def collect(self, seed: int) -> PreferenceDataset:
        """Simulated users compare segments of random behaviour."""
        path = self.seed_dir(seed) / "preferences.npz"
        if path.exists():
            return PreferenceDataset.load(path)
        cfg = self.config.collect
        self.log(f"[seed {seed}] collecting {cfg.n_users} users x {cfg.comparisons_per_user} comparisons")
        env = gym.make(self.config.env_id, **{**self.config.env_kwargs, **cfg.env_kwargs})
        data = collect_preferences(
            env,
            self.population,
            cfg.n_users,
            cfg.comparisons_per_user,
            cfg.segment_length,
            seed=seed,
            progress_bar=self.progress_bar,
        )
        data.save(path)
        return data

    # -------------------------------------------------------------------- fit
    def fit(self, seed: int) -> tuple[RewardMixture, EMRewardMixture]:
        """The single BT reward (standard RLHF) and the EM mixture of K rewards."""
        folder = self.seed_dir(seed) / "rewards"
        bt_path, em_dir = folder / "bradley_terry.safetensors", folder / "em"
        wanted_k = self.config.reward.n_members
        if bt_path.exists() and (folder / "fit_metrics.json").exists():
            em = EMRewardMixture.load(em_dir)
            if wanted_k is not None and em.reward.n_members != wanted_k:
                raise ConfigError(
                    f"reward.n_members: the saved mixture in {em_dir} has K={em.reward.n_members} but the config asks for "
                    f"K={wanted_k}; delete {folder} to refit or fix the config"
                )
            return RewardMixture.load(bt_path), em
        self._threads()
        data = self.collect(seed)
        cfg = self.config.reward
        net = {"hidden_sizes": tuple(cfg.hidden_sizes), "use_action": cfg.use_action, "use_next_state": cfg.use_next_state}
        self.log(f"[seed {seed}] fitting the single Bradley-Terry reward and the EM mixture")
        train, heldout = data.split_by_comparison(0.2, seed=seed)
        bt = fit_bradley_terry(train, epochs=cfg.epochs, seed=seed, **net).reward
        if wanted_k is None:
            wanted_k = select_k(train, cfg.k_range, seed=seed, **net).k
            self.log(f"[seed {seed}] chose K={wanted_k} from {cfg.k_range}")
        # EM's per-iteration likelihood, shares, ARI and purity go next to the training curves.
        em_logger = configure_logger(str(self.out_dir / "tensorboard" / f"seed_{seed}" / "em"), ["tensorboard"])
        em = EMRewardMixture(wanted_k, seed=seed, progress_bar=self.progress_bar, logger=em_logger, **net).fit(train)
        em_logger.close()
        true_groups = data.user_groups[data.positions_of(em.users_)]
        fit_metrics = {
            "k": wanted_k,
            "shares": em.shares_.tolist(),
            "bt_heldout_accuracy": preference_accuracy(bt, heldout).as_dict(),
            "em_heldout_accuracy": em.accuracy(heldout).as_dict(),
            "adjusted_rand_index": adjusted_rand_index(true_groups, em.assignments_),
            "purity": purity(true_groups, em.assignments_),
        }
        folder.mkdir(parents=True, exist_ok=True)
        bt.save(bt_path)
        em.save(em_dir)
        save_json_atomic(fit_metrics, folder / "fit_metrics.json")
        return bt, em

    def member_names(self, data: PreferenceDataset, em: EMRewardMixture) -> list[str]:
        """Name each mixture member after the true group most of its users belong to."""
        true_groups = data.user_groups[data.positions_of(em.users_)]
        names = []
        for member in range(em.reward.n_members):
            groups = true_groups[em.assignments_ == member]
            base = self.group_names[np.bincount(groups, minlength=len(self.group_names)).argmax()] if groups.size else "empty"
            names.append(f"m{member}_{base}")
        return names

    # ------------------------------------------------------------------ train
    def make_vec_env(self, seed: int) -> VecEnv:
        """Training envs, each reporting the true group rewards (for curves only)."""
        env_id, env_kwargs, population = self.config.env_id, dict(self.config.env_kwargs), self.population

        def make() -> gym.Env:
            return MultiUserPreferenceWrapper(gym.make(env_id, **env_kwargs), population)

        vec_cls = SubprocVecEnv if self.config.train.vec_env == "subproc" else DummyVecEnv
        return make_vec_env(make, n_envs=self.config.train.n_envs, seed=seed, vec_env_cls=vec_cls)

    def train(self, seed: int, method: str) -> Path:
        """Train one method's policy; the same PPO settings for all."""
        path = self.seed_dir(seed) / "policies" / f"{method}.zip"
        if path.exists():
            return path
        self._threads()
        bt, em = self.fit(seed)
        data = self.collect(seed)
        # Every step of every compared segment: the reference distribution for normalising rewards.
        steps = concatenate_transitions([data.segments_a.flatten_steps(), data.segments_b.flatten_steps()])
        venv = self.make_vec_env(seed)
        ppo_kwargs = {
            "seed": seed,
            "device": "cpu",
            "verbose": 0,
            "tensorboard_log": str(self.out_dir / "tensorboard" / f"seed_{seed}"),
            **self.config.train.ppo,
        }
        # Every reward is z-scored with statistics of the preference data's segments
        # (the random behaviour's distribution): a fixed affine map per group, so the
        # critic chases a stationary target and groups are compared on one scale.
        if method == "rlhf":
            normalizer = GroupRewardNormalizer.from_data(bt.predict_rewards(steps.obs, steps.acts, steps.next_obs))
            env = GroupRewardVecEnv(venv, learned_rewards(bt), make_aggregation("mean"), 1, normalizer, ["rlhf"])
            model = PPO("MlpPolicy", env, **ppo_kwargs)
        elif method.startswith("oracle_"):
            index = self.group_names.index(method.removeprefix("oracle_"))
            normalizer = GroupRewardNormalizer.from_data(self.population.group_rewards(steps)[:, [index]])
            env = GroupRewardVecEnv(venv, true_rewards([index]), make_aggregation("mean"), 1, normalizer, [self.group_names[index]])
            model = PPO("MlpPolicy", env, **ppo_kwargs)
        else:
            rule = self.config.train.aggregation if method == "maxmin" else "mean"
            rule_kwargs = self.config.train.aggregation_kwargs if method == "maxmin" else {}
            normalizer = GroupRewardNormalizer.from_data(em.reward.predict_rewards(steps.obs, steps.acts, steps.next_obs))
            model = MaxMinPPO(
                "MlpPolicy",
                venv,
                reward_mixture=em.reward,
                aggregation=rule,
                aggregation_kwargs=rule_kwargs,
                normalizer=normalizer,
                group_names=self.member_names(data, em),
                group_critics=self.config.train.group_critics and make_aggregation(rule, **rule_kwargs).is_linear,
                **ppo_kwargs,
            )
        self.log(f"[seed {seed}] training {method} for {self.config.train.total_timesteps} steps")
        callback = GroupReturnCallback(self.group_names)
        model.learn(self.config.train.total_timesteps, callback=callback, progress_bar=self.progress_bar, tb_log_name=method)
        venv.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        curve_steps, curve_returns = callback.curve
        np.savez(path.with_suffix(".curve.npz"), steps=curve_steps, returns=curve_returns)
        return path

    # --------------------------------------------------------------- evaluate
    def evaluate(self, seed: int, method: str) -> np.ndarray:
        """``(n_episodes, K)`` true group returns of one trained policy."""
        path = self.seed_dir(seed) / "returns" / f"{method}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
        self._threads()
        policy_path = self.train(seed, method)
        algorithm = MaxMinPPO if method in ("maxmin", "mean") else PPO
        model = algorithm.load(policy_path, device="cpu")
        env = MultiUserPreferenceWrapper(gym.make(self.config.env_id, **self.config.env_kwargs), self.population)
        cfg = self.config.evaluate
        returns = evaluate_group_returns(model, env, cfg.n_episodes, seed=100_000 + seed, deterministic=cfg.deterministic)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, returns, allow_pickle=False)
        return returns

    # ----------------------------------------------------------------- report
    def report(self) -> Path:
        """Pool every seed's evaluation into ``metrics.json``, plots and ``report.md``."""
        seeds = self.config.seeds
        returns = {method: [self.evaluate(seed, method) for seed in seeds] for method in self.methods}
        unwrapped = gym.make(self.config.env_id, **self.config.env_kwargs).unwrapped
        fit = [json.loads((self.seed_dir(s) / "rewards" / "fit_metrics.json").read_text()) for s in seeds]
        extra = {"reward_fit": {f"seed_{s}": f for s, f in zip(seeds, fit)}}
        metrics = build_metrics(
            returns,
            self.group_names,
            baseline="rlhf",
            min_episode_return=getattr(unwrapped, "min_episode_return", None),
            extra=extra,
        )
        return write_report(
            metrics,
            self.out_dir,
            curves=self._curves(),
            config=self.config.to_dict(),
            method="maxmin" if "maxmin" in self.methods else None,
            group_shares=self.config.groups,
            title=f"MaxMin-RLHF on {self.config.env_id}: {self.config.name}",
        )

    def _curves(self) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """method -> group -> (steps, (n_seeds, n_points) true returns), seeds interpolated onto the first's steps."""
        curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for method in self.methods:
            loaded = []
            for seed in self.config.seeds:
                with np.load(self.seed_dir(seed) / "policies" / f"{method}.curve.npz") as f:
                    loaded.append((f["steps"], f["returns"]))
            steps = loaded[0][0]
            if steps.size == 0:
                continue
            curves[method] = {
                name: (steps, np.stack([np.interp(steps, s, r[:, k]) for s, r in loaded])) for k, name in enumerate(self.group_names)
            }
        return curves

    def run(self) -> tuple[Path, dict[str, Any]]:
        """Every stage for every seed, then the report. Returns the report's path and the metrics."""
        for seed in self.config.seeds:
            for method in self.methods:
                self.evaluate(seed, method)
        report = self.report()
        metrics = json.loads((self.out_dir / "metrics.json").read_text())
        self.log("\n" + format_group_table(metrics))
        return report, metrics
