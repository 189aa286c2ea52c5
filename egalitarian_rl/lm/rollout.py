"""Rollouts of a causal LM: batched KV-cached sampling, then log-probs and values in one forward pass.

Three pieces, each usable on its own:

* :func:`left_pad` puts tokenised prompts of different lengths into one
  ``(B, P)`` batch, padded on the left so every prompt ends at the same column
  and generation appends to all of them at once.
* :func:`sample_completions` generates ``R`` new tokens for the whole batch with
  the model's KV cache (one forward pass of one token per step, never the
  whole prefix again). Row ``i`` draws its randomness from its own generator,
  so a row's completion does not depend on which other rows share its batch:
  a batch split over 2 processes samples what 1 process samples.
* :func:`score_tokens` runs ONE forward pass over the finished ``(B, P + R)``
  sequences and returns each response token's log-probability at the sampling
  temperature (so PPO's ratios are exact), the entropy, and the trunk's last
  hidden state (for a value head).

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``R`` response
tokens, ``V`` vocabulary size, ``H`` hidden size.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import nn

__all__ = [
    "LogProbs",
    "left_pad",
    "position_ids",
    "response_mask",
    "row_generators",
    "sample_completions",
    "score_tokens",
]


def left_pad(token_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token id lists into one left-padded batch.

    :param token_ids: ``B`` lists of prompt token ids, each non-empty.
    :param pad_token_id: the id written into padding positions (they are masked out anyway).
    :return: ``(input_ids, attention_mask)``, both ``(B, P)`` int64 with ``P`` the longest prompt;
        ``attention_mask`` is 1 on real tokens and 0 on padding.
    """
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if len(ids):
            input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: the first real token of every row is position 0.

    Generation and scoring must use the same positions, or the forward pass over
    the finished sequences would not reproduce the sampling distribution.

    :param attention_mask: ``(B, T)`` 1 on real tokens.
    :return: ``(B, T)`` int64.
    """
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def row_generators(key: Sequence[int], rows: Sequence[int] | range) -> list[torch.Generator]:
    """One independent random generator per global row index of one batch.

    Seeds come from :class:`numpy.random.SeedSequence` over ``(*key, row)`` (e.g.
    ``key = (0, seed, iteration)``), so the stream of row ``i`` is the same whichever
    process samples it and whichever iteration a run was resumed at.

    :param key: non-negative integers naming the batch.
    :param rows: the global indices of the rows to sample.
    """
    generators = []
    for row in rows:
        state = np.random.SeedSequence([*key, int(row)]).generate_state(2, dtype=np.uint32)
        generators.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return generators


@cache
def _cache_argument(model_class: type) -> str:
    # transformers >= 5 calls the KV cache argument ``cache``; earlier versions ``past_key_values``.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (whose forward only shows ``**kwargs``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _output_cache(output: object) -> object:
    cache_ = getattr(output, "cache", None)
    return cache_ if cache_ is not None else output.past_key_values  # type: ignore[attr-defined]


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    generators: Sequence[torch.Generator],
    eos_token_id: int | None,
    pad_token_id: int,
    stop_at_eos: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``max_new_tokens`` tokens per row from ``softmax(logits / temperature)`` with a KV cache.

    Sampling is the Gumbel-max trick (``argmax(logits / T + Gumbel noise)``), exactly
    a draw from the tempered softmax, with row ``i``'s noise from ``generators[i]``.
    After a row has produced EOS it receives ``pad_token_id`` (the rows keep one
    width); :func:`response_mask` masks those positions.

    :param model: a causal LM taking ``input_ids``, ``attention_mask``, ``position_ids``
        and a KV cache (any transformers ``*ForCausalLM``, optionally peft-wrapped).
    :param input_ids: ``(B, P)`` left-padded prompts.
    :param attention_mask: ``(B, P)`` 1 on real prompt tokens.
    :param max_new_tokens: ``R``, the most tokens generated per row.
    :param temperature: > 0; the same value must be used in :func:`score_tokens`.
    :param generators: ``B`` generators (see :func:`row_generators`).
    :param eos_token_id: the end-of-sequence id, or None for none.
    :param pad_token_id: written after a row's EOS.
    :param stop_at_eos: stop early once every row has ended (False: always ``R`` steps; benchmarks).
    :return: ``(response_ids, sample_logprobs)``, both ``(B, R')`` with ``R' <= R``: the tokens and
        their log-probabilities under the sampling distribution (for checks; training
        recomputes them in one pass with :func:`score_tokens`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(generators) != input_ids.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {input_ids.shape[0]} rows")
    cache_argument = _cache_argument(type(_base_model(model)))
    batch = input_ids.shape[0]
    attention = attention_mask.clone()
    output = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids(attention), use_cache=True, logits_to_keep=1)
    next_position = attention.sum(-1, keepdim=True)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        logits = output.logits[:, -1].float() / temperature
        uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in generators]).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform))  # uniform == 0 gives -inf: that token is never drawn
        token = torch.argmax(logits + gumbel, dim=-1)
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1))
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= token == eos_token_id
        tokens.append(token)
        if step == max_new_tokens - 1 or (stop_at_eos and bool(finished.all())):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        output = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=next_position,
            use_cache=True,
            **{cache_argument: _output_cache(output)},
        )
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


def response_mask(response_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1.0 on the response tokens that count: up to and including the first EOS, 0.0 after it.

    :param response_ids: ``(B, R)``.
    :return: ``(B, R)`` float32. A row without EOS counts all ``R`` tokens.
    """
    if eos_token_id is None:
        return torch.ones_like(response_ids, dtype=torch.float32)
    is_eos = (response_ids == eos_token_id).long()
    # Tokens strictly after the first EOS have at least one EOS before them.
    return ((is_eos.cumsum(-1) - is_eos) == 0).float()


