"""Speed of MaxMinLMPPO's rollouts and policy-update steps, against ``model.generate`` and TRL, side by side in one run.

Same model, batch, prompt and completion lengths everywhere. Completions are
always ``NEW_TOKENS`` long (EOS suppressed in ``generate`` and TRL with
``min_new_tokens``; ours with no EOS id), so every contender generates the same tokens.

* Rollout: :func:`~egalitarian_rl.lm.rollout.sample_completions` (our KV-cached
  sampler) vs plain ``model.generate(do_sample=True)``:
  ``rollout_ratio = rollout_tokens_per_s / generate_tokens_per_s`` (target >= 0.9).
  ``rollout_with_scoring_tokens_per_s`` adds what a training rollout also does:
  one policy forward (log-probs, entropy, values) and one reference forward.
* Step: one full iteration (generate, score, reference, loss, backward, Adam step)
  of our critic-free trainer (``advantage="grpo"``, 4 completions per prompt,
  1 epoch, 1 minibatch) vs one step of TRL's ``GRPOTrainer`` with the same
  settings (``beta`` = our ``kl_coef``, ``num_iterations=1``): ``trl_ratio =
  critic_free_step_seconds / trl_step_seconds`` (target <= 1.0). TRL >= 1.0 has no
  PPO trainer, so our token-level PPO step (``advantage="gae"``: value head, GAE,
  1 epoch, 1 minibatch) is reported against the same TRL GRPO step as
  ``ppo_step_seconds`` / ``trl_ratio_ppo``, for scale, not like for like.

Blocks run interleaved (ours GRPO, ours PPO, TRL, repeated ``--rounds`` times, one
warm-up step each); the medians are compared. 1 torch thread everywhere. Times are
the process's CPU seconds: on this shared 2-core machine wall-clock step times swung
3x with other users' load; wall-clock medians and ratios are reported beside them.

``trl`` is not a dependency of the package: ``make bench`` installs it (the ``bench`` extra), or by hand:

    .venv/bin/python -m pip install trl==1.16.0
    .venv/bin/python -m benchmarks.lm_speed [--rounds 2] [--steps 3] [--tiny]

Writes ``benchmarks/results/lm_speed.json`` and a line in ``benchmarks/RESULTS.md``.
``--quick``: the tiny GPT-2, 1 round of 1 timed step per block (``results/quick/``; still needs trl).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import BenchmarkParser, write_result

NAME = "lm_speed"
TRL_PIN = "trl==1.16.0"
BATCH = 8
GENERATIONS = 4  # completions per prompt for the critic-free step (TRL's num_generations)
PROMPT_TOKENS = 32
NEW_TOKENS = 32
TEMPERATURE = 0.7
KL_COEF = 0.05
LEARNING_RATE = 1e-6


def clocks() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds). On a shared machine the CPU time of a 1-thread run
    hardly depends on what else runs; the wall time does (3x swings were seen here)."""
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def load_model(tiny: bool) -> tuple[Any, Any, str]:
    """The embedded SmolLM2-135M-Instruct, or the tiny GPT-2 when asked or when SmolLM2 cannot be loaded."""
    if not tiny:
        try:
            from egalitarian_rl.lm.models import load_smollm2

            model, tokenizer = load_smollm2()
            return model, tokenizer, "SmolLM2-135M-Instruct (embedded, float32)"
        except Exception as error:  # any reason: fall back and say so in the results
            print(f"SmolLM2 unavailable ({error}); using the tiny GPT-2", file=sys.stderr)
    from egalitarian_rl.lm.models import tiny_gpt2

    model, tokenizer = tiny_gpt2(seed=0)
    return model, tokenizer, "tiny GPT-2 (2 layers, 64 wide, GPT-2 vocabulary)"


def make_prompts(tokenizer: Any, n: int) -> list[str]:
    """``n`` prompts of exactly ``PROMPT_TOKENS`` tokens each (random common words)."""
    rng = np.random.default_rng(0)
    words = ["the", "movie", "was", "good", "and", "I", "think", "this", "film", "is", "not", "bad", "but", "very", "long", "story"]
    prompts = []
    while len(prompts) < n:
        text = "".join(" " + w for w in rng.choice(words, PROMPT_TOKENS)).strip()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
        text = tokenizer.decode(ids)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == PROMPT_TOKENS:
            prompts.append(text)
    return prompts


