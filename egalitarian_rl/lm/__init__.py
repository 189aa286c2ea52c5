"""Causal language models as policies: loading, rollouts and LM PPO on the same aggregation rules."""

from egalitarian_rl.lm.models import (
    CONTINUE_REVIEW,
    DEFAULT_MODEL,
    LoraSettings,
    ModelLoadError,
    apply_lora,
    format_prompts,
    gpt2_tokenizer,
    load_causal_lm,
    load_smollm2,
    load_tokenizer,
    tiny_gpt2,
)
from egalitarian_rl.lm.ppo import GroupScoreFn, LMPPOConfig, MaxMinLMPPO
from egalitarian_rl.lm.rollout import sample_completions, score_tokens

__all__ = [
    "CONTINUE_REVIEW",
    "DEFAULT_MODEL",
    "GroupScoreFn",
    "LMPPOConfig",
    "LoraSettings",
    "MaxMinLMPPO",
    "ModelLoadError",
    "apply_lora",
    "format_prompts",
    "gpt2_tokenizer",
    "load_causal_lm",
    "load_smollm2",
    "load_tokenizer",
    "sample_completions",
    "score_tokens",
    "tiny_gpt2",
]
