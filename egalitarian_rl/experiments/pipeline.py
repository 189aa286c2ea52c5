"""The pipeline: collect -> fit -> train -> evaluate -> report.

Each stage saves its artefacts under ``out_dir/seed_<s>/`` together with a
record (``stages/<stage>.json``) of the settings it was computed from: a hash
of the config parts it depends on and the run id of the stage it read. A stage
whose artefacts exist and whose record matches is skipped, so an interrupted
run resumes where it stopped and a changed report costs no retraining; a
changed setting redoes that stage and, through the run ids, every later one.
``force`` (``--force STAGE`` on the command line) redoes a stage anyway.

Methods, all trained with the same PPO settings and budget:

- ``rlhf``: SB3 PPO on the single Bradley-Terry reward (standard RLHF);
- ``maxmin``: :class:`MaxMinPPO` on the EM mixture with the configured rule (per_sample_min by default);
- ``mean``: :class:`MaxMinPPO` with the utilitarian mean of the mixture, members weighted by their EM shares;
- ``uniform_mean``: :class:`MaxMinPPO` with the members weighted equally;
- ``oracle_<group>``: SB3 PPO on that group's *true* reward (a reference, not RLHF);
- ``online``: :class:`MaxMinPPO` trained by the online preference loop (``online:`` section,
  :func:`~egalitarian_rl.labelling.online.run_online`): rounds of segments from the current policy,
  simulated users' answers, an EM refit and more training; it collects its own comparisons
  instead of reading ``collect``'s, and its per-round records go to ``online_rounds.json``.

Every policy is then judged by every group's true return, and, when the
oracles were trained, by a normalised score (0 = a random policy, 1 = the
group's oracle) that puts all groups on one scale.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import uuid
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure as configure_logger
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecNormalize, unwrap_vec_normalize

from egalitarian_rl import envs
from egalitarian_rl.algorithms.aggregation import GroupRewardNormalizer, Mean, make_aggregation
from egalitarian_rl.algorithms.maxmin_ppo import MaxMinPPO
from egalitarian_rl.evaluation import add_normalized_scores, build_metrics, evaluate_group_returns, format_group_table, write_report
from egalitarian_rl.evaluation.callbacks import GroupReturnCallback
from egalitarian_rl.experiments.config import NOISE_SETTINGS, ConfigError, ExperimentConfig
from egalitarian_rl.io import save_json_atomic, to_jsonable, write_atomic, write_text_atomic
from egalitarian_rl.labelling.online import maxmin_agent_factory, run_online
from egalitarian_rl.preferences import MultiUserPreferenceWrapper, PreferenceDataset, collect_preferences
from egalitarian_rl.preferences.population import GroupRewardLibrary, Population, UserGroup
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
from egalitarian_rl.rewards.nets import spaces_from_dataset
from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv, check_reward_spaces, learned_rewards, true_rewards

#: The stages in order; forcing one redoes it and, through the run ids, every later one.
STAGES = ("collect", "fit", "train", "evaluate")
#: MaxMinPPO methods: the configured rule, the share-weighted mean and the uniform mean.
MIXTURE_METHODS = ("maxmin", "mean", "uniform_mean")
#: Per-round records of the online method (:class:`~egalitarian_rl.labelling.online.RoundRecord`), per seed.
ONLINE_ROUNDS_FILE = "online_rounds.json"
#: Suffix of a policy's observation statistics (``train.normalize_obs``): ``policies/<method>.obs_norm.npz``.
OBS_NORM_SUFFIX = ".obs_norm.npz"


def import_attribute(spec: str, key: str) -> Any:
    """``"module:attribute"`` -> the attribute, or a :class:`ConfigError` naming ``key``."""
    module_name, attribute = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({err})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attribute!r}") from None


def build_population(config: ExperimentConfig) -> Population:
    """The simulated users of ``config``: each group's true reward, share and answer noise.

    A group's reward is its ``reward`` (``"module:function"``) if given, else the
    group of that name in ``groups_from`` (a :class:`GroupRewardLibrary` in user
    code) or in the package's library for ``env_id``. Answer noise is
    ``collect``'s, overridden per group.
    """
    library: GroupRewardLibrary | None = None
    if config.groups_from is not None:
        library = import_attribute(config.groups_from, "groups_from")
        if not isinstance(library, GroupRewardLibrary):
            raise ConfigError(f"groups_from: {config.groups_from} is a {type(library).__name__}, not a GroupRewardLibrary")
    elif any(group.reward is None for group in config.groups.values()):
        try:
            library = envs.group_library(config.env_id)
        except ValueError as err:
            raise ConfigError(f"groups: {err}; give groups_from or a reward per group") from None
    groups = []
    for name, spec in config.groups.items():
        if spec.reward is not None:
            reward_fn = import_attribute(spec.reward, f"groups.{name}.reward")
            if not callable(reward_fn):
                raise ConfigError(f"groups.{name}.reward: {spec.reward} is not callable")
        elif library is not None and name in library.rewards:
            reward_fn = library.rewards[name]
        else:
            offered = sorted(library.rewards) if library is not None else []
            raise ConfigError(f"groups: unknown group {[name]}; the library offers {offered}")
        answering = config.collect.answering()
        answering.update({key: getattr(spec, key) for key in NOISE_SETTINGS if getattr(spec, key) is not None})
        try:
            groups.append(UserGroup(name, reward_fn, spec.share, **answering))
        except ValueError as err:
            raise ConfigError(f"groups.{name}: {err}") from None
    info_keys = (*(library.info_keys if library is not None else ()), *config.info_keys)
    return Population(groups, tuple(dict.fromkeys(info_keys)))


def _fingerprint(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RandomPolicy:
    """Uniformly random actions with a ``predict`` like SB3's: the 0 of the normalised scores."""

    def __init__(self, action_space: gym.Space, seed: int) -> None:
        self.action_space = action_space
        self.action_space.seed(seed)

    def predict(self, observation: Any, *, deterministic: bool = False) -> tuple[Any, None]:
        return self.action_space.sample(), None


