"""MaxMinLMPPO under ``accelerate launch``: 2 CPU processes must train what 1 process trains.

Runs the toy task (:mod:`egalitarian_rl.lm.toy`) for a few iterations, once in
one process and once under ``accelerate launch --cpu --num_processes 2``, with
the same seeds and the same global batch, for the PPO (``gae``) and the
critic-free (``rloo``; ``grpo`` with one gradient step per batch) advantages, and compares every logged statistic and
every trained weight. Each process samples half the rows (each row from its
own random stream), scores are gathered before normalising and aggregating,
and gradients are averaged over the processes; only float rounding may differ.
The minibatch is the whole batch here: with smaller minibatches each process
shuffles its own rows, so minibatches differ from the 1-process run's (the
gradient in expectation does not).

Too slow for the unit-test suite (two interpreter start-ups with torch,
transformers and accelerate on a shared 2-core CPU), so it is a script:

    .venv/bin/python -m benchmarks.lm_accelerate

Writes ``benchmarks/results/lm_accelerate.json`` and a line in ``benchmarks/RESULTS.md``.
``--quick``: 1 iteration per variant instead of 3 (``results/quick/``; the two start-ups are most of the time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "lm_accelerate"
ITERATIONS = 3
SETTINGS = {
    "aggregation": "worst_group",
    "batch_size": 8,
    "minibatch_size": 8,
    "n_epochs": 2,
    "max_new_tokens": 8,
    "learning_rate": 3e-3,
    "kl_coef": 0.05,
}
VARIANTS = {
    "gae": {},
    "rloo": {"advantage": "rloo", "completions_per_prompt": 2},
    "grpo_single_pass": {"advantage": "grpo", "completions_per_prompt": 2, "n_epochs": 1},
}
TOLERANCE = 1e-4


def worker(out: Path, iterations: int = ITERATIONS) -> None:
    """Train every variant in this process (one of ``accelerate launch``'s, or alone); rank 0 writes the results."""
    import torch
    from safetensors.torch import save_file

    from egalitarian_rl.lm import MaxMinLMPPO
    from egalitarian_rl.lm.toy import TOY_GROUPS, TOY_PROMPTS, toy_group_scores, toy_lm

    torch.set_num_threads(1)
    for variant, extra in VARIANTS.items():
        model, tokenizer = toy_lm(seed=0)
        trainer = MaxMinLMPPO(
            model, tokenizer, list(TOY_PROMPTS), toy_group_scores(tokenizer), group_names=list(TOY_GROUPS), **{**SETTINGS, **extra}
        )
        trainer.learn(iterations)
        if trainer.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{variant}.json").write_text(json.dumps({"processes": trainer.accelerator.num_processes, "history": trainer.history}))
            save_file({k: v.detach().contiguous() for k, v in trainer.model.named_parameters()}, str(out / f"{variant}.safetensors"))
        trainer.accelerator.wait_for_everyone()


def compare(one: Path, two: Path) -> dict:
    from safetensors.torch import load_file

    result = {}
    for variant in VARIANTS:
        a, b = (json.loads((folder / f"{variant}.json").read_text()) for folder in (one, two))
        assert (a["processes"], b["processes"]) == (1, 2), (a["processes"], b["processes"])
        stat_diff = max(abs(x[key] - y[key]) for x, y in zip(a["history"], b["history"]) for key in x)
        wa, wb = (load_file(str(folder / f"{variant}.safetensors")) for folder in (one, two))
        weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        moved = max(float((wa[k] - w0).abs().max()) for k, w0 in _initial_weights().items())
        result[variant] = {"max_stat_diff": stat_diff, "max_weight_diff": weight_diff, "max_weight_change": moved}
    return result


def _initial_weights() -> dict:
    from egalitarian_rl.lm.toy import toy_lm

    return {k: v.detach() for k, v in toy_lm(seed=0)[0].named_parameters()}


def main() -> None:
    from benchmarks.common import BenchmarkParser, write_result

    parser = BenchmarkParser(__doc__.split("\n")[0], quick_defaults={"iterations": 1})
    parser.add_argument("--iterations", type=int, default=ITERATIONS, help="training iterations per variant")
    parser.add_argument("--worker", type=Path, help="internal: train and write results to this folder")
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.iterations)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        start = time.perf_counter()
        worker_args = ["-m", "benchmarks.lm_accelerate", "--iterations", str(args.iterations), "--worker"]
        subprocess.run([sys.executable, *worker_args, str(one)], check=True, env=env)
        seconds_one = time.perf_counter() - start
        # --multi_gpu is accelerate's multi-process launcher (torchrun); on a machine without GPUs the processes run on the CPU.
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        launch += ["--mixed_precision", "no", "--dynamo_backend", "no", *worker_args, str(two)]
        start = time.perf_counter()
        subprocess.run(launch, check=True, env=env)
        seconds_two = time.perf_counter() - start
        diffs = compare(one, two)

    passed = all(
        d["max_stat_diff"] <= TOLERANCE and d["max_weight_diff"] <= TOLERANCE and d["max_weight_change"] > 10 * TOLERANCE
        for d in diffs.values()
    )
    result = {
        "iterations": args.iterations,
        "settings": SETTINGS,
        "variants": diffs,
        "tolerance": TOLERANCE,
        "seconds_one_process": seconds_one,
        "seconds_two_processes": seconds_two,
        "passed": passed,
    }
    summary = ", ".join(
        f"{v}: max stat diff {d['max_stat_diff']:.1e}, max weight diff {d['max_weight_diff']:.1e} (moved {d['max_weight_change']:.1e})"
        for v, d in diffs.items()
    )
    summary = f"toy task, {args.iterations} iterations, 1 vs 2 CPU processes: {summary}"
    path = write_result(NAME, result, summary, f"diffs <= {TOLERANCE:g}", quick=args.quick)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
