"""Loading causal LMs: tiny GPT-2, local folders, the offline error, pad tokens, LoRA, chat prompts, embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from egalitarian_rl.lm import (
    CONTINUE_REVIEW,
    DEFAULT_MODEL,
    LoraSettings,
    ModelLoadError,
    format_prompts,
    gpt2_tokenizer,
    load_causal_lm,
    load_smollm2,
    load_tokenizer,
    tiny_gpt2,
)
from egalitarian_rl.lm.models import CACHE_ENV_VAR, _build_cached_folder

torch.set_num_threads(1)

# A minimal chat template, so chat formatting is tested without SmolLM2.
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    """Where converted models live: ``$EGALITARIAN_RL_CACHE`` if set, else pytest's persistent cache.

    Persistent so the ~25 s SmolLM2 conversion happens once, not on every run.
    """
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    if getattr(pytestconfig, "cache", None) is None:  # pytest run with -p no:cacheprovider
        return tmp_path_factory.mktemp("egalitarian_rl_models")
    return Path(pytestconfig.cache.mkdir("egalitarian_rl_models"))


@pytest.fixture(scope="module")
def tiny(model_cache: Path):
    return tiny_gpt2(cache_dir=model_cache)


@pytest.fixture
def tiny_folder(tiny, tmp_path: Path) -> Path:
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_tiny_gpt2_has_the_real_gpt2_vocabulary(tiny):
    _, tokenizer = tiny
    assert len(tokenizer) == 50257
    # GPT-2's own ids for these words (from the published vocab.json).
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_tiny_gpt2_is_deterministic_and_leaves_the_global_rng_alone(tiny, model_cache):
    model, _ = tiny
    state = torch.random.get_rng_state()
    same, _ = tiny_gpt2(seed=0, cache_dir=model_cache)
    other, _ = tiny_gpt2(seed=1, cache_dir=model_cache)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert not torch.equal(model.transformer.wte.weight, other.transformer.wte.weight)
    assert not model.training


def test_tiny_gpt2_generates_from_a_left_padded_batch(tiny):
    model, tokenizer = tiny
    batch = tokenizer(["Hello", "The movie was great"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # padded on the left
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_load_causal_lm_from_a_local_folder(tiny, tiny_folder):
    model, tokenizer = load_causal_lm(str(tiny_folder), offline=True)
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert torch.equal(model.transformer.wte.weight, tiny[0].transformer.wte.weight)
    assert tokenizer.pad_token_id == 50256 and tokenizer.padding_side == "left"


@pytest.mark.parametrize("how", ["offline=True", "HF_HUB_OFFLINE"])
def test_unreachable_hub_model_is_one_clear_error(how, monkeypatch):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        offline = None
    else:
        offline = True
    with pytest.raises(ModelLoadError, match=r"cannot load 'no-such-org/no-such-model' offline: not a local folder") as caught:
        load_causal_lm("no-such-org/no-such-model", offline=offline)
    # One line, and no chained hub traceback behind it.
    assert "\n" not in str(caught.value)
    assert caught.value.__suppress_context__ and caught.value.__cause__ is None
    with pytest.raises(ModelLoadError, match="offline"):
        load_tokenizer("no-such-org/no-such-model", offline=offline)


def test_a_folder_without_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"cannot load '.*' from its folder: ") as caught:
        load_causal_lm(str(tmp_path))
    assert "\n" not in str(caught.value)


def test_tokenizer_without_pad_token_needs_pad_with_eos(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    # Strip the pad token from the saved tokenizer, as GPT-2 on the hub ships.
    stripped = load_tokenizer(str(tmp_path))
    stripped.pad_token = None
    stripped.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="has no pad token; pass pad_with_eos=True"):
        load_causal_lm(str(tmp_path))
    _, padded = load_causal_lm(str(tmp_path), pad_with_eos=True)
    assert padded.pad_token_id == padded.eos_token_id == 50256


def test_lora_adapter_trains_only_the_adapter(tiny_folder):
    model, _ = load_causal_lm(str(tiny_folder), lora={"r": 4, "alpha": 8})
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # peft's default for GPT-2 adapts the fused attention projection.
    assert all(".c_attn." in name for name in trainable)
    ids = torch.tensor([[15496, 995]])
    assert model(input_ids=ids).logits.shape == (1, 2, 50257)


def test_lora_with_explicit_targets_and_a_bad_target(tiny_folder):
    model, _ = load_causal_lm(str(tiny_folder), lora=LoraSettings(r=2, target_modules=("c_fc",)))
    assert any(".c_fc.lora_A" in name for name, _ in model.named_parameters())
    with pytest.raises(ModelLoadError, match="cannot apply LoRA"):
        load_causal_lm(str(tiny_folder), lora=LoraSettings(target_modules=("no_such_layer",)))


def test_format_prompts(tiny, model_cache):
    _, tokenizer = tiny
    assert format_prompts(tokenizer, ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="has no chat template"):
        format_prompts(tokenizer, ["a"], chat_template=True)
    tokenizer = gpt2_tokenizer(model_cache)  # a fresh copy: the shared one keeps no chat template
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    assert format_prompts(tokenizer, ["hi"], chat_template=True) == ["<|user|>hi<|assistant|>"]
    assert format_prompts(tokenizer, ["The film"], chat_template=CONTINUE_REVIEW) == [
        '<|user|>Continue this movie review: "The film"<|assistant|>'
    ]
    with pytest.raises(ValueError, match="must contain"):
        format_prompts(tokenizer, ["hi"], chat_template="no field")


def test_cache_folder_is_never_left_half_written(tmp_path):
    def failing_build(folder: Path) -> None:
        (folder / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build_cached_folder(tmp_path / "model", failing_build)
    assert list(tmp_path.iterdir()) == []
    built = _build_cached_folder(tmp_path / "model", lambda folder: (folder / "ok").write_text("1"))
    assert (built / "ok").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.slow
def test_embedded_smollm2_loads_offline_from_its_cache_and_generates(model_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(CACHE_ENV_VAR, str(model_cache))
    model, tokenizer = load_causal_lm(DEFAULT_MODEL)  # converts on the first run, then reloads the cache
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    cached = [p for p in model_cache.iterdir() if p.name.startswith("smollm2")]
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"

    prompt = format_prompts(tokenizer, ["The acting was wonderful and"], chat_template=CONTINUE_REVIEW)
    assert prompt[0].rstrip().endswith("<|im_start|>assistant")
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > batch["input_ids"].shape[1] and text.strip()

    # A second load reads the converted folder (no GGUF dequantisation) and gives the same weights.
    again, _ = load_smollm2(model_cache)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert load_tokenizer(DEFAULT_MODEL)("Hello")["input_ids"] == tokenizer("Hello")["input_ids"]