class ObservationStatisticsError(ValueError):
    """A policy's saved observation statistics cannot be read or do not fit its env."""


class ObservationNormalization:
    """Frozen ``VecNormalize`` observation statistics, saved without pickle.

    SB3 pickles a whole ``VecNormalize`` (env included) to keep its statistics; this
    keeps only the numbers, in an ``.npz`` read with ``allow_pickle=False``:
    ``mean`` and ``var`` of shape ``obs_shape`` (float64), ``count``, ``clip_obs`` and ``epsilon``.

    :param obs_rms: the running mean, variance and count of the observations.
    :param clip_obs: normalised observations are clipped to ``[-clip_obs, clip_obs]``.
    :param epsilon: added to the variance before the square root.
    """

    def __init__(self, obs_rms: RunningMeanStd, clip_obs: float = 10.0, epsilon: float = 1e-8) -> None:
        self.obs_rms = obs_rms
        self.clip_obs = float(clip_obs)
        self.epsilon = float(epsilon)

    @classmethod
    def from_vec_normalize(cls, venv: VecNormalize) -> ObservationNormalization:
        """A copy of ``venv``'s current observation statistics (later updates of ``venv`` do not change it)."""
        if not isinstance(venv.obs_rms, RunningMeanStd):
            raise TypeError("only Box observations (one RunningMeanStd) are supported, not dict observations")
        rms = RunningMeanStd(shape=venv.obs_rms.mean.shape)
        rms.mean, rms.var, rms.count = venv.obs_rms.mean.copy(), venv.obs_rms.var.copy(), float(venv.obs_rms.count)
        return cls(rms, venv.clip_obs, venv.epsilon)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """``obs`` of shape ``obs_shape`` or ``(n, *obs_shape)`` normalised exactly as ``VecNormalize.normalize_obs`` does."""
        return np.clip((obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + self.epsilon), -self.clip_obs, self.clip_obs).astype(
            np.float32
        )

    def save(self, path: str | Path) -> None:
        """Write the statistics to ``path`` (an ``.npz``) atomically."""
        rms = self.obs_rms
        arrays = {"mean": rms.mean, "var": rms.var, "count": rms.count, "clip_obs": self.clip_obs, "epsilon": self.epsilon}
        write_atomic(Path(path), lambda handle: np.savez(handle, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}))

    @classmethod
    def load(cls, path: str | Path, obs_shape: tuple[int, ...] | None = None) -> ObservationNormalization:
        """Read statistics written by :meth:`save`.

        :param obs_shape: the env's observation shape, checked against the saved ``mean``.
        :raises ObservationStatisticsError: a missing, unreadable or inconsistent file, in one message.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                mean, var = f["mean"], f["var"]
                count, clip_obs, epsilon = (float(f[key]) for key in ("count", "clip_obs", "epsilon"))
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            raise ObservationStatisticsError(
                f"{path}: not a readable observation-statistics file ({type(err).__name__}: {err}); retrain with --force train"
            ) from None
        problems = []
        if mean.shape != var.shape:
            problems.append(f"mean has shape {mean.shape} but var {var.shape}")
        if obs_shape is not None and mean.shape != tuple(obs_shape):
            problems.append(f"statistics of shape {mean.shape} for observations of shape {tuple(obs_shape)}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)):
            problems.append("non-finite mean or negative/non-finite variance")
        if not (count > 0 and clip_obs > 0 and epsilon >= 0):
            problems.append(f"count {count}, clip_obs {clip_obs}, epsilon {epsilon} out of range")
        if problems:
            raise ObservationStatisticsError(f"{path}: invalid observation statistics: {'; '.join(problems)}; retrain with --force train")
        rms = RunningMeanStd(shape=mean.shape)
        rms.mean, rms.var, rms.count = mean, var, count
        return cls(rms, clip_obs, epsilon)


class ObsNormalizedPolicy:
    """A trained policy that sees its observations normalised by frozen training statistics.

    The env stays raw (the groups' true rewards and any reward model read raw
    observations); only what reaches ``model.predict`` is normalised.

    :param model: anything with an SB3-style ``predict``.
    :param statistics: the statistics the policy was trained with.
    """

    def __init__(self, model: Any, statistics: ObservationNormalization) -> None:
        self.model = model
        self.statistics = statistics

    def predict(self, observation: Any, *, deterministic: bool = False) -> tuple[Any, Any]:
        return self.model.predict(self.statistics.normalize(np.asarray(observation)), deterministic=deterministic)


class Pipeline:
    """Runs one :class:`ExperimentConfig`.

    :param config: the experiment.
    :param progress_bar: show progress bars for collection and training.
    :param log: where progress messages go.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        progress_bar: bool = True,
        log: Callable[[str], None] = print,
        force: Iterable[str] = (),
    ) -> None:
        self.config = config
        self.progress_bar = progress_bar
        self.log = log
        self.out_dir = Path(config.out_dir)
        self.force = set(force)
        unknown = sorted(self.force - set(STAGES))
        if unknown:
            raise ConfigError(f"--force: unknown stage {unknown}; stages are {list(STAGES)}")
        self._validate()
        self.population = build_population(config)
        self.group_names = list(self.population.group_names)
        self.methods = [m for m in config.methods if m != "oracle"]
        if "oracle" in config.methods:
            self.methods += [f"oracle_{name}" for name in self.group_names]
        # Stages checked (or redone) in this run: a forced stage is redone once, not at every call.
        self._checked: dict[tuple[str, int, str], str] = {}
        # Every later stage reads the preferences: load and check each seed's file once per run.
        self._datasets: dict[int, PreferenceDataset] = {}

    def _validate(self) -> None:
        """Fail before any work on what the config gets wrong (the rest is checked when it is built)."""
        config = self.config
        try:
            gym.spec(config.env_id)
        except (gym.error.Error, ModuleNotFoundError) as err:
            raise ConfigError(f"env_id: unknown env {config.env_id!r} ({err})") from None
        build_population(config)
        try:
            make_aggregation(config.train.aggregation, **config.train.aggregation_kwargs)
        except ValueError as err:
            raise ConfigError(f"train.aggregation: {err}") from None

    # ------------------------------------------------------------------ stage records
    def _stage_inputs(self, stage: str, seed: int, method: str = "") -> dict[str, Any]:
        """The config parts a stage depends on, plus the run id of the stage it reads."""
        config = self.config.to_dict()
        if not config["train"]["normalize_obs"]:
            # A setting added later: off, it leaves the stage keys of earlier runs unchanged.
            del config["train"]["normalize_obs"]
        users = {key: config[key] for key in ("env_id", "groups", "groups_from", "info_keys")}
        if stage == "collect":
            return {**users, "env_kwargs": config["env_kwargs"], "collect": config["collect"], "seed": seed}
        if stage == "fit":
            reward = {key: value for key, value in config["reward"].items() if key != "min_confidence"}  # read by assign only
            return {"reward": reward, "collect_run": self._stage_run("collect", seed)}
        if stage == "train" and method == "online":
            # It collects and fits on its own: the users, answer noise, reward nets and PPO settings,
            # not collect's or fit's artefacts; its budget is the online section's, not total_timesteps.
            train = {key: value for key, value in config["train"].items() if key != "total_timesteps"}
            reward = {key: value for key, value in config["reward"].items() if key != "min_confidence"}
            online = {"online": config["online"], "collect": config["collect"], "reward": reward, "train": train}
            return {**users, **online, "env_kwargs": config["env_kwargs"], "method": method, "seed": seed}
        if stage == "train":
            upstream = "collect" if method.startswith("oracle_") else "fit"  # oracles use true rewards
            train = dict(config["train"])
            if method != "maxmin":
                # Only MaxMin reads the rule; rlhf, mean and the oracles stay valid when it changes.
                for key in ("aggregation", "aggregation_kwargs"):
                    del train[key]
            if method == "rlhf" or method.startswith("oracle_"):
                del train["group_critics"]  # one scalar reward: no group critics to build
            return {
                "train": train,
                "env_kwargs": config["env_kwargs"],
                "method": method,
                f"{upstream}_run": self._stage_run(upstream, seed),
            }
        if stage == "evaluate":
            anchor = {"policy_run": self._stage_run("train", seed, method)} if method != "random" else {**users, "seed": seed}
            return {"evaluate": config["evaluate"], "env_kwargs": config["env_kwargs"], **anchor}
        raise ValueError(f"unknown stage {stage!r}")

    def _record_path(self, stage: str, seed: int, method: str = "") -> Path:
        return self.seed_dir(seed) / "stages" / (f"{stage}_{method}.json" if method else f"{stage}.json")

    def _stage_run(self, stage: str, seed: int, method: str = "") -> str:
        """Run id of a stage's artefacts, bringing the stage up to date first."""
        runner = {"collect": self.collect, "fit": self.fit}.get(stage)
        if runner is not None:
            runner(seed)
        elif stage == "train":
            self.train(seed, method)
        return json.loads(self._record_path(stage, seed, method).read_text())["run_id"]

    def _up_to_date(self, stage: str, seed: int, artefacts: Iterable[Path], method: str = "") -> bool:
        """Whether a stage's saved artefacts were computed from the current settings (and not forced)."""
        done = (stage, seed, method)
        if done in self._checked:
            return True
        key = _fingerprint(self._stage_inputs(stage, seed, method))
        record_path = self._record_path(stage, seed, method)
        if stage in self.force and not (method == "random" and stage == "evaluate"):
            self.log(f"[seed {seed}] {stage} {method}: forced, redoing".replace("  ", " "))
            return False
        if not all(path.exists() for path in artefacts):
            return False
        if not record_path.exists() or json.loads(record_path.read_text()).get("key") != key:
            self.log(f"[seed {seed}] {stage} {method}: settings changed since it was saved, redoing".replace("  ", " "))
            return False
        self._checked[done] = key
        return True

    def _record(self, stage: str, seed: int, method: str = "") -> None:
        """Write the stage's record after its artefacts: a crash in between redoes the stage."""
        inputs = self._stage_inputs(stage, seed, method)
        key = _fingerprint(inputs)
        save_json_atomic({"key": key, "run_id": uuid.uuid4().hex, "inputs": inputs}, self._record_path(stage, seed, method))
        self._checked[(stage, seed, method)] = key

    # ------------------------------------------------------------------ paths
    def seed_dir(self, seed: int) -> Path:
        return self.out_dir / f"seed_{seed}"

    def _threads(self) -> None:
        torch.set_num_threads(self.config.train.torch_threads)

    # ---------------------------------------------------------------- collect
    def collect(self, seed: int) -> PreferenceDataset:
        """Simulated users compare segments of random behaviour."""
        path = self.seed_dir(seed) / "preferences.npz"
        if self._up_to_date("collect", seed, [path]):
            if seed not in self._datasets:
                self._datasets[seed] = self._check_dataset(PreferenceDataset.load(path), path)
            return self._datasets[seed]
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
        self._record("collect", seed)
        self._datasets[seed] = data
        return data

    def _check_dataset(self, data: PreferenceDataset, path: Path) -> PreferenceDataset:
        """Refuse preferences recorded in another env or with other groups than the config's."""
        env_id = data.metadata.get("env_id")
        if env_id is not None and env_id != self.config.env_id.split(":")[-1]:  # "module:Id" makes an env with spec id "Id"
            raise ConfigError(f"{path}: the preferences were collected in {env_id!r}, not in env_id {self.config.env_id!r}")
        if data.group_names and list(data.group_names) != self.group_names:
            raise ConfigError(f"{path}: the preferences come from groups {list(data.group_names)}, not {self.group_names}")
        env = gym.make(self.config.env_id, **self.config.env_kwargs)
        expected = env.observation_space.shape
        recorded = data.segments_a.obs.shape[2:]
        if expected is not None and tuple(recorded) != tuple(expected):
            raise ConfigError(f"{path}: segments hold observations of shape {tuple(recorded)}, the env's are {tuple(expected)}")
        return data

    # -------------------------------------------------------------------- fit
    def fit(self, seed: int) -> tuple[RewardMixture, EMRewardMixture]:
        """The single BT reward (standard RLHF) and the EM mixture of K rewards."""
        folder = self.seed_dir(seed) / "rewards"
        bt_path, em_dir, metrics_path = folder / "bradley_terry.safetensors", folder / "em", folder / "fit_metrics.json"
        data = self.collect(seed)
        if self._up_to_date("fit", seed, [bt_path, em_dir, metrics_path]):
            return RewardMixture.load(bt_path), EMRewardMixture.load(em_dir)
        self._threads()
        cfg, net = self.config.reward, self._reward_net()
        self.log(f"[seed {seed}] fitting the single Bradley-Terry reward and the EM mixture")
        # Held-out comparisons use segments the fits never saw (see PreferenceDataset.split_by_comparison).
        train, heldout = data.split_by_comparison(cfg.heldout_fraction, seed=seed)
        bt = fit_bradley_terry(train, epochs=cfg.epochs, seed=seed, **net).reward
        wanted_k = cfg.n_members
        if wanted_k is None:
            wanted_k = select_k(train, cfg.k_range, seed=seed, **net).k
            self.log(f"[seed {seed}] chose K={wanted_k} from {cfg.k_range}")
        # EM's per-iteration likelihood, shares, ARI and purity go next to the training curves.
        em_logger = configure_logger(str(self.out_dir / "tensorboard" / f"seed_{seed}" / "em"), ["tensorboard"])
        em = EMRewardMixture(wanted_k, seed=seed, progress_bar=self.progress_bar, logger=em_logger, **net, **cfg.em).fit(train)
        em_logger.close()
        true_groups = data.user_groups[data.positions_of(em.users_)]
        fit_metrics = {
            "k": wanted_k,
            "shares": em.shares_.tolist(),
            "bt_heldout_accuracy": preference_accuracy(bt, heldout).as_dict(),
            "em_heldout_accuracy": em.accuracy(heldout).as_dict(),
            "adjusted_rand_index": adjusted_rand_index(true_groups, em.assignments_),
            "purity": purity(true_groups, em.assignments_),
            "n_train_comparisons": len(train),
            "n_heldout_comparisons": len(heldout),
        }
        folder.mkdir(parents=True, exist_ok=True)
        bt.save(bt_path)
        em.save(em_dir)
        save_json_atomic(to_jsonable(fit_metrics), metrics_path)  # NaN (a group with no held-out answer) -> null
        self._record("fit", seed)
        return bt, em

    def _reward_net(self) -> dict[str, Any]:
        """The reward networks' shape, shared by every fit."""
        cfg = self.config.reward
        return {"hidden_sizes": tuple(cfg.hidden_sizes), "use_action": cfg.use_action, "use_next_state": cfg.use_next_state}

    def member_names(self, data: PreferenceDataset, em: EMRewardMixture) -> list[str]:
        """Name each mixture member after the true group most of its users belong to."""
        true_groups = data.user_groups[data.positions_of(em.users_)]
        names = []
        for member in range(em.reward.n_members):
            groups = true_groups[em.assignments_ == member]
            base = self.group_names[np.bincount(groups, minlength=len(self.group_names)).argmax()] if groups.size else "empty"
            names.append(f"m{member}_{base}")
        return names

    def assign(self, seed: int, answers: PreferenceDataset) -> list[dict[str, Any]]:
        """Put each user of ``answers`` (new users' comparisons) in a group of the fitted mixture, or refuse.

        A user is personalised only when the posterior of their most likely member
        is at least ``reward.min_confidence``; below it ``member`` is ``None``: serve
        the MaxMin policy, which protects every group, rather than guess.

        :return: per user ``{user, member, best_member, confidence, posterior, n_comparisons}``
            with members named as in the run (``m<k>_<majority true group of its users>``).
        """
        _, em = self.fit(seed)
        data = self.collect(seed)
        check_reward_spaces(em.reward, *spaces_from_dataset(answers))
        names = self.member_names(data, em)
        decisions = []
        for user in np.unique(answers.user_ids):
            assignment = em.assign_with_confidence(answers.for_users(np.array([user])), min_confidence=self.config.reward.min_confidence)
            decisions.append(
                {
                    "user": int(user),
                    "member": None if assignment.member is None else names[assignment.member],
                    "best_member": names[assignment.best_member],
                    "confidence": assignment.confidence,
                    "posterior": dict(zip(names, assignment.posterior.tolist())),
                    "n_comparisons": assignment.n_comparisons,
                }
            )
        return decisions

    # ------------------------------------------------------------------ train
    def make_vec_env(self, seed: int) -> VecEnv:
        """Training envs, each reporting the true group rewards (for curves only)."""
        env_id, env_kwargs, population = self.config.env_id, dict(self.config.env_kwargs), self.population

        def make() -> gym.Env:
            return MultiUserPreferenceWrapper(gym.make(env_id, **env_kwargs), population)

        vec_cls = SubprocVecEnv if self.config.train.vec_env == "subproc" else DummyVecEnv
        return make_vec_env(make, n_envs=self.config.train.n_envs, seed=seed, vec_env_cls=vec_cls)

    def _ppo_kwargs(self, seed: int) -> dict[str, Any]:
        """PPO keywords shared by every method."""
        tensorboard = str(self.out_dir / "tensorboard" / f"seed_{seed}")
        return {"seed": seed, "device": "cpu", "verbose": 0, "tensorboard_log": tensorboard, **self.config.train.ppo}

    def _maxmin_rule(self) -> Any:
        """The configured MaxMin aggregation."""
        return make_aggregation(self.config.train.aggregation, **self.config.train.aggregation_kwargs)

    def online_rounds_path(self, seed: int) -> Path:
        return self.seed_dir(seed) / ONLINE_ROUNDS_FILE

    def obs_norm_path(self, seed: int, method: str) -> Path:
        """Where a policy's observation statistics go (``train.normalize_obs``)."""
        return self.seed_dir(seed) / "policies" / f"{method}{OBS_NORM_SUFFIX}"

    def train(self, seed: int, method: str) -> Path:
        """Train one method's policy; the same PPO settings for all."""
        path = self.seed_dir(seed) / "policies" / f"{method}.zip"
        curve_path = path.with_suffix(".curve.npz")
        artefacts = [path, curve_path, *([self.online_rounds_path(seed)] if method == "online" else [])]
        if self.config.train.normalize_obs:
            artefacts.append(self.obs_norm_path(seed, method))
        if self._up_to_date("train", seed, artefacts, method):
            return path
        self._threads()
        model, (curve_steps, curve_returns) = self._train_online(seed) if method == "online" else self._train_offline(seed, method)
        # Temporary file + rename: a crash never leaves a half-written policy that looks finished.
        write_atomic(path, model.save)
        write_atomic(curve_path, lambda handle: np.savez(handle, steps=curve_steps, returns=curve_returns))
        normalize = unwrap_vec_normalize(model.get_env())
        if normalize is not None:
            ObservationNormalization.from_vec_normalize(normalize).save(self.obs_norm_path(seed, method))
        self._record("train", seed, method)
        return path

    def _normalize_obs(self, venv: VecEnv) -> VecEnv:
        """``venv`` inside ``VecNormalize`` (observations only) if ``train.normalize_obs``, else ``venv``.

        Rewards are already put on one scale by each method's :class:`GroupRewardNormalizer`.
        Every reward relabelling (:class:`GroupRewardVecEnv`) sits beneath it, so the reward
        models and true rewards read raw observations and only the policy sees normalised ones.
        """
        if not self.config.train.normalize_obs:
            return venv
        return VecNormalize(venv, norm_obs=True, norm_reward=False, gamma=self.config.train.ppo.get("gamma", 0.99))

    def load_policy(self, seed: int, method: str) -> Any:
        """A trained policy ready for ``predict`` on raw observations (with its frozen statistics if ``train.normalize_obs``)."""
        policy_path = self.train(seed, method)
        algorithm = MaxMinPPO if method in (*MIXTURE_METHODS, "online") else PPO
        model = algorithm.load(policy_path, device="cpu")
        if not self.config.train.normalize_obs:
            return model
        statistics = ObservationNormalization.load(self.obs_norm_path(seed, method), model.observation_space.shape)
        return ObsNormalizedPolicy(model, statistics)

    def _train_offline(self, seed: int, method: str) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
        """One method's policy on collect's comparisons; returns it and its learning curve (see :class:`GroupReturnCallback`)."""
        data = self.collect(seed)
        # Every step of every compared segment: the reference distribution for normalising rewards.
        steps = concatenate_transitions([data.segments_a.flatten_steps(), data.segments_b.flatten_steps()])
        venv = self.make_vec_env(seed)
        ppo_kwargs = self._ppo_kwargs(seed)
        # Every reward is z-scored with statistics of the preference data's segments
        # (the random behaviour's distribution): a fixed affine map per group, so the
        # critic chases a stationary target and groups are compared on one scale.
        if method.startswith("oracle_"):
            index = self.group_names.index(method.removeprefix("oracle_"))
            normalizer = GroupRewardNormalizer.from_data(self.population.group_rewards(steps)[:, [index]])
            env = GroupRewardVecEnv(venv, true_rewards([index]), make_aggregation("mean"), 1, normalizer, [self.group_names[index]])
            model = PPO("MlpPolicy", self._normalize_obs(env), **ppo_kwargs)
        elif method == "rlhf":
            bt, _ = self.fit(seed)
            check_reward_spaces(bt, venv.observation_space, venv.action_space)
            normalizer = GroupRewardNormalizer.from_data(bt.predict_rewards(steps.obs, steps.acts, steps.next_obs))
            env = GroupRewardVecEnv(venv, learned_rewards(bt), make_aggregation("mean"), 1, normalizer, ["rlhf"])
            model = PPO("MlpPolicy", self._normalize_obs(env), **ppo_kwargs)
        else:
            _, em = self.fit(seed)
            rule: Any = {
                "maxmin": self._maxmin_rule(),
                "mean": Mean(weights=em.shares_),  # utilitarian: every user counts once
                "uniform_mean": Mean(),
            }[method]
            normalizer = GroupRewardNormalizer.from_data(em.reward.predict_rewards(steps.obs, steps.acts, steps.next_obs))
            model = MaxMinPPO(
                "MlpPolicy",
                self._normalize_obs(venv),  # MaxMinPPO puts its relabelling beneath a VecNormalize
                reward_mixture=em,
                aggregation=rule,
                normalizer=normalizer,
                group_names=self.member_names(data, em),
                group_critics=self.config.train.group_critics and rule.is_linear,
                **ppo_kwargs,
            )
        self.log(f"[seed {seed}] training {method} for {self.config.train.total_timesteps} steps")
        callback = GroupReturnCallback(self.group_names)
        model.learn(self.config.train.total_timesteps, callback=callback, progress_bar=self.progress_bar, tb_log_name=method)
        venv.close()
        return model, callback.curve

    def _train_online(self, seed: int) -> tuple[MaxMinPPO, tuple[np.ndarray, np.ndarray]]:
        """MaxMinPPO trained by the online loop; writes its per-round records, returns it and its learning curve.

        Each round is judged like the finished policies (``evaluate``'s episodes, every group's true return).
        """
        config, online = self.config, self.config.online
        assert online is not None  # the config refuses the method 'online' without its section
        callbacks: list[GroupReturnCallback] = []

        def make_callback() -> GroupReturnCallback:
            callbacks.append(GroupReturnCallback(self.group_names))
            return callbacks[-1]

        eval_env = MultiUserPreferenceWrapper(gym.make(config.env_id, **config.env_kwargs), self.population)
        cfg = config.evaluate
        self.log(f"[seed {seed}] training online: {online.rounds} rounds of {online.timesteps_per_round} steps")
        agent, _, records = run_online(
            # Segments come from collect's env (e.g. random starts), as the offline comparisons do.
            lambda: gym.make(config.env_id, **{**config.env_kwargs, **config.collect.env_kwargs}),
            self.population,
            config.collect.n_users,
            lambda: EMRewardMixture(config.reward.n_members, seed=seed, progress_bar=False, **self._reward_net(), **config.reward.em),
            maxmin_agent_factory(lambda: self.make_vec_env(seed), self._ppo_kwargs(seed), self._maxmin_rule()),
            online,
            evaluate=lambda policy: evaluate_group_returns(
                policy, eval_env, cfg.n_episodes, seed=100_000 + seed, deterministic=cfg.deterministic
            ),
            seed=seed,
            log=lambda message: self.log(f"[seed {seed}] {message}"),
            make_callback=make_callback,
        )
        eval_env.close()
        save_json_atomic(to_jsonable([asdict(record) for record in records]), self.online_rounds_path(seed))
        # Every round's agent counts its steps from 0: shift them onto the whole loop's step axis.
        steps = np.concatenate([c.curve[0] + r * online.timesteps_per_round for r, c in enumerate(callbacks)])
        return agent, (steps, np.concatenate([c.curve[1] for c in callbacks]))

    # --------------------------------------------------------------- evaluate
    def evaluate(self, seed: int, method: str) -> np.ndarray:
        """``(n_episodes, K)`` true group returns of one trained policy (``method="random"``: random actions)."""
        path = self.seed_dir(seed) / "returns" / f"{method}.npy"
        if self._up_to_date("evaluate", seed, [path], method):
            return np.load(path, allow_pickle=False)
        self._threads()
        env = MultiUserPreferenceWrapper(gym.make(self.config.env_id, **self.config.env_kwargs), self.population)
        model = RandomPolicy(env.action_space, seed) if method == "random" else self.load_policy(seed, method)
        cfg = self.config.evaluate
        returns = evaluate_group_returns(model, env, cfg.n_episodes, seed=100_000 + seed, deterministic=cfg.deterministic)
        write_atomic(path, lambda handle: np.save(handle, returns, allow_pickle=False))
        self._record("evaluate", seed, method)
        return returns

    # ----------------------------------------------------------------- report
    def report(self) -> Path:
        """Pool every seed's evaluation into ``metrics.json``, plots and ``report.md``."""
        seeds = self.config.seeds
        returns = {method: [self.evaluate(seed, method) for seed in seeds] for method in self.methods}
        unwrapped = gym.make(self.config.env_id, **self.config.env_kwargs).unwrapped
        fit = [json.loads((self.seed_dir(s) / "rewards" / "fit_metrics.json").read_text()) for s in seeds]
        extra: dict[str, Any] = {"reward_fit": {f"seed_{s}": f for s, f in zip(seeds, fit)}}
        if "online" in self.methods:
            extra["online_rounds"] = {f"seed_{s}": json.loads(self.online_rounds_path(s).read_text()) for s in seeds}
        metrics = build_metrics(
            returns,
            self.group_names,
            baseline="rlhf",
            min_episode_return=getattr(unwrapped, "min_episode_return", None),
            extra=extra,
        )
        oracles = [f"oracle_{g}" for g in self.group_names]
        if all(o in self.methods for o in oracles):
            random = np.concatenate([self.evaluate(seed, "random") for seed in seeds]).mean(axis=0)
            add_normalized_scores(
                metrics,
                dict(zip(self.group_names, random)),
                {g: metrics["methods"][f"oracle_{g}"]["groups"][g]["mean_return"] for g in self.group_names},
            )
        report = write_report(
            metrics,
            self.out_dir,
            curves=self._curves(),
            config=self.config.to_dict(),
            method="maxmin" if "maxmin" in self.methods else None,
            group_shares=self.config.shares,
            title=f"MaxMin-RLHF on {self.config.env_id}: {self.config.name}",
        )
        if "online" in self.methods:
            write_text_atomic(report.read_text() + "\n" + self._online_section(extra["online_rounds"]), report)
        return report

    def _online_section(self, rounds: dict[str, list[dict[str, Any]]]) -> str:
        """report.md's table of the online loop's rounds: means over seeds of ``{seed_<s>: [round record, ...]}``."""
        per_seed = list(rounds.values())
        header = ["round", "comparisons so far", "ARI", "shares (largest first)", *(f"{g} return" for g in self.group_names)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for index in range(len(per_seed[0])):
            records = [seed_rounds[index] for seed_rounds in per_seed]
            # Members are numbered differently in every seed (and refit): compare shares by size.
            shares = np.mean([sorted(r["shares"], reverse=True) for r in records], axis=0)
            cells = [
                str(index),
                f"{np.mean([r['comparisons'] for r in records]):.0f}",
                f"{np.mean([r['ari'] for r in records]):.2f}",
                " / ".join(f"{share:.2f}" for share in shares),
                *(f"{np.mean([r['group_returns'][g] for r in records]):.1f}" for g in self.group_names),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        offline = self.config.collect.n_users * self.config.collect.comparisons_per_user
        return (
            "## Online loop\n\n"
            f"MaxMin trained by the online preference loop (method `online`), after each round; means over "
            f"{len(per_seed)} seed(s). Returns are every group's true return; the offline methods were asked up to "
            f"{offline} comparisons. Per seed: `{ONLINE_ROUNDS_FILE}` in each seed folder and `extra.online_rounds` in "
            f"[`metrics.json`](metrics.json).\n\n" + "\n".join(lines) + "\n"
        )

    def _curves(self) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """method -> group -> (steps, (n_seeds, n_points) true returns), seeds interpolated onto the first's steps."""
        curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for method in self.methods:
            loaded = []
            for seed in self.config.seeds:
                with np.load(self.seed_dir(seed) / "policies" / f"{method}.curve.npz", allow_pickle=False) as f:
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
