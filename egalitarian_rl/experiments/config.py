"""Typed experiment configuration, loadable from YAML.

One config describes one experiment: which env and user groups, how many
preferences to collect, how to fit rewards, which methods to train and how to
evaluate them. Unknown keys and wrong types are errors, not silent defaults.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("rlhf", "maxmin", "mean", "oracle")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the offending key."""


@dataclass
class CollectConfig:
    """Simulated users and their comparisons.

    :param n_users: number of users, split over the groups by share.
    :param comparisons_per_user: queries asked of each user.
    :param segment_length: steps per compared segment.
    :param beta: Bradley-Terry rationality of every user (``null`` = deterministic).
    :param mistake_rate: probability a user flips a strict answer.
    :param env_kwargs: extra ``gym.make`` arguments for collection (e.g. ``random_start: true``).
    """

    n_users: int = 100
    comparisons_per_user: int = 30
    segment_length: int = 10
    beta: float | None = 5.0
    mistake_rate: float = 0.0
    env_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    """Reward learning: the single BT reward and the EM mixture.

    :param n_members: K of the EM mixture; ``null`` chooses it from ``k_range`` by held-out likelihood.
    :param k_range: candidate K values when ``n_members`` is null.
    :param hidden_sizes: hidden layers of every reward network.
    :param epochs: training epochs of the BT fit (and the budget per M-step).
    """

    n_members: int | None = 2
    k_range: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    epochs: int = 30
    use_next_state: bool = True
    use_action: bool = False


@dataclass
class TrainConfig:
    """Policy training, the same budget for every method.

    :param total_timesteps: env steps per policy.
    :param n_envs: parallel envs.
    :param vec_env: ``dummy`` or ``subproc``.
    :param aggregation: MaxMin's rule: worst_group, per_sample_min, softmin, egd or mean.
    :param aggregation_kwargs: the rule's parameters (``tau``, ``eta``).
    :param group_critics: MaxMinPPO with one value head per group (linear rules only).
    :param ppo: keyword arguments of SB3 PPO shared by all methods.
    :param torch_threads: torch CPU threads (1 is fastest for small MLPs on 2 cores).
    """

    total_timesteps: int = 30_000
    n_envs: int = 4
    vec_env: str = "dummy"
    aggregation: str = "worst_group"
    aggregation_kwargs: dict[str, Any] = field(default_factory=dict)
    group_critics: bool = False
    ppo: dict[str, Any] = field(default_factory=dict)
    torch_threads: int = 1


@dataclass
class EvaluateConfig:
    """:param n_episodes: evaluation episodes per policy and seed.
    :param deterministic: act greedily when evaluating."""

    n_episodes: int = 10
    deterministic: bool = True


@dataclass
class ExperimentConfig:
    """A whole experiment.

    :param name: experiment name (used in the report).
    :param env_id: gymnasium id; must have user groups (see ``egalitarian_rl.envs.group_library``).
    :param groups: group name -> share of users, e.g. ``{majority: 0.8, minority: 0.2}``.
    :param methods: what to train: ``rlhf`` (SB3 PPO on the single BT reward),
        ``maxmin`` (MaxMinPPO on the EM mixture), ``mean`` (MaxMinPPO with the
        utilitarian mean), ``oracle`` (SB3 PPO on each group's true reward).
    :param seeds: one full run (collect, fit, train, evaluate) per seed.
    :param out_dir: where artefacts go; a stage whose artefacts exist is skipped (resume).
    :param env_kwargs: ``gym.make`` arguments for training and evaluation.
    """

    env_id: str
    groups: dict[str, float]
    name: str = "experiment"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str = "runs/experiment"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    collect: CollectConfig = field(default_factory=CollectConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"methods: unknown method {unknown}; choose from {list(METHODS)}")
        if "rlhf" not in self.methods:
            raise ConfigError("methods: 'rlhf' is required (it is the baseline every win-rate is measured against)")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if self.train.vec_env not in ("dummy", "subproc"):
            raise ConfigError(f"train.vec_env: {self.train.vec_env!r} is neither 'dummy' nor 'subproc'")
        if self.reward.n_members is not None and self.reward.n_members < 1:
            raise ConfigError(f"reward.n_members: must be >= 1, got {self.reward.n_members}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        return _build(cls, raw, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
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
        return dataclasses.asdict(self)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown setting; valid here: {sorted(names)}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            values[key] = _check_type(value, hint, f"{prefix}{key}")
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a {hint}")
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
    return value
