"""MaxMinLMPPO: token-level PPO for a causal LM on an aggregate of K group scores.

The language-model side of :class:`~egalitarian_rl.algorithms.maxmin_ppo.MaxMinPPO`:
the same aggregation rules (``worst_group``, ``per_sample_min``, ``softmin``,
``egd``, ``mean``), the same :class:`GroupRewardNormalizer` and the same
``groups/*`` log names, but an LM policy that generates whole completions.

One iteration (:meth:`MaxMinLMPPO.train_iteration`), read top to bottom:

1. choose ``batch_size`` prompts (``batch_size / completions_per_prompt`` distinct ones);
2. sample completions with the KV cache (:func:`~egalitarian_rl.lm.rollout.sample_completions`);
3. one forward pass of the policy (log-probs, values) and one of the frozen
   reference (log-probs) over the finished sequences;
4. score every completion for each of the K groups with ``group_scores``,
   normalise per group, and let the rule aggregate them into one score per
   completion (for return-level rules the batch's mean normalised score of each
   group is that group's return under the current policy, which chooses the weights);
5. advantages:
   ``"gae"`` (TRL's PPO recipe): per-token reward ``-kl_coef * (log pi - log pi_ref)``,
   the aggregated score added at the last token, GAE over tokens with the value
   head, advantages whitened;
   ``"rloo"`` (critic-free): the sequence reward ``score - kl_coef * KL`` minus the
   leave-one-out mean of the other completions of the same prompt, for every token;
   ``"grpo"`` (critic-free): the score minus the prompt's group mean over its std,
   with the KL to the reference as a loss term (``kl_coef`` times GRPO's per-token estimator);
6. ``n_epochs`` passes of clipped PPO (and clipped value) losses over minibatches.

Data parallel: the trainer always runs through an :class:`accelerate.Accelerator`.
Under ``accelerate launch`` each process samples its share of the rows (row ``i``
always draws from the same random stream, see :func:`row_generators`); scores
are gathered so normalisation, aggregation, baselines and whitening see the
whole batch; losses are divided by the global token count so that averaging
gradients over processes gives the 1-process gradient.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from stable_baselines3.common.logger import Logger, configure
from torch import nn
from tqdm.auto import tqdm

from egalitarian_rl.algorithms.aggregation import Aggregation, GroupRewardNormalizer, make_aggregation
from egalitarian_rl.io import save_json_atomic, write_atomic
from egalitarian_rl.lm.rollout import left_pad, response_mask, row_generators, sample_completions, score_tokens

__all__ = ["GroupScoreFn", "LMPPOConfig", "MaxMinLMPPO"]

#: ``(prompts, completions) -> (n, K)`` every completion's score for each of the K groups
#: (learned reward models for RLHF, true group scores for reference runs).
GroupScoreFn = Callable[[list[str], list[str]], np.ndarray]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class LMPPOConfig:
    """Hyperparameters of :class:`MaxMinLMPPO` (saved with every checkpoint).

    :param advantage: ``"gae"`` (value head, TRL's PPO), ``"rloo"`` (leave-one-out baseline)
        or ``"grpo"`` (group mean / std baseline); the last two need ``completions_per_prompt >= 2``.
    :param batch_size: completions per iteration, over all processes together.
    :param completions_per_prompt: completions sampled for each chosen prompt.
    :param minibatch_size: completions per gradient step, over all processes together.
    :param n_epochs: passes over the batch per iteration.
    :param max_new_tokens: the most tokens of a completion.
    :param temperature: sampling temperature; log-probs use the same one, so PPO ratios are exact.
    :param learning_rate: Adam's step size.
    :param clip_range: PPO's ratio clip.
    :param clip_range_vf: clip of the value change from the rollout's value (None: no clipping).
    :param vf_coef: weight of the value loss.
    :param gamma: discount over tokens.
    :param gae_lambda: GAE's lambda over tokens.
    :param kl_coef: (initial) coefficient of the KL penalty to the reference model: a per-token reward
        ``-kl_coef * (log pi - log pi_ref)`` for ``"gae"`` and ``"rloo"``; for ``"grpo"`` a loss term,
        ``kl_coef`` times the token mean of ``exp(d) - d - 1`` with ``d = log pi_ref - log pi``.
    :param target_kl: None for a fixed coefficient; else the KL (nats per completion) that an
        adaptive coefficient steers towards (Ziegler et al.'s controller, as in TRL).
    :param kl_horizon: the adaptive controller's horizon in completions.
    :param kl_budget: None trains for every iteration :meth:`MaxMinLMPPO.learn` is given; else training stops
        early once the mean KL (nats per completion) of the last ``kl_budget_window`` batches reaches it, so
        methods trained with one budget are judged at about one distance from the reference. Unlike
        ``target_kl`` it never loosens the penalty; a method that moves slowly trains for every iteration.
    :param kl_budget_window: batches averaged for ``kl_budget`` (one batch's KL is noisy: on IMDB with 16
        completions, consecutive batches of one policy differed by up to 4 nats).
    :param max_grad_norm: gradient norm clip.
    :param whiten_advantages: scale advantages to unit variance over the batch: for ``"gae"`` whitened over
        the response tokens, for ``"rloo"`` divided by their std over the completions (their mean is 0 already).
        ``None``: ``"gae"`` only (TRL's defaults). With ``"rloo"`` it makes every reward move the policy by
        steps of one size, whatever its spread: a per-sample min of two z-scores spreads less than either
        score (on IMDB, 0.75 against a single reward's 0.90 within a prompt), so unwhitened it takes smaller steps
        at the same learning rate. ``"grpo"`` scales by each prompt's std already and ignores it.
    :param seed: seeds prompt choice, sampling and minibatch order (with the iteration number).
    """

    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    batch_size: int = 16
    completions_per_prompt: int = 1
    minibatch_size: int = 8
    n_epochs: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    learning_rate: float = 1e-5
    clip_range: float = 0.2
    clip_range_vf: float | None = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    gae_lambda: float = 0.95
    kl_coef: float = 0.1
    target_kl: float | None = None
    kl_horizon: int = 10_000
    kl_budget: float | None = None
    kl_budget_window: int = 3
    max_grad_norm: float = 1.0
    whiten_advantages: bool | None = None
    seed: int = 0

    @property
    def whitens(self) -> bool:
        """Whether advantages are scaled to unit variance (``whiten_advantages``, ``None`` resolved by ``advantage``)."""
        return self.advantage == "gae" if self.whiten_advantages is None else self.whiten_advantages

    def check(self, num_processes: int) -> None:
        """Raise a ValueError for inconsistent settings."""
        if self.advantage not in ("gae", "rloo", "grpo"):
            raise ValueError(f"advantage must be 'gae', 'rloo' or 'grpo', got {self.advantage!r}")
        if self.advantage != "gae" and self.completions_per_prompt < 2:
            raise ValueError(f"advantage={self.advantage!r} compares completions of one prompt: completions_per_prompt must be >= 2")
        positive = (
            "batch_size", "completions_per_prompt", "minibatch_size", "n_epochs", "max_new_tokens", "kl_horizon", "kl_budget_window"
        )  # fmt: skip
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.completions_per_prompt:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of completions_per_prompt={self.completions_per_prompt}")
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of minibatch_size={self.minibatch_size}")
        if self.minibatch_size % num_processes:
            raise ValueError(f"minibatch_size={self.minibatch_size} is not a multiple of the {num_processes} processes")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.kl_coef < 0 or (self.target_kl is not None and not self.target_kl > 0):
            raise ValueError(f"need kl_coef >= 0 and target_kl None or > 0, got {self.kl_coef}, {self.target_kl}")
        if self.kl_budget is not None and not self.kl_budget > 0:
            raise ValueError(f"kl_budget must be None or > 0, got {self.kl_budget}")


class PolicyWithValueHead(nn.Module):
    """The LM and (for ``"gae"``) a linear value head on its trunk's last hidden state.

    One module, so that data-parallel wrapping syncs the gradients of both.

    :param model: a transformers causal LM (optionally peft-wrapped).
    :param with_value_head: add the value head.
    """

    def __init__(self, model: nn.Module, with_value_head: bool) -> None:
        super().__init__()
        self.model = model
        hidden_size = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
        self.value_head = nn.Linear(hidden_size, 1) if with_value_head else None
        if self.value_head is not None:
            # Values start at 0: the first value loss is about the returns, not a random head.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        temperature: float,
        with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(logprobs, values, entropy)``, each ``(B, R)`` (values None without a head, entropy if asked)."""
        out = score_tokens(
            self.model,
            prompt_ids,
            prompt_mask,
            response_ids,
            temperature,
            with_entropy=with_entropy,
            with_hidden=self.value_head is not None,
        )
        values = None if self.value_head is None else self.value_head(out.hidden.float()).squeeze(-1)
        return out.logprobs, values, out.entropy


class MaxMinLMPPO:
    """PPO (or RLOO / GRPO) for a causal LM on an aggregate of K group scores; by default the worst-off group's.

    :param model: the policy, a transformers causal LM; peft-wrapped for LoRA (then only the
        adapters train and the reference is the model with adapters disabled).
    :param tokenizer: its tokenizer; must have a pad token.
    :param prompts: the prompts completions are sampled for, formatted already (e.g. by
        :func:`~egalitarian_rl.lm.models.format_prompts`); tokenised without adding special tokens.
    :param group_scores: ``(prompts, completions) -> (n, K)`` scores; see :data:`GroupScoreFn`.
    :param aggregation: ``"per_sample_min"`` (default, as MaxMinPPO and the paper's released LM code), ``"worst_group"``,
        ``"softmin"``, ``"egd"``, ``"mean"``
        or an :class:`Aggregation`.
    :param aggregation_kwargs: the rule's arguments (``tau``, ``eta``, ``weights`` e.g. the groups' shares for ``mean``).
    :param normalizer: per-group statistics: frozen for a fixed scale (e.g. :meth:`GroupRewardNormalizer.from_data`
        on the preference data's scores), unfrozen for a running one (updated with every batch). None: the
        first batch's statistics (the untrained policy's), then frozen, as in MaxMinPPO, so every group is
        measured as its gain over the starting model.
    :param group_names: names of the K groups for logs (``groups/return_<name>``); None: ``group_<k>``
        with K taken from the first scores.
    :param config: an :class:`LMPPOConfig`; keyword arguments override its fields.
    :param ref_model: the frozen reference; None: the model with adapters disabled (peft) or a frozen copy.
    :param torch_threads: ``torch.set_num_threads`` (None leaves it); on a shared CPU 1 is often fastest.
    :param tensorboard_log: folder for tensorboard and CSV logs (None: no files).
    :param verbose: 1 also prints the logs.
    :param accelerator: an existing :class:`accelerate.Accelerator` (None: a new one).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        prompts: Sequence[str],
        group_scores: GroupScoreFn,
        *,
        aggregation: str | Aggregation = "per_sample_min",
        aggregation_kwargs: dict[str, Any] | None = None,
        normalizer: GroupRewardNormalizer | None = None,
        group_names: Sequence[str] | None = None,
        config: LMPPOConfig | None = None,
        ref_model: nn.Module | None = None,
        torch_threads: int | None = None,
        tensorboard_log: str | os.PathLike[str] | None = None,
        verbose: int = 0,
        accelerator: Accelerator | None = None,
        **config_kwargs: Any,
    ) -> None:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        unknown = sorted(set(config_kwargs) - {f.name for f in fields(LMPPOConfig)})
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; LMPPOConfig fields are {[f.name for f in fields(LMPPOConfig)]}")
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.config = replace(config or LMPPOConfig(), **config_kwargs)
        self.config.check(self.accelerator.num_processes)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token")
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.prompts = list(prompts)
        self.prompt_token_ids = self._tokenize_prompts(model, self.prompts)
        self.group_scores = group_scores
        self.aggregation = (
            aggregation if isinstance(aggregation, Aggregation) else make_aggregation(aggregation, **(aggregation_kwargs or {}))
        )
        self.group_names = None if group_names is None else list(group_names)
        self.normalizer = normalizer
        self.fit_normalizer_on_first_batch = normalizer is None
        if normalizer is not None and self.group_names is not None and normalizer.num_groups != len(self.group_names):
            raise ValueError(f"normalizer has K={normalizer.num_groups} groups but {len(self.group_names)} group names were given")

        # Dropout off: PPO's ratio must compare the same function at rollout and update.
        model.eval()
        self.ref_model = ref_model
        if ref_model is None and not hasattr(model, "disable_adapter"):
            self.ref_model = copy.deepcopy(model)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        policy = PolicyWithValueHead(model, with_value_head=self.config.advantage == "gae").to(self.accelerator.device)
        optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=self.config.learning_rate)
        self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        if self.ref_model is not None:
            self.ref_model.to(self.accelerator.device)

        self.kl_coef = self.config.kl_coef
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        folder = None if tensorboard_log is None else str(tensorboard_log)
        formats = (["stdout"] if verbose else []) + ([] if folder is None else ["tensorboard", "csv"])
        if not self.accelerator.is_main_process:
            formats = []
        self.logger: Logger = configure(folder, formats) if formats else Logger(None, [])

    # ------------------------------------------------------------------ set-up
    def _tokenize_prompts(self, model: nn.Module, prompts: list[str]) -> list[list[int]]:
        if not prompts:
            raise ValueError("no prompts: MaxMinLMPPO needs at least one prompt to sample completions for")
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        token_ids = []
        for index, prompt in enumerate(prompts):
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"prompt {index} ({prompt!r}) has no tokens; the first completion token needs a prefix")
            if context is not None and len(ids) + self.config.max_new_tokens > context:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens={self.config.max_new_tokens} "
                    f"it exceeds the model's context of {context} tokens"
                )
            token_ids.append(ids)
        return token_ids

    @property
    def model(self) -> nn.Module:
        """The language model being trained (unwrapped from any data-parallel wrapper)."""
        return self.accelerator.unwrap_model(self.policy).model

    @property
    def value_head(self) -> nn.Linear | None:
        """The value head (``"gae"`` only)."""
        return self.accelerator.unwrap_model(self.policy).value_head

    # ------------------------------------------------------------------ group scores
    def _score(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """``(n, K)`` validated group scores of the completions."""
        scores = np.asarray(self.group_scores(prompts, completions), dtype=np.float64)
        k = len(self.group_names) if self.group_names is not None else (scores.shape[1] if scores.ndim == 2 else None)
        if scores.ndim != 2 or scores.shape != (len(completions), k):
            expected = f"({len(completions)}, {k if k is not None else 'K'})"
            raise ValueError(
                f"group_scores returned shape {scores.shape}; expected {expected}: one row per completion, one column per group"
            )
        if not np.isfinite(scores).all():
            raise ValueError(f"group_scores returned {int((~np.isfinite(scores)).sum())} non-finite value(s)")
        if self.group_names is None:
            self.group_names = [f"group_{g}" for g in range(k)]
        return scores

    def _normalize(self, scores: np.ndarray) -> np.ndarray:
        """``(n, K)`` scores on one scale.

        A given normaliser is updated with every batch unless frozen (a running scale, as in
        MaxMinPPO's wrapper); without one, the first batch's statistics are fitted and frozen.
        """
        if self.normalizer is None:
            self.normalizer = GroupRewardNormalizer(scores.shape[1])
        self.normalizer.update(scores)  # a no-op once frozen
        if self.fit_normalizer_on_first_batch and not self.normalizer.frozen:
            self.normalizer.freeze()
            flat = [name for name, std in zip(self.group_names, self.normalizer.std) if std < 1e-6]
            if flat:
                warnings.warn(
                    f"group(s) {flat} scored every completion of the first batch the same: their normalised scores "
                    "will be huge; pass a normalizer fitted on reference data",
                    stacklevel=3,
                )
        return self.normalizer.normalize(scores)

    # ------------------------------------------------------------------ distributed helpers
    def _gather(self, array: np.ndarray) -> np.ndarray:
        """Concatenate every process's rows, in process order (= global row order)."""
        if self.accelerator.num_processes == 1:
            return array
        return self.accelerator.gather(torch.as_tensor(array, device=self.accelerator.device)).cpu().numpy()

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a no-op in one process)."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.detach().clone(), reduction="sum")

    def _local_rows(self, n_global: int) -> range:
        per_process = n_global // self.accelerator.num_processes
        start = self.accelerator.process_index * per_process
        return range(start, start + per_process)

    # ------------------------------------------------------------------ sampling
    def _sample(self, prompt_ids: list[list[int]], rows: Sequence[int], seed_key: tuple[int, ...]) -> dict[str, Any]:
        """Sample one completion per prompt and decode it; ``rows`` (global row indices) and ``seed_key`` pick the RNG streams."""
        input_ids, attention_mask = left_pad(prompt_ids, self.tokenizer.pad_token_id)
        device = self.accelerator.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        response_ids, _ = sample_completions(
            self.model,
            input_ids,
            attention_mask,
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
            generators=row_generators(seed_key, rows),
            eos_token_id=self.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        mask = response_mask(response_ids, self.eos_token_id).to(device)
        lengths = mask.sum(-1).long()
        ended = (
            (response_ids == self.eos_token_id).any(-1) if self.eos_token_id is not None else torch.zeros_like(lengths, dtype=torch.bool)
        )
        # The completion text stops before EOS; special tokens are not text a scorer should see.
        texts = [
            self.tokenizer.decode(ids[: n - int(e)].tolist(), skip_special_tokens=True) for ids, n, e in zip(response_ids, lengths, ended)
        ]
        return {
            "prompt_ids": input_ids,
            "prompt_mask": attention_mask,
            "response_ids": response_ids,
            "mask": mask,
            "texts": texts,
            "ended": ended,
        }

    @torch.no_grad()
    def _reference_logprobs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
        temperature = self.config.temperature
        if self.ref_model is not None:
            return score_tokens(self.ref_model, prompt_ids, prompt_mask, response_ids, temperature).logprobs
        with self.model.disable_adapter():  # peft: the base model is the reference, no second copy in memory
            return score_tokens(self.model, prompt_ids, prompt_mask, response_ids, temperature).logprobs

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str] | None = None, completions_per_prompt: int = 1, seed: int = 12345) -> dict[str, Any]:
        """Mean true-or-learned group scores of fresh completions (no training, this process only).

        :param prompts: held-out prompts (None: the training prompts).
        :param completions_per_prompt: completions sampled per prompt.
        :param seed: the sampling seed; the same seed and model give the same completions.
        :return: ``scores`` ``(K,)`` raw mean scores, ``normalized`` ``(K,)`` (when the normaliser
            exists), ``length`` mean tokens, ``ended`` fraction that produced EOS, ``completions``.
        """
        prompts = self.prompts if prompts is None else list(prompts)
        token_ids = self.prompt_token_ids if prompts is self.prompts else self._tokenize_prompts(self.model, prompts)
        rows = [i for i in range(len(prompts)) for _ in range(completions_per_prompt)]
        sample = self._sample([token_ids[i] for i in rows], range(len(rows)), (1, seed))
        scores = self._score([prompts[i] for i in rows], sample["texts"])
        result = {
            "scores": scores.mean(0),
            "length": float(sample["mask"].sum(-1).mean()),
            "ended": float(sample["ended"].float().mean()),
            "completions": sample["texts"],
        }
        if self.normalizer is not None:
            result["normalized"] = self.normalizer.normalize(scores).mean(0)
        return result

    # ------------------------------------------------------------------ one iteration
    def train_iteration(self) -> dict[str, float]:
        """One rollout and one PPO update; returns (and logs) its statistics."""
        cfg, device = self.config, self.accelerator.device
        n_prompts = cfg.batch_size // cfg.completions_per_prompt

        # 1. Prompts: the same choice on every process (seeded by the iteration), each takes its rows.
        rng = np.random.default_rng([cfg.seed, self.iteration])
        chosen = rng.choice(len(self.prompts), n_prompts, replace=len(self.prompts) < n_prompts)
        global_prompts = np.repeat(chosen, cfg.completions_per_prompt)  # completions of one prompt are adjacent
        rows = self._local_rows(cfg.batch_size)
        prompt_index = global_prompts[rows.start : rows.stop]

        # 2-3. Sample, then one forward pass of the reference and one of the policy (unless the
        # update's own forward serves, see ``single_pass``).
        sample = self._sample([self.prompt_token_ids[i] for i in prompt_index], rows, (0, cfg.seed, self.iteration))
        prompt_ids, prompt_mask, response_ids, mask = sample["prompt_ids"], sample["prompt_mask"], sample["response_ids"], sample["mask"]
        ref_logprobs = self._reference_logprobs(prompt_ids, prompt_mask, response_ids)
        old_logprobs = old_values = entropy = None
        if not self.single_pass:
            with torch.no_grad():
                old_logprobs, old_values, entropy = self.accelerator.unwrap_model(self.policy)(
                    prompt_ids, prompt_mask, response_ids, cfg.temperature, with_entropy=True
                )

        # 4. Group scores -> one scale -> one score per completion, all on the global batch.
        raw_scores = self._gather(self._score([self.prompts[i] for i in prompt_index], sample["texts"]))
        normalized = self._normalize(raw_scores)
        group_returns = normalized.mean(axis=0)  # each group's expected (normalised) score under the current policy
        result = self.aggregation.aggregate(normalized, group_returns)
        scores = torch.as_tensor(result.rewards[rows.start : rows.stop], dtype=torch.float32, device=device)

        # 5. Advantages. The KL penalty is a per-token reward (gae, rloo), or a loss term (grpo).
        if cfg.advantage == "gae":
            rewards = -self.kl_coef * (old_logprobs - ref_logprobs) * mask
            last = (mask.sum(-1).long() - 1).clamp(min=0)  # each completion's last counted token
            rewards[torch.arange(len(last)), last] += scores
            advantages, returns = self._gae(rewards, old_values * mask, mask)
        else:
            sequence_rewards = scores if cfg.advantage == "grpo" else scores - self.kl_coef * ((old_logprobs - ref_logprobs) * mask).sum(-1)
            grouped = self._gather(sequence_rewards.cpu().numpy()).reshape(n_prompts, cfg.completions_per_prompt)
            baseline_advantages = self._critic_free_advantages(grouped).reshape(-1)[rows.start : rows.stop]
            advantages = torch.as_tensor(baseline_advantages, dtype=torch.float32, device=device)[:, None].expand_as(mask).contiguous()
            returns = None

        # 6. PPO epochs over minibatches (the same order on every process).
        losses, first_pass = self._update(
            prompt_ids, prompt_mask, response_ids, mask, old_logprobs, old_values, ref_logprobs, advantages, returns
        )
        if self.single_pass:  # the update's forward ran before its step: it saw the rollout policy
            old_logprobs, entropy = first_pass

        # Statistics of the whole batch; KL in nats per completion.
        mean_kl = float(self._gather(((old_logprobs - ref_logprobs) * mask).sum(-1).cpu().numpy()).mean())
        stats: dict[str, float] = {
            "charts/kl": mean_kl,
            "charts/kl_coef": self.kl_coef,
            "charts/entropy": float(self._sum((entropy * mask).sum()) / self._sum(mask.sum())),
            "charts/response_length": float(self._gather(mask.sum(-1).cpu().numpy()).mean()),
            "charts/ended_fraction": float(self._gather(sample["ended"].float().cpu().numpy()).mean()),
            "charts/score": float(result.rewards.mean()),
            **losses,
        }
        for g, name in enumerate(self.group_names):
            stats[f"charts/score_{name}"] = float(raw_scores[:, g].mean())
            stats[f"groups/return_{name}"] = float(group_returns[g])
            stats[f"groups/weight_{name}"] = float(result.weights[g])
            stats[f"groups/reward_mean_{name}"] = float(self.normalizer.mean[g])
            stats[f"groups/reward_std_{name}"] = float(self.normalizer.std[g])
        stats["groups/selected"] = int(np.argmax(result.weights))
        if cfg.target_kl is not None:
            # Ziegler et al.'s proportional controller (TRL's AdaptiveKLController).
            error = float(np.clip(mean_kl / cfg.target_kl - 1.0, -0.2, 0.2))
            self.kl_coef *= 1.0 + error * cfg.batch_size / cfg.kl_horizon
        self.iteration += 1
        stats["time/iterations"] = self.iteration
        for key, value in stats.items():
            self.logger.record(key, value)
        self.logger.dump(self.iteration)
        self.history.append(stats)
        return stats

    def _gae(self, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE over tokens: ``(advantages, returns)``, each ``(B, R)``; advantages whitened over the batch if asked.

        Positions after a completion's end have reward 0 and value 0, so they add nothing.
        """
        cfg = self.config
        advantages = torch.zeros_like(rewards)
        next_advantage = torch.zeros_like(rewards[:, 0])
        next_value = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            delta = rewards[:, t] + cfg.gamma * next_value - values[:, t]
            next_advantage = delta + cfg.gamma * cfg.gae_lambda * next_advantage
            advantages[:, t] = next_advantage
            next_value = values[:, t]
        returns = advantages + values
        if cfg.whitens:
            count = self._sum(mask.sum())
            mean = self._sum((advantages * mask).sum()) / count
            var = self._sum((((advantages - mean) * mask) ** 2).sum()) / count
            advantages = (advantages - mean) * torch.rsqrt(var + 1e-8)
        return advantages * mask, returns

    def _critic_free_advantages(self, rewards: np.ndarray) -> np.ndarray:
        """``(n_prompts, k)`` advantages from ``(n_prompts, k)`` sequence rewards of k completions per prompt."""
        k = rewards.shape[1]
        if self.config.advantage == "rloo":
            # Leave-one-out: each completion against the mean of the prompt's k - 1 others.
            advantages = rewards - (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
            return advantages / (advantages.std() + 1e-8) if self.config.whitens else advantages
        return (rewards - rewards.mean(axis=1, keepdims=True)) / (rewards.std(axis=1, keepdims=True) + 1e-4)

    @property
    def single_pass(self) -> bool:
        """True for GRPO with one gradient step per batch (``n_epochs == 1``, ``minibatch_size == batch_size``).

        Then the update's forward pass runs on the rollout policy itself, so its detached log-probs
        are the old log-probs (ratio 1, as TRL's GRPO with ``num_iterations=1``) and a separate
        no-grad pass would compute the same numbers again. GRPO's KL is a loss term, so no
        advantage needs the policy's log-probs before that pass.
        """
        cfg = self.config
        return cfg.advantage == "grpo" and cfg.n_epochs == 1 and cfg.minibatch_size == cfg.batch_size

    def _update(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        mask: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        old_values: torch.Tensor | None,
        ref_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
    ) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor] | None]:
        """``n_epochs`` of clipped PPO over minibatches.

        All per-row tensors are ``(B_local, R)``; ``old_logprobs`` is None in :attr:`single_pass`
        mode. A minibatch's loss is its token sum divided by the minibatch's token count over all
        processes, times the number of processes, because data-parallel training averages the
        processes' gradients.

        :return: the mean losses (``losses/*``), and in :attr:`single_pass` mode the pre-step
            ``(logprobs, entropy)`` of the batch, each ``(B_local, R)``.
        """
        cfg = self.config
        local_minibatch = cfg.minibatch_size // self.accelerator.num_processes
        n_local = prompt_ids.shape[0]
        first_pass = None
        totals: dict[str, list[torch.Tensor]] = {"policy_loss": [], "value_loss": [], "kl_loss": [], "approx_kl": [], "clip_fraction": []}
        for epoch in range(cfg.n_epochs):
            order = np.random.default_rng([cfg.seed, self.iteration, epoch]).permutation(n_local)
            for start in range(0, n_local, local_minibatch):
                idx = torch.as_tensor(order[start : start + local_minibatch], device=mask.device)
                mb_mask = mask[idx]
                scale = self.accelerator.num_processes / self._sum(mb_mask.sum()).clamp(min=1.0)
                logprobs, values, entropy = self.policy(
                    prompt_ids[idx], prompt_mask[idx], response_ids[idx], cfg.temperature, with_entropy=old_logprobs is None
                )
                if old_logprobs is None:
                    old = logprobs.detach()
                    first_pass = (torch.empty_like(old), torch.empty_like(old))
                    first_pass[0][idx], first_pass[1][idx] = old, entropy
                else:
                    old = old_logprobs[idx]
                log_ratio = logprobs - old
                ratio = torch.exp(log_ratio)
                adv = advantages[idx]
                policy_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range))
                policy_loss = (policy_losses * mb_mask).sum() * scale
                loss = policy_loss
                if values is not None:
                    old_v = old_values[idx]
                    clipped = values if cfg.clip_range_vf is None else old_v + (values - old_v).clamp(-cfg.clip_range_vf, cfg.clip_range_vf)
                    value_losses = torch.max((values - returns[idx]) ** 2, (clipped - returns[idx]) ** 2)
                    value_loss = 0.5 * (value_losses * mb_mask).sum() * scale
                    loss = loss + cfg.vf_coef * value_loss
                    totals["value_loss"].append(value_loss.detach())
                if cfg.advantage == "grpo":
                    # GRPO's per-token KL estimator (k3, unbiased and >= 0): exp(d) - d - 1 with d = log ref - log pi.
                    delta = ref_logprobs[idx] - logprobs
                    kl_loss = ((torch.exp(delta) - delta - 1.0) * mb_mask).sum() * scale
                    loss = loss + self.kl_coef * kl_loss
                    totals["kl_loss"].append(kl_loss.detach())
                self.optimizer.zero_grad()
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    # Scaled token sums: their sum over processes is the minibatch's token mean.
                    totals["policy_loss"].append(policy_loss.detach())
                    totals["approx_kl"].append((((ratio - 1) - log_ratio) * mb_mask).sum() * scale)
                    totals["clip_fraction"].append((((ratio - 1).abs() > cfg.clip_range).float() * mb_mask).sum() * scale)
        processes = self.accelerator.num_processes
        losses = {f"losses/{key}": float(self._sum(torch.stack(values).mean())) / processes for key, values in totals.items() if values}
        return losses, first_pass

    # ------------------------------------------------------------------ the loop
    def learn(
        self,
        total_iterations: int,
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1,
        snapshot_dir: str | os.PathLike[str] | None = None,
        progress_bar: bool = False,
    ) -> MaxMinLMPPO:
        """Train until ``total_iterations`` iterations are done (counting those of a resumed run) or ``kl_budget`` is spent.

        :param total_iterations: iterations (one batch of completions and one PPO update each) in all, at most.
        :param checkpoint_dir: saves a checkpoint here every ``checkpoint_every`` iterations and at the
            end; if it already holds one, training resumes from it (after a kill, say).
        :param checkpoint_every: iterations between checkpoints.
        :param snapshot_dir: also keep the policy of every iteration here (:meth:`save_snapshot`), so that
            methods can later be compared at one KL from the base model, not only at their last iteration.
        :param progress_bar: show a tqdm bar (main process only).
        """
        if checkpoint_dir is not None and self.latest_checkpoint(checkpoint_dir) is not None:
            self.load(checkpoint_dir)
        bar = tqdm(
            total=total_iterations,
            initial=self.iteration,
            disable=not progress_bar or not self.accelerator.is_main_process,
            desc="MaxMinLMPPO",
        )
        while self.iteration < total_iterations and not self.kl_budget_spent:
            stats = self.train_iteration()
            bar.update(1)
            bar.set_postfix(
                {name: f"{stats[f'charts/score_{name}']:.3g}" for name in self.group_names} | {"kl": f"{stats['charts/kl']:.2f}"}
            )
            last = self.iteration == total_iterations or self.kl_budget_spent
            if snapshot_dir is not None:
                self.save_snapshot(snapshot_dir)
            if checkpoint_dir is not None and (self.iteration % checkpoint_every == 0 or last):
                self.save(checkpoint_dir)
        bar.close()
        return self

    @property
    def kl_budget_spent(self) -> bool:
        """Whether the mean KL of the last ``kl_budget_window`` batches reached ``kl_budget`` (never, without one)."""
        cfg = self.config
        if cfg.kl_budget is None or len(self.history) < cfg.kl_budget_window:
            return False
        return float(np.mean([row["charts/kl"] for row in self.history[-cfg.kl_budget_window :]])) >= cfg.kl_budget

    # ------------------------------------------------------------------ persistence
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The LM's trainable parameters (LoRA adapters, or every weight when fully fine-tuned)."""
        return {name: p.detach().contiguous().cpu() for name, p in self.model.named_parameters() if p.requires_grad}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint: tensors in safetensors, everything else in JSON, no pickle.

        ``path/iteration_<n>/`` holds ``policy.safetensors`` (trainable LM weights: the
        adapters, or all weights when fully fine-tuned), ``value_head.safetensors`` (``"gae"``),
        ``optimizer.safetensors`` (Adam's moments) and ``trainer.json`` (config, iteration,
        KL coefficient, group names, rule and normaliser state, logged history). Only when the
        folder is complete does ``path/latest.json`` (written atomically) point to it, and older
        folders are removed: a kill at any moment leaves the previous checkpoint readable.

        :return: the folder of this checkpoint.
        """
        path = Path(path)
        folder = path / f"iteration_{self.iteration:06d}"
        if self.accelerator.is_main_process:
            state = self.optimizer.state_dict()
            files = {
                "policy": self._trainable_state(),
                "optimizer": {
                    f"{index}.{key}": torch.as_tensor(value).contiguous().cpu()
                    for index, entry in state["state"].items()
                    for key, value in entry.items()
                },
            }
            if self.value_head is not None:
                files["value_head"] = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
            for name, tensors in files.items():
                write_atomic(folder / f"{name}.safetensors", lambda handle, t=tensors: handle.write(safetensors_save(t)))
            trainer_state = {
                "format": CHECKPOINT_FORMAT,
                "iteration": self.iteration,
                "kl_coef": self.kl_coef,
                "config": asdict(self.config),
                "group_names": self.group_names,
                "aggregation": self.aggregation.name,
                "aggregation_config": self.aggregation.config(),
                "aggregation_state": {k: np.asarray(v).tolist() for k, v in self.aggregation.state_dict().items()},
                "normalizer_state": None
                if self.normalizer is None
                else {k: np.asarray(v).tolist() for k, v in self.normalizer.state_dict().items()},
                "fit_normalizer_on_first_batch": self.fit_normalizer_on_first_batch,
                "optimizer_param_groups": state["param_groups"],
                "history": self.history,
            }
            save_json_atomic(trainer_state, folder / "trainer.json")
            save_json_atomic({"folder": folder.name, "iteration": self.iteration}, path / "latest.json")
            for old in path.glob("iteration_*"):
                if old.name != folder.name:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return folder

    def save_snapshot(self, folder: str | os.PathLike[str]) -> Path:
        """Write this iteration's policy weights (adapters, or all trainable weights) to ``folder/iteration_<n>.safetensors``.

        Only the policy (no optimizer or trainer state: a snapshot is judged, not resumed); written
        atomically, and unlike checkpoints every one is kept. :meth:`snapshots` lists them.
        """
        path = Path(folder) / f"iteration_{self.iteration:06d}.safetensors"
        if self.accelerator.is_main_process:
            tensors = self._trainable_state()
            write_atomic(path, lambda handle: handle.write(safetensors_save(tensors)))
        self.accelerator.wait_for_everyone()
        return path

    @staticmethod
    def snapshots(folder: str | os.PathLike[str]) -> dict[int, Path]:
        """Iteration -> file of every snapshot :meth:`save_snapshot` wrote to ``folder``, in order."""
        files = sorted(Path(folder).glob("iteration_*.safetensors"))
        return {int(f.name.removeprefix("iteration_").removesuffix(".safetensors")): f for f in files}

    @staticmethod
    def latest_checkpoint(path: str | os.PathLike[str]) -> Path | None:
        """The folder ``path/latest.json`` points to, or None if ``path`` holds no checkpoint."""
        pointer = Path(path) / "latest.json"
        if not pointer.exists():
            return None
        return Path(path) / json.loads(pointer.read_text())["folder"]

    def load(self, path: str | os.PathLike[str]) -> MaxMinLMPPO:
        """Restore the latest checkpoint that :meth:`save` wrote to ``path`` into this trainer.

        The trainer must have been built around the same model architecture (and LoRA set-up);
        the checkpoint's config, rule, normaliser, iteration and history replace this trainer's.
        """
        folder = self.latest_checkpoint(path)
        if folder is None:
            raise FileNotFoundError(f"{path} holds no checkpoint (no latest.json)")
        state = json.loads((folder / "trainer.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{folder}: checkpoint format {state.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
        policy = load_file(str(folder / "policy.safetensors"))
        own = dict(self.model.named_parameters())
        missing, unknown = sorted(set(self._trainable_state()) - set(policy)), sorted(set(policy) - set(own))
        if missing or unknown:
            raise ValueError(f"{folder}: checkpoint does not fit this model: missing {missing[:5]}, unknown {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in policy.items():
                own[name].copy_(tensor)
        if self.value_head is not None:
            self.value_head.load_state_dict(load_file(str(folder / "value_head.safetensors")))
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(folder / "optimizer.safetensors")).items():
            index, name = key.split(".", 1)
            optimizer_state.setdefault(int(index), {})[name] = tensor
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["optimizer_param_groups"]})

        self.config = LMPPOConfig(**state["config"])
        self.config.check(self.accelerator.num_processes)
        self.group_names = state["group_names"]
        self.aggregation = make_aggregation(state["aggregation"], **state["aggregation_config"])
        self.aggregation.load_state_dict({k: np.asarray(v) for k, v in state["aggregation_state"].items()})
        if state["normalizer_state"] is not None:
            self.normalizer = GroupRewardNormalizer(len(self.group_names))
            self.normalizer.load_state_dict({k: np.asarray(v) for k, v in state["normalizer_state"].items()})
        self.fit_normalizer_on_first_batch = state["fit_normalizer_on_first_batch"]
        self.iteration, self.kl_coef, self.history = state["iteration"], state["kl_coef"], state["history"]
        return self
