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

__all__ = [
    "CONTINUE_REVIEW",
    "DEFAULT_MODEL",
    "LoraSettings",
    "ModelLoadError",
    "apply_lora",
    "format_prompts",
    "gpt2_tokenizer",
    "load_causal_lm",
    "load_smollm2",
    "load_tokenizer",
    "tiny_gpt2",
]