def group_scores(prompts: list[str], completions: list[str]) -> np.ndarray:
    """Two cheap groups (scoring is not what is measured): words, and minus characters."""
    return np.array([[len(c.split()), -len(c)] for c in completions], dtype=float)


def trl_reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c.split())) for c in completions]


# --------------------------------------------------------------------------- rollouts
def time_rollouts(model: Any, tokenizer: Any, prompts: list[str], rounds: int) -> dict[str, float]:
    from egalitarian_rl.lm.rollout import left_pad, row_generators, sample_completions, score_tokens

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[:BATCH]]
    input_ids, attention_mask = left_pad(ids, tokenizer.pad_token_id)
    reference = copy.deepcopy(model)
    head = torch.nn.Linear(model.config.hidden_size, 1)

    def ours() -> torch.Tensor:
        response, _ = sample_completions(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=NEW_TOKENS,
            temperature=TEMPERATURE,
            generators=row_generators((0, 0), range(BATCH)),
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        return response

    def generate() -> torch.Tensor:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=0,
            top_p=1.0,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[:, input_ids.shape[1] :]

    def ours_with_scoring() -> None:
        response = ours()
        with torch.no_grad():
            policy = score_tokens(model, input_ids, attention_mask, response, TEMPERATURE, with_entropy=True, with_hidden=True)
            head(policy.hidden)
            score_tokens(reference, input_ids, attention_mask, response, TEMPERATURE)

    times: dict[str, list[tuple[float, float]]] = {"ours": [], "generate": [], "ours_with_scoring": []}
    for fn in (ours, generate):  # warm-up
        assert fn().shape == (BATCH, NEW_TOKENS)
    for _ in range(rounds * 2):
        for name, fn in (("ours", ours), ("generate", generate), ("ours_with_scoring", ours_with_scoring)):
            start = clocks()
            fn()
            times[name].append(elapsed(start))
    tokens = BATCH * NEW_TOKENS
    cpu = {name: statistics.median(t[1] for t in values) for name, values in times.items()}
    wall = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
    result = {
        "rollout_tokens_per_s": tokens / cpu["ours"],
        "generate_tokens_per_s": tokens / cpu["generate"],
        "rollout_with_scoring_tokens_per_s": tokens / cpu["ours_with_scoring"],
        "rollout_ratio": cpu["generate"] / cpu["ours"],
        "rollout_ratio_wall": wall["generate"] / wall["ours"],
        "rollout_seconds_wall_cpu": times,
    }
    return result


# --------------------------------------------------------------------------- policy-update steps
def time_ours(model: Any, tokenizer: Any, prompts: list[str], advantage: str, steps: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per iteration of our trainer (after one warm-up iteration)."""
    from egalitarian_rl.lm import MaxMinLMPPO

    trainer = MaxMinLMPPO(
        copy.deepcopy(model),
        tokenizer,
        prompts,
        group_scores,
        aggregation="worst_group",
        advantage=advantage,
        completions_per_prompt=GENERATIONS if advantage != "gae" else 1,
        batch_size=BATCH,
        minibatch_size=BATCH,
        n_epochs=1,
        max_new_tokens=NEW_TOKENS,
        temperature=TEMPERATURE,
        kl_coef=KL_COEF,
        learning_rate=LEARNING_RATE,
    )
    trainer.eos_token_id = None  # every completion NEW_TOKENS long, like min_new_tokens in the others
    seconds = []
    for step in range(steps + 1):
        start = clocks()
        trainer.train_iteration()
        if step:
            seconds.append(elapsed(start))
    del trainer
    gc.collect()
    return seconds


def time_trl(model_dir: str, tokenizer: Any, prompts: list[str], steps: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per step of TRL's GRPOTrainer (after one warm-up step), timed by a callback around each step.

    :param model_dir: the model saved with ``save_pretrained``: TRL loads its reference model from a path.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[tuple[float, float]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = clocks()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.seconds.append(elapsed(self.start))

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=BATCH,
            num_generations=GENERATIONS,
            max_completion_length=NEW_TOKENS,
            temperature=TEMPERATURE,
            top_k=0,
            top_p=1.0,
            generation_kwargs={"min_new_tokens": NEW_TOKENS},
            beta=KL_COEF,
            num_iterations=1,
            gradient_accumulation_steps=1,
            learning_rate=LEARNING_RATE,
            max_steps=steps + 1,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            disable_dropout=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=model_dir,
            reward_funcs=trl_reward,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
        del trainer
    gc.collect()
    return timer.seconds[1:]


def main() -> None:
    parser = BenchmarkParser(__doc__.split("\n")[0], quick_defaults={"tiny": True, "rounds": 1, "steps": 1})
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (ours GRPO, ours PPO, TRL)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block (after 1 warm-up step)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny GPT-2 instead of SmolLM2")
    args = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        print(
            f"trl is not installed (not a dependency of egalitarian-rl); for this benchmark:\n  {sys.executable} -m pip install {TRL_PIN}"
        )
        sys.exit(2)
    import trl

    torch.set_num_threads(1)
    model, tokenizer, model_name = load_model(args.tiny)
    model.eval()
    prompts = make_prompts(tokenizer, 64)
    print(f"{model_name}; batch {BATCH}, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens", flush=True)

    rollout = time_rollouts(model, tokenizer, prompts, args.rounds)
    print({k: v for k, v in rollout.items() if not k.endswith("seconds")}, flush=True)
    model_dir = tempfile.mkdtemp(prefix="lm_speed_model_")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    blocks: dict[str, list[tuple[float, float]]] = {"critic_free": [], "ppo": [], "trl": []}
    for round_ in range(args.rounds):
        blocks["critic_free"] += time_ours(model, tokenizer, prompts, "grpo", args.steps)
        blocks["ppo"] += time_ours(model, tokenizer, prompts, "gae", args.steps)
        blocks["trl"] += time_trl(model_dir, tokenizer, prompts, args.steps)
        print(f"round {round_}: " + ", ".join(f"{k} {statistics.median(t[1] for t in v):.2f} CPU s" for k, v in blocks.items()), flush=True)

    cpu = {k: statistics.median(t[1] for t in v) for k, v in blocks.items()}
    wall = {k: statistics.median(t[0] for t in v) for k, v in blocks.items()}
    critic_free, ppo, trl_step = cpu["critic_free"], cpu["ppo"], cpu["trl"]
    result = {
        "model": model_name,
        "batch": BATCH,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "temperature": TEMPERATURE,
        "torch_threads": 1,
        "trl_version": trl.__version__,
        "clock": "medians of process CPU seconds (1 torch thread; robust to other load on a shared machine); *_wall: wall-clock medians",
        **rollout,
        "critic_free_step_seconds": critic_free,
        "ppo_step_seconds": ppo,
        "trl_step_seconds": trl_step,
        "trl_ratio": critic_free / trl_step,
        "trl_ratio_ppo": ppo / trl_step,
        "step_seconds_wall": wall,
        "trl_ratio_wall": wall["critic_free"] / wall["trl"],
        "step_seconds_wall_cpu": blocks,
        "load_average_1min_at_end": os.getloadavg()[0],
        "comparison": (
            "trl_ratio: our critic-free step (advantage='grpo', 4 completions per prompt) / TRL GRPOTrainer step, "
            "same settings; trl_ratio_ppo: our token-level PPO step (value head, GAE) / the same TRL GRPO step "
            "(TRL >= 1.0 ships no PPO trainer). One step = generate, score, reference forward, loss, backward, Adam step."
        ),
    }
    result["passed"] = bool(result["rollout_ratio"] >= 0.9 and result["trl_ratio"] <= 1.0)
    summary = (
        f"{model_name.split(' (')[0]}, batch {BATCH}, {PROMPT_TOKENS}+{NEW_TOKENS} tokens, 1 thread: rollout "
        f"{result['rollout_tokens_per_s']:.0f} tok/s vs generate {result['generate_tokens_per_s']:.0f} "
        f"(ratio {result['rollout_ratio']:.2f}); "
        f"step (CPU s): ours GRPO {critic_free:.1f}, ours PPO {ppo:.1f}, TRL {trl.__version__} GRPOTrainer {trl_step:.1f} "
        f"(ratio {result['trl_ratio']:.2f}, PPO {result['trl_ratio_ppo']:.2f})"
    )
    shutil.rmtree(model_dir, ignore_errors=True)
    path = write_result(NAME, result, summary, "rollout_ratio >= 0.9, trl_ratio <= 1.0", quick=args.quick)
    print(summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
