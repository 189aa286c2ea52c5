"""A toy text task for tests, benchmarks and the multi-process check: a tiny LM and two conflicting groups.

A randomly initialised model spreads its mass over GPT-2's 50,257 tokens, so a
reward on text would almost never see the tokens it cares about. A pretrained
LM concentrates its mass on a few common words; :func:`toy_lm` gives the tiny
GPT-2 of :func:`~egalitarian_rl.lm.models.tiny_gpt2` that shape (most of the
mass on :data:`TOY_WORDS` and EOS), so text rewards have signal in seconds.

Groups (:func:`toy_group_scores`): ``good`` counts the word "good"; ``concise``
is minus the number of tokens. More "good" needs more tokens: they conflict,
and an untrained model can improve both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

from egalitarian_rl.lm.models import tiny_gpt2

__all__ = ["TOY_GROUPS", "TOY_PROMPTS", "TOY_WORDS", "toy_group_scores", "toy_lm"]

#: Words the toy model favours (each one GPT-2 token with its leading space).
TOY_WORDS = (
    "good",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "it",
    "that",
    "this",
    "for",
    "with",
    "as",
    "on",
    "film",
    "movie",
    "but",
    "not",
)
TOY_PROMPTS = ("The movie was", "I think this film", "Overall, the plot", "My friend said", "The actors", "In the end")
TOY_GROUPS = ("good", "concise")


def toy_lm(seed: int = 0, logit_boost: float = 6.0, **tiny_kwargs: int) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """``tiny_gpt2`` whose next-token distribution favours :data:`TOY_WORDS` and EOS, as a pretrained LM's favours common words.

    The final layer norm's bias points along a random unit direction ``u`` (length
    ``logit_boost``) and the favoured tokens' embeddings get ``+u``: their logits rise by
    about ``logit_boost`` in every context.

    :param seed: seeds the weights and ``u``.
    :param logit_boost: how much more likely the favoured tokens are (in logits).
    :param tiny_kwargs: passed to :func:`tiny_gpt2` (``n_layer``, ``n_embd``, ...).
    """
    model, tokenizer = tiny_gpt2(seed=seed, **tiny_kwargs)
    favoured = [tokenizer.encode(" " + word)[0] for word in TOY_WORDS] + [tokenizer.eos_token_id]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        direction = torch.randn(model.config.n_embd, generator=generator)
        direction /= direction.norm()
        model.transformer.ln_f.bias.copy_(logit_boost * direction)
        model.transformer.wte.weight[favoured] += direction
    return model, tokenizer


def toy_group_scores(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str], list[str]], np.ndarray]:
    """``(prompts, completions) -> (n, 2)``: the number of words "good", and minus the number of tokens."""

    def scores(prompts: list[str], completions: list[str]) -> np.ndarray:
        return np.array([[text.split().count("good"), -len(tokenizer.encode(text))] for text in completions], dtype=float)

    return scores
