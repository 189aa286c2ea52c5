"""Typed experiment configuration, loadable from YAML.

One config describes one experiment: which env and user groups, how many
preferences to collect, how to fit rewards, which methods to train and how to
evaluate them. Unknown keys, wrong types and out-of-range values are errors
naming the key, raised before any work starts, not silent defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from egalitarian_rl.labelling.online import OnlineSettings

#: ``mean`` weighs the mixture's members by their EM shares (utilitarian); ``uniform_mean`` weighs them equally;
#: ``online`` is MaxMin trained by the online preference loop (needs an ``online:`` section).
METHODS = ("rlhf", "maxmin", "mean", "uniform_mean", "oracle", "online")
#: Answer settings of simulated users (see :class:`~egalitarian_rl.preferences.UserGroup`).
NOISE_SETTINGS = ("beta", "mistake_rate", "skip_threshold", "equal_threshold", "myopic_discount")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the offending key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class GroupConfig:
    """One group of users, when ``groups`` gives more than a share.

    :param share: fraction of the users, in (0, 1].
    :param reward: ``"module:function"`` true step reward of this group (a function of
        :class:`~egalitarian_rl.preferences.Transitions` with any leading shape); ``null``
        takes the group of that name from the env's group library (or ``groups_from``).
    :param beta, mistake_rate, skip_threshold, equal_threshold, myopic_discount: this group's
        answer noise, overriding ``collect``'s (see :class:`~egalitarian_rl.preferences.UserGroup`).
    """

    share: float
    reward: str | None = None
    beta: float | None = None
    mistake_rate: float | None = None
    skip_threshold: float | None = None
    equal_threshold: float | None = None
    myopic_discount: float | None = None

    def __post_init__(self) -> None:
        _require(0.0 < self.share <= 1.0, "share", f"must be in (0, 1], got {self.share}")
        _check_noise(self, "")


def _check_noise(settings: Any, prefix: str) -> None:
    if getattr(settings, "beta", None) is not None:
        _require(settings.beta > 0, f"{prefix}beta", f"must be > 0 (null = deterministic answers), got {settings.beta}")
    if getattr(settings, "mistake_rate", None) is not None:
        _require(0.0 <= settings.mistake_rate <= 0.5, f"{prefix}mistake_rate", f"must be in [0, 0.5], got {settings.mistake_rate}")
    if getattr(settings, "equal_threshold", None) is not None:
        _require(settings.equal_threshold >= 0, f"{prefix}equal_threshold", f"must be >= 0, got {settings.equal_threshold}")
    if getattr(settings, "myopic_discount", None) is not None:
        discount = settings.myopic_discount
        _require(0.0 < discount <= 1.0, f"{prefix}myopic_discount", f"must be in (0, 1], got {discount}")


@dataclass
class CollectConfig:
    """Simulated users and their comparisons.

    :param n_users: number of users, split over the groups by share.
    :param comparisons_per_user: queries asked of each user.
    :param segment_length: steps per compared segment.
    :param beta: Bradley-Terry rationality of every user (``null`` = deterministic).
    :param mistake_rate: probability a user flips a strict answer.
    :param skip_threshold: users skip a query when both segments' returns are below it (``null``: never).
    :param equal_threshold: users answer "equal" when the returns differ by at most this much.
    :param myopic_discount: weight ``gamma ** (L - 1 - t)`` on step ``t`` of a segment (1 = not myopic).
        Per-group values in ``groups`` override these five.
    :param env_kwargs: extra ``gym.make`` arguments for collection (e.g. ``random_start: true``).
    """

    n_users: int = 100
    comparisons_per_user: int = 30
    segment_length: int = 10
    beta: float | None = 5.0
    mistake_rate: float = 0.0
    skip_threshold: float | None = None
    equal_threshold: float = 0.0
    myopic_discount: float = 1.0
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("n_users", "comparisons_per_user", "segment_length"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check_noise(self, "")

    def answering(self) -> dict[str, float | None]:
        """The five answer settings as :class:`UserGroup` keywords (``beta: null`` -> infinity)."""
        settings = {name: getattr(self, name) for name in NOISE_SETTINGS}
        settings["beta"] = math.inf if self.beta is None else self.beta
        return settings


@dataclass
class RewardConfig:
    """Reward learning: the single BT reward and the EM mixture.

    :param n_members: K of the EM mixture; ``null`` chooses it from ``k_range`` by held-out likelihood.
    :param k_range: candidate K values when ``n_members`` is null.
    :param hidden_sizes: hidden layers of every reward network.
    :param epochs: training epochs of the single Bradley-Terry fit. EM's budgets are
        ``em.m_step_epochs`` (per M-step) and ``em.final_epochs`` (the last, longer M-step).
    :param em: any other :class:`~egalitarian_rl.rewards.EMRewardMixture` keyword
        (``soft``, ``init``, ``n_init``, ``max_iter``, ``m_step_epochs``, ``final_epochs``, ``lr``, ...).
    :param heldout_fraction: share of comparisons held out (on segments never trained on) for accuracies.
    :param min_confidence: ``egalitarian-rl assign`` puts a new user in a group only when the posterior
        of that group is at least this; below it the user is not personalised (serve the MaxMin policy).
    """

    n_members: int | None = 2
    k_range: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    epochs: int = 30
    use_next_state: bool = True
    use_action: bool = False
    em: dict[str, Any] = field(default_factory=dict)
    heldout_fraction: float = 0.2
    min_confidence: float = 0.9

    def __post_init__(self) -> None:
        _require(self.n_members is None or self.n_members >= 1, "n_members", f"must be >= 1, got {self.n_members}")
        _require(len(self.k_range) > 0 and all(k >= 1 for k in self.k_range), "k_range", f"needs values >= 1, got {self.k_range}")
        _require(all(h >= 1 for h in self.hidden_sizes), "hidden_sizes", f"widths must be >= 1, got {self.hidden_sizes}")
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _require(0.0 < self.heldout_fraction < 1.0, "heldout_fraction", f"must be in (0, 1), got {self.heldout_fraction}")
        _require(0.0 <= self.min_confidence <= 1.0, "min_confidence", f"must be in [0, 1], got {self.min_confidence}")
        from egalitarian_rl.rewards import EMRewardMixture

        set_here = {"n_components", "observation_space", "action_space", "hidden_sizes", "use_state", "use_action"}
        set_here |= {"use_next_state", "seed", "logger", "progress_bar"}
        _check_keywords(self.em, EMRewardMixture.__init__, set_here, "em")


@dataclass
class TrainConfig:
    """Policy training, the same budget for every method.

    :param total_timesteps: env steps per policy.
    :param n_envs: parallel envs.
    :param vec_env: ``dummy`` or ``subproc``.
    :param aggregation: MaxMin's rule: per_sample_min, worst_group, softmin, egd or mean.
    :param aggregation_kwargs: the rule's parameters (``tau``, ``eta``).
    :param group_critics: MaxMinPPO with one value head per group (linear rules only).
    :param ppo: keyword arguments of SB3 PPO shared by all methods (checked against PPO's signature).
    :param torch_threads: torch CPU threads (1 is fastest for small MLPs on 2 cores).
    :param normalize_obs: the policy sees observations normalised by running statistics (SB3's
        ``VecNormalize(norm_obs=True, norm_reward=False)``), saved beside each policy and frozen at
        evaluation; the reward models keep reading raw observations (they were fitted on them).
    """

    total_timesteps: int = 30_000
    n_envs: int = 4
    vec_env: str = "dummy"
    aggregation: str = "per_sample_min"
    aggregation_kwargs: dict[str, Any] = field(default_factory=dict)
    group_critics: bool = False
    ppo: dict[str, Any] = field(default_factory=dict)
    torch_threads: int = 1
    normalize_obs: bool = False

    def __post_init__(self) -> None:
        for key in ("total_timesteps", "n_envs", "torch_threads"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.vec_env in ("dummy", "subproc"), "vec_env", f"{self.vec_env!r} is neither 'dummy' nor 'subproc'")
        from stable_baselines3 import PPO

        set_here = {"policy", "env", "seed", "device", "tensorboard_log", "verbose", "_init_setup_model"}
        _check_keywords(self.ppo, PPO.__init__, set_here, "ppo")
        for key in ("n_steps", "batch_size", "n_epochs"):
            if key in self.ppo:
                value = self.ppo[key]
                _require(
                    isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"ppo.{key}",
                    f"must be an integer >= 1, got {value!r}",
                )
        for key in ("learning_rate", "gamma", "gae_lambda", "clip_range", "ent_coef", "vf_coef", "max_grad_norm"):
            if key in self.ppo:
                value = self.ppo[key]
                _require(
                    isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                    f"ppo.{key}",
                    f"must be a number >= 0, got {value!r}",
                )
        for key in ("gamma", "gae_lambda"):
            if key in self.ppo:
                _require(self.ppo[key] <= 1, f"ppo.{key}", f"must be in [0, 1], got {self.ppo[key]}")


@dataclass
class EvaluateConfig:
    """:param n_episodes: evaluation episodes per policy and seed.
    :param deterministic: act greedily when evaluating."""

    n_episodes: int = 10
    deterministic: bool = True

    def __post_init__(self) -> None:
        _require(self.n_episodes >= 1, "n_episodes", f"must be >= 1, got {self.n_episodes}")


@dataclass
class OnlineConfig(OnlineSettings):
    """The ``online:`` section: the method ``online``, MaxMin trained by the online preference loop.

    Each of ``rounds`` rolls out ``segments_per_round`` segments of ``segment_length`` steps from
    the current policy (random actions in round 0, in ``collect.env_kwargs``' env), adds
    ``candidates_per_round`` candidate pairs, asks each of ``collect``'s ``n_users`` simulated users
    ``queries_per_user`` pairs chosen by ``rule`` (``disagreement`` of the mixture's members, with an
    ``epsilon`` share of random picks, or ``random``), refits EM on every answer so far and trains
    MaxMinPPO ``timesteps_per_round`` more steps with ``train``'s PPO settings and aggregation.
    Total comparisons: ``rounds * n_users * queries_per_user`` (minus skips); total PPO steps:
    ``rounds * timesteps_per_round`` (``train.total_timesteps`` is not used).
    """

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as err:  # "online.<key>: ..."; _build adds the "online." prefix back
            raise ConfigError(str(err).removeprefix("online.")) from None


class YamlConfig:
    """``from_dict`` / ``from_yaml`` / ``to_dict`` for a config dataclass and its nested dataclasses.

    Unknown keys, wrong types and out-of-range values (each dataclass's
    ``__post_init__``) become one :class:`ConfigError` naming the key.
    """

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Any:
        return _build(cls, raw, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Any:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass
class ExperimentConfig(YamlConfig):
    """A whole experiment.

    :param name: experiment name (used in the report).
    :param env_id: any registered gymnasium id (``"module:Id"`` imports ``module`` first, as gymnasium does).
    :param groups: group name -> share of users (``{majority: 0.8, minority: 0.2}``), or
        group name -> a :class:`GroupConfig` mapping with ``share`` and optionally ``reward``
        (``"module:function"``) and per-group answer noise.
    :param groups_from: ``"module:ATTRIBUTE"`` naming a
        :class:`~egalitarian_rl.preferences.GroupRewardLibrary` in user code, for an env the package
        has no groups for; ``null`` uses the package's library for ``env_id``.
    :param info_keys: ``info`` entries that ``module:function`` group rewards read.
    :param methods: what to train: ``rlhf`` (SB3 PPO on the single BT reward),
        ``maxmin`` (MaxMinPPO on the EM mixture), ``mean`` (MaxMinPPO, mixture members weighted
        by their EM shares: the utilitarian baseline), ``uniform_mean`` (members weighted
        equally), ``oracle`` (SB3 PPO on each group's true reward; also anchors the
        normalised scores), ``online`` (MaxMinPPO trained by the online preference loop; needs ``online``).
    :param seeds: one full run (collect, fit, train, evaluate) per seed.
    :param out_dir: where artefacts go; a stage whose artefacts exist and were computed from
        the same settings is skipped (resume); a changed setting redoes that stage and every later one.
    :param env_kwargs: ``gym.make`` arguments for training and evaluation.
    :param online: the online loop's settings (:class:`OnlineConfig`); required by, and only by, the method ``online``.
    """

    env_id: str
    groups: dict[str, GroupConfig]
    name: str = "experiment"
    groups_from: str | None = None
    info_keys: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["rlhf", "maxmin", "mean", "oracle"])
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str = "runs/experiment"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    collect: CollectConfig = field(default_factory=CollectConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    online: OnlineConfig | None = None

    def __post_init__(self) -> None:
        _require(bool(self.groups), "groups", "give at least one group")
        self.groups = {name: _as_group(value, name) for name, value in self.groups.items()}
        total = sum(group.share for group in self.groups.values())
        _require(math.isclose(total, 1.0, abs_tol=1e-6), "groups", f"shares must sum to 1, got {total:.6g}")
        unknown = sorted(set(self.methods) - set(METHODS))
        _require(not unknown, "methods", f"unknown method {unknown}; choose from {list(METHODS)}")
        _require("rlhf" in self.methods, "methods", "'rlhf' is required (it is the baseline every win-rate is measured against)")
        _require(bool(self.seeds), "seeds", "give at least one seed")
        _require(len(set(self.seeds)) == len(self.seeds), "seeds", f"repeated seed in {self.seeds}")
        for spec, key in ((self.groups_from, "groups_from"), *((g.reward, f"groups.{n}.reward") for n, g in self.groups.items())):
            _require(spec is None or (spec.count(":") == 1 and all(spec.split(":"))), key, f"must be 'module:attribute', got {spec!r}")
        if "online" in self.methods:
            _require(self.online is not None, "online", "method 'online' needs an online: section (rounds, queries_per_user, ...)")
            _require(self.reward.n_members is not None, "reward.n_members", "method 'online' refits a fixed K every round; give one")
            _require(not self.train.normalize_obs, "train.normalize_obs", "the online method does not normalise observations yet")
        else:
            _require(self.online is None, "online", "the section is set but 'online' is not in methods")
        if self.reward.n_members is not None:
            _require(
                self.reward.n_members <= self.collect.n_users,
                "reward.n_members",
                f"K={self.reward.n_members} is more than the {self.collect.n_users} users",
            )

    @property
    def shares(self) -> dict[str, float]:
        """Group name -> share."""
        return {name: group.share for name, group in self.groups.items()}


def _as_group(value: Any, name: str) -> GroupConfig:
    """A share (``0.8``) or a mapping (``{share: 0.8, reward: ..., beta: ...}``) as a :class:`GroupConfig`."""
    if isinstance(value, GroupConfig):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _build(GroupConfig, {"share": value}, f"groups.{name}.")
    if isinstance(value, dict):
        return _build(GroupConfig, value, f"groups.{name}.")
    raise ConfigError(f"groups.{name}: expected a share (a number) or a mapping with 'share', got {value!r}")


def _check_keywords(given: dict[str, Any], function: Any, set_here: set[str], key: str) -> None:
    """Refuse keys that ``function`` does not accept, or that the pipeline sets itself."""
    accepted = set(inspect.signature(function).parameters) - {"self", "args", "kwargs"}
    for name in given:
        if name in set_here:
            raise ConfigError(f"{key}.{name}: set by the pipeline, not here")
        if name not in accepted:
            valid = accepted - set_here
            raise ConfigError(f"{key}.{name}: unknown setting{_did_you_mean(name, valid)}; valid here: {sorted(valid)}")


def _did_you_mean(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), sorted(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown setting{_did_you_mean(unknown[0], names)}; valid here: {sorted(names)}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        section = _section_class(hint)
        if section is not None and (value is not None or section is hint):
            values[key] = _build(section, value, f"{prefix}{key}.")
        elif key == "groups" and cls is ExperimentConfig:
            _require(isinstance(value, dict), "groups", f"expected a mapping of group name -> share, got {value!r}")
            values[key] = {str(name): _as_group(group, name) for name, group in value.items()}
        else:
            values[key] = _check_type(value, hint, f"{prefix}{key}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None
    except TypeError as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def _section_class(hint: Any) -> type | None:
    """The dataclass of a section's type hint (``CollectConfig``, or ``OnlineConfig`` in ``OnlineConfig | None``)."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return options[0] if len(options) == 1 else None
    return None


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        names = " or ".join(
            "null" if a is type(None) else getattr(typing.get_origin(a) or a, "__name__", str(a)) for a in typing.get_args(hint)
        )
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if hint is Any:
        return value
    base = origin or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(base, '__name__', base)}, got {value!r}")
    if base is list:
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if base is dict:
        key_hint, item = typing.get_args(hint) or (Any, Any)
        return {_check_type(k, key_hint, f"{where} key"): _check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    return value


def is_lm_config(path: str | Path) -> bool:
    """Whether a YAML file is a language experiment (:class:`LMExperimentConfig`: it has ``model`` or ``prompts``)
    rather than an :class:`~egalitarian_rl.experiments.ExperimentConfig` (which has ``env_id``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and "env_id" not in raw and bool({"model", "prompts"} & set(raw))