@dataclass
class LogProbs:
    """What one forward pass over finished sequences gives.

    :param logprobs: ``(B, R)`` log-probability of each response token at the sampling temperature.
    :param entropy: ``(B, R)`` entropy of the tempered next-token distribution, or None if not asked.
    :param hidden: ``(B, R, H)`` the trunk's last hidden state at the position that predicted
        each response token (the value head's input), or None if not asked.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def score_tokens(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    temperature: float,
    *,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> LogProbs:
    """Log-probs (and optionally entropy and hidden states) of the response tokens, in ONE forward pass.

    The language-model head runs only on the ``R`` positions that predict
    response tokens (``logits_to_keep``), not on the prompt.

    :param model: the causal LM (policy or reference).
    :param prompt_ids: ``(B, P)`` left-padded prompts.
    :param prompt_mask: ``(B, P)`` 1 on real prompt tokens.
    :param response_ids: ``(B, R)`` sampled tokens (padding after EOS included; mask it afterwards).
    :param temperature: the sampling temperature: logits are divided by it.
    :param with_entropy: also return the entropy (one more ``(B, R, V)`` pass, without gradient).
    :param with_hidden: also return the last hidden states for a value head.
    """
    response_length = response_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(response_ids)], dim=1)
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_length + 1,
        output_hidden_states=with_hidden,
        use_cache=False,
    )
    # Position t predicts token t + 1: the last R + 1 positions minus the final one predict the response.
    logits = output.logits[:, -response_length - 1 : -1].float() / temperature
    log_normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, response_ids[..., None]).squeeze(-1) - log_normaliser
    entropy = None
    if with_entropy:  # a diagnostic: never part of a loss, so no graph through the (B, R, V) softmax
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            entropy = log_normaliser - (probs * logits).sum(-1)
    hidden = output.hidden_states[-1][:, -response_length - 1 : -1] if with_hidden else None
    return LogProbs(logprobs=logprobs, entropy=entropy, hidden=hidden)
