"""MaxMin-RLHF vs single-reward RLHF on IMDB prompts with the embedded SmolLM2-135M-Instruct, over seeds.

Runs the shipped ``imdb`` config (:mod:`egalitarian_rl.experiments.lm_pipeline`) once per seed:
96 training prompts x 6 base-model completions (asked for one short sentence; 32 new tokens at
most, temperature 0.7), 60 simulated users per population (80/20 and 90/10 positive_review/concise,
Bradley-Terry beta 5, 80 comparisons each), the single BT reward and a K=2 EM mixture (heads with
64 hidden units on frozen MiniLM embeddings plus the log word count), then PPO (batch 16
= 4 prompts x 4 completions, RLOO advantages scaled to unit std, LoRA r16, lr 5e-4, KL coefficient 0.1) until the
mean KL of the last 3 batches reaches 5 nats per completion or 32 iterations are done, for each of ``rlhf``,
``maxmin`` (``worst_group``, the paper's return-level rule, on averaged selections) and ``maxmin_per_sample_min``
(the released code's rule, as on FairGrid) from the same start, the groups' learned scores z-scored with their
statistics over the pool's 576 base completions; judged on all 48 held-out prompts (2 completions
each) by the groups' TRUE scores. Prompts: IMDB review openings that read negative (VADER compound of the
8 words at most -0.3, ``prompts.max_sentiment``; 3,677 of the 25,000 reviews).

The run on record is run 15, pre-registered in f809bfe: six seeds (44-49) judged together, every arm judged at one KL
from the base model (``evaluate.match_kl``). Training stops each arm once the mean KL of its last 3 training batches
reaches 5 nats (at most 32 iterations) but keeps every iteration's policy; each arm is judged at the iteration whose KL
on 16 validation prompts (held out after the 48 judged ones, never judged) is nearest the smallest last-iteration
validation KL of the three arms. ``maxmin`` is ``worst_group`` trained on the running average of its selections
(``train.aggregation_kwargs: {average: true, warmup: 4}``); ``per_sample_min`` is the secondary arm. Rule fixed before
the run: the issue is met only if both win-rate lines hold as the mean over all six seeds (``lm_imdb.json`` marks
``all_planned_seeds`` false until all six are in; the six take about 2 x 75 min here).

Result (2026-12-05): FAIL on the minority, the majority holds. Held-out KL of the judged policies rlhf 6.4, maxmin 6.4,
per_sample_min 6.1; MaxMin vs RLHF concise 0.556 (seeds 0.31, 0.57, 0.83, 0.65, 0.46, 0.52), positive_review 0.492;
``per_sample_min`` 0.555 / 0.418; EM ARI 1.00; held-out concise accuracy single 0.56, mixture 0.73. Runs 1-14, each
with its design, the reason for it and its per-seed numbers, are in ``docs/lm_imdb_runs.md``; their results are kept
under ``history`` in ``lm_imdb.json``, and each run's pre-registration is the benchmark's docstring at the commit the
run names there.

The win-rates in the JSON are the mean over seeds of each seed's win-rate over its 48 prompts
(MaxMin seed s against RLHF seed s); every seed's own numbers are kept under ``seeds``.

Each seed runs in its own process (``--jobs``, one torch thread each) under
``runs/imdb_seed_<s>``; every stage, method and PPO iteration is saved, so a killed run resumes.
The JSON is written each time a seed finishes. Three seeds in three processes share the two
cores best (``--jobs 3``).

    nohup .venv/bin/python -m benchmarks.lm_imdb --seeds 44 45 46 47 48 49 --jobs 3 > runs/lm_imdb.log 2>&1 &

Writes ``benchmarks/results/lm_imdb.json`` and a line in ``benchmarks/RESULTS.md``.

``--quick`` checks that the benchmark runs end to end in a few minutes; its numbers are not the claims
and it is not part of the pre-registration: seed 0, the shipped ``imdb_quick`` config made smaller
still (:data:`QUICK`: 12 training and 4 held-out prompts, 16 new tokens, 10 users per population,
methods ``rlhf`` and ``maxmin``, 2 PPO iterations of 8 completions), under ``runs/quick/imdb_seed_0``;
it writes ``benchmarks/results/quick/lm_imdb.json`` and a line in ``benchmarks/results/quick/RESULTS.md``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BenchmarkParser, run_in_processes, runs_dir, write_result
from egalitarian_rl.experiments.lm_pipeline import LMExperimentConfig, LMPipeline

NAME = "lm_imdb"
MAJORITY, MINORITY = "positive_review", "concise"
SEEDS = (44, 45, 46, 47, 48, 49)
EVAL_PROMPTS = 48
#: Held-out prompts after the judged ones on which ``evaluate.match_kl`` measures each snapshot's KL (never judged).
VALIDATION_PROMPTS = 16
#: Per-method measures of the replies averaged over seeds beside the scores.
REPLY_MEASURES = (
    "iterations", "judged_iteration", "kl", "validation_kl", "mean_length_tokens", "ended_fraction", "distinct_2", "repeated_replies",
)  # fmt: skip
#: Earlier pre-registered runs of this benchmark and why the design changed after them.
HISTORY = [
    {
        "seeds": [1, 2, 3],
        "design": "chat template 'Continue this movie review: \"{prompt}\"', 3 completions per prompt, 40 comparisons per user",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.53, "positive": 0.43},
        "maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.51, "positive": 0.43},
        "em_ari": 1.0,
        "passed": False,
        "why": "every reply ran to the 32-token limit (4-6% ended), so conciseness barely varied: the concise users' "
        "true scores predicted only 0.69 of their answers and no arm changed reply length",
    },
    {
        "seeds": [4, 5, 6],
        "design": "the current prompt ('in one short sentence'), 6 completions per prompt, 80 comparisons per user; "
        "maxmin = worst_group, 1 evaluation completion per held-out prompt",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.628, "positive": 0.448},
        "maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.632, "positive": 0.483},
        "em_ari": 1.0,
        "passed": False,
        "why": "the majority's win-rate missed 0.45 by 0.002. worst_group picks the group by the mean learned reward "
        "of a 16-completion batch, whose standard error (~0.25 z-units) is as large as the gaps it compares, so its "
        "selections flip at random (seed 4 trained 8 of 11 iterations on the majority, seeds 5 and 6 8 of 11 on the "
        "minority); per_sample_min, the rule FairGrid already uses, kept both groups. Next run: maxmin = "
        "per_sample_min, 4 evaluation completions per prompt, new seeds 7-9",
    },
    {
        "seeds": [7, 8, 9],
        "design": "maxmin = per_sample_min, 4 evaluation completions per held-out prompt, 11 PPO iterations at learning rate 2e-4",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.545, "positive": 0.457},
        "maxmin_worst_group_win_rate_vs_rlhf": {"concise": 0.576, "positive": 0.449},
        "em_ari": 1.0,
        "passed": False,
        "why": "the minority's win-rate missed 0.60 (seeds 0.62, 0.59, 0.42; s.e. over seeds 0.06, over prompts "
        "0.015): the training seed outweighed the rule. Each PPO update moved the policy by an approximate KL of "
        "~0.001 (clip fraction ~0.02), so after 11 iterations the arms had drifted ~1 nat from the base model and "
        "RLHF's own drift (seed 9 shortened its replies) decided the comparison",
    },
    {
        "seeds": [11, 12, 13],
        "design": "majority positive_review (VADER of the prompt and reply together), maxmin = per_sample_min, "
        "2 evaluation completions per held-out prompt, 11 PPO iterations at learning rate 2e-4",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.576, "positive_review": 0.454},
        "maxmin_worst_group_win_rate_vs_rlhf": {"concise": 0.568, "positive_review": 0.470},
        "em_ari": 1.0,
        "passed": False,
        "why": "the minority's win-rate missed 0.60 (seeds 0.53, 0.61, 0.59; s.e. over seeds 0.022): no seed went "
        "against the minority any more, but at lr 2e-4 the arms moved only ~1 nat from the base model in 11 "
        "iterations (replies: base 20.8 tokens, RLHF 18.8, MaxMin 16.6), too little for the rule to open a margin",
    },
    {
        "seeds": [14, 15, 16],
        "design": "run 4's design with reward heads of 64 hidden units (single reward and EM members); GAE advantages, "
        "lr 2e-4, groups z-scored with the first 16-completion batch's statistics",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.329, "positive_review": 0.490},
        "maxmin_worst_group_win_rate_vs_rlhf": {"concise": 0.347, "positive_review": 0.518},
        "em_ari": 1.0,
        "passed": False,
        "why": "the nonlinear single reward made RLHF itself concise (14.5 tokens against the base model's 21.7, KL 2.0) "
        "while MaxMin stayed near the base length (19.1 tokens) and moved less (KL 0.6-1.8 against RLHF's 1.0-3.1): "
        "with GAE's untrained value head and a 16-completion normaliser, which arm moved was a matter of the seed. "
        "Next run: RLOO advantages (4 completions per prompt), lr 5e-4 and the pool's statistics as the normaliser, "
        "seeds 17-19",
    },
    {
        "seeds": [17, 18, 19],
        "design": "RLOO advantages over 4 completions per prompt, lr 5e-4, 11 PPO iterations, the groups' learned scores "
        "z-scored with their statistics over the pool's 576 base completions",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.640, "positive_review": 0.384},
        "maxmin_worst_group_win_rate_vs_rlhf": {"concise": 0.608, "positive_review": 0.385},
        "em_ari": 1.0,
        "passed": False,
        "why": "the majority's win-rate missed 0.45 (seeds 0.36, 0.46, 0.33) while the minority's met 0.60 (0.72, 0.54, "
        "0.66): MaxMin shortened its replies (15.1 tokens, RLHF 18.6) but hardly raised positivity (0.14, RLHF 0.29, "
        "base 0.11). Unwhitened RLOO gave the per-sample min, which spreads less within a prompt than the single "
        "reward (0.75 against 0.90), smaller steps: MaxMin's KL 2.6 against RLHF's 3.6, and the seeds' majority "
        "win-rates followed that gap. Next run: advantages scaled to unit std, 16 iterations, seeds 20-22",
    },
    {
        "seeds": [20, 21, 22],
        "design": "run 6's design with RLOO advantages scaled to unit std over the batch and 16 PPO iterations",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.490, "positive_review": 0.509},
        "maxmin_worst_group_win_rate_vs_rlhf": {"concise": 0.494, "positive_review": 0.410},
        "em_ari": 1.0,
        "passed": False,
        "why": "the minority's win-rate missed 0.60 (seeds 0.17, 0.57, 0.73) with the majority met and the arms' movement "
        "equal (KL 4.4 against RLHF's 5.2): on seed 20 RLHF answered 'Awesome.' to 73% of the prompts (KL 7.2), close to "
        "the best both groups can get, since a one-word positive reply scored nearly as high for the majority as a long "
        "one. Next run: openings that read negative (VADER <= -0.3), so positivity needs words; seeds 23-25",
    },
    {
        "seeds": [23, 24, 25],
        "design": "run 7's design on IMDB openings that read negative (VADER compound of the 8 words <= -0.3)",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.679, "positive_review": 0.408},
        "maxmin_worst_group_win_rate_vs_rlhf": {"concise": 0.811, "positive_review": 0.506},
        "em_ari": 0.975,
        "passed": False,
        "why": "the majority's win-rate missed 0.45 (seeds 0.14, 0.39, 0.70) with the minority met (0.90, 0.23, 0.91): the "
        "groups now conflicted (RLHF kept 14.2 tokens and raised positivity from -0.47 to 0.07, KL 9.7) and per_sample_min "
        "shortened its replies (8.9 tokens) with less positivity (-0.14). worst_group, the secondary arm, met both lines "
        "(0.811 / 0.506). Next run: maxmin = worst_group, per_sample_min secondary; seeds 26-28",
    },
    {
        "seeds": [26, 27, 28],
        "design": "run 8's design with maxmin = worst_group (the paper's rule) and per_sample_min the secondary arm",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.731, "positive_review": 0.399},
        "maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.762, "positive_review": 0.352},
        "em_ari": 1.0,
        "passed": False,
        "why": "the majority's win-rate missed 0.45 (seeds 0.09, 0.53, 0.58) with the minority met (0.77, 0.68, 0.74). "
        "The seeds split by drift: on seed 26 RLHF went to KL 9.9 (positivity 0.46, 22.7 tokens) while worst_group moved "
        "2.0 nats; on seeds 27-28 the arms moved about as far. Over runs 8-9 the MaxMin arm-seeds where RLHF ended 5-8 "
        "nats further gave the majority 0.07-0.39, the rest 0.40-0.70. Next run: every arm's KL coefficient steered to "
        "6 nats (target_kl 6, kl_horizon 16); seeds 29-31",
    },
    {
        "seeds": [29, 30, 31],
        "design": "run 9's design with every arm's KL coefficient adaptive (target_kl 6, kl_horizon 16)",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.342, "positive_review": 0.200},
        "maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.710, "positive_review": 0.462},
        "em_ari": 1.0,
        "passed": False,
        "why": "both lines missed (worst_group seeds: concise 0.24, 0.03, 0.76; positive_review 0.28, 0.08, 0.24). While "
        "an arm's KL was below 6 the controller cut its coefficient by up to 20% an iteration (RLHF seed 29: 0.1 -> 0.026 "
        "by iteration 7), so the brake was gone before the budget was reached: RLHF ended at KL 9.2 with 94-95% of its "
        "replies one stock reply on seeds 29-30, per_sample_min at KL 21.4 on seed 29. Next run: a budget that only "
        "stops (kl_budget 5, coefficient fixed at 0.1); seeds 32-34",
    },
    {
        "seeds": [32, 33, 34],
        "design": "run 9's design with the KL coefficient fixed at 0.1 and every arm stopped once the mean KL of its "
        "last 3 batches reaches 5 nats (kl_budget 5), at most 24 iterations",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.740, "positive_review": 0.482},
        "maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.609, "positive_review": 0.474},
        "em_ari": 1.0,
        "passed": True,
        "why": "passed every line (worst_group seeds: concise 0.56, 0.89, 0.77; positive_review 0.40, 0.50, 0.54); "
        "held-out KL rlhf 7.2, worst_group 7.2, per_sample_min 7.5; every arm leaned on stock replies (43-70% repeated). "
        "A first pass after ten designs could be luck: replicated on seeds 35-37 (run 12)",
    },
    {
        "seeds": [35, 36, 37],
        "design": "run 11's design unchanged (a replication), run 11's seeds resumed so the JSON held all six",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.421, "positive_review": 0.356},
        "maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.690, "positive_review": 0.434},
        "six_seed_maxmin_win_rate_vs_rlhf": {"concise": 0.580, "positive_review": 0.419},
        "six_seed_maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.650, "positive_review": 0.454},
        "em_ari": 1.0,
        "passed": False,
        "why": "not replicated (worst_group seeds: concise 0.60, 0.26, 0.40; positive_review 0.48, 0.19, 0.40). Plain "
        "worst_group moved slowly (21-24 iterations, RLHF 14-19): on seed 36 it never reached the budget (KL 3.5 against "
        "RLHF's 6.5) and lost both groups. Per seed over the six, worst_group's KL minus RLHF's ordered the outcome "
        "(+1.0: 0.54 / 0.77 ... -3.0: 0.19 / 0.26). Next run: worst_group on averaged selections (a steady direction) "
        "and at most 32 iterations; seeds 38-40",
    },
    {
        "seeds": [38, 39, 40],
        "design": "run 12's design with maxmin = worst_group on the running average of its selections (aggregation_kwargs "
        "{average: true, warmup: 4}) and at most 32 iterations",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.883, "positive_review": 0.556},
        "maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.826, "positive_review": 0.441},
        "em_ari": 1.0,
        "passed": True,
        "why": "passed every line (worst_group averaged seeds: concise 0.96, 0.98, 0.71; positive_review 0.43, 0.73, 0.51); "
        "it reached the budget in 10-18 iterations; held-out KL rlhf 6.1, maxmin 6.7; MaxMin's replies short and 44-71% "
        "repeated across prompts. Replicated on seeds 41-43 (run 14)",
    },
    {
        "seeds": [41, 42, 43],
        "design": "run 13's design unchanged (a replication), run 13's seeds resumed so the JSON held all six",
        "maxmin_win_rate_vs_rlhf": {"concise": 0.671, "positive_review": 0.255},
        "maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.682, "positive_review": 0.329},
        "six_seed_maxmin_win_rate_vs_rlhf": {"concise": 0.777, "positive_review": 0.405},
        "six_seed_maxmin_per_sample_min_win_rate_vs_rlhf": {"concise": 0.754, "positive_review": 0.385},
        "em_ari": 1.0,
        "passed": False,
        "why": "not replicated, the majority missed (worst_group averaged seeds: concise 0.92, 0.51, 0.59; positive_review "
        "0.33, 0.18, 0.26). On seeds 42-43 MaxMin ended 1.5-2.4 nats closer to the base model than RLHF (held-out KL 4.4 / "
        "4.5 against 6.8 / 5.9). Over runs 11-14 (24 arm-seed pairs of both MaxMin rules) the majority's win-rate rose by "
        "0.063 per nat of the arm's held-out KL minus RLHF's (r 0.69); at equal KL the line gives 0.45 (seed bootstrap "
        "0.39-0.50). Next run: every arm judged at one KL (evaluate.match_kl), six new seeds 44-49",
    },
]


#: ``--quick``: sections of the shipped ``imdb_quick`` config replaced (key by key) to make it smaller still.
QUICK = {
    "prompts": {"n_train": 12, "n_eval": 4},
    "model": {"max_new_tokens": 16, "batch_size": 12},
    # the benchmark's groups (the shipped imdb_quick config, which make demo-lm runs, keeps positive)
    "collect": {
        "n_users": 10,
        "comparisons_per_user": 12,
        "populations": [{MAJORITY: 0.8, MINORITY: 0.2}, {MAJORITY: 0.9, MINORITY: 0.1}],
    },
    "train": {
        "methods": ["rlhf", "maxmin"],
        "iterations": 2,
        "ppo": {"batch_size": 8, "minibatch_size": 8, "n_epochs": 1, "learning_rate": 0.0002, "kl_coef": 0.1},
    },
}
QUICK_SEED = 0


def seed_config(seed: int) -> LMExperimentConfig:
    """The shipped ``imdb`` config for one seed, judged on all its held-out prompts."""
    config = LMExperimentConfig.from_yaml(Path(str(resources.files("egalitarian_rl.experiments") / "configs" / "imdb.yaml")))
    config.seed = seed
    config.out_dir = f"runs/imdb_seed_{seed}"
    config.evaluate.max_prompts = EVAL_PROMPTS
    config.evaluate.validation_prompts = VALIDATION_PROMPTS
    if config.prompts.n_eval < EVAL_PROMPTS + VALIDATION_PROMPTS:
        raise ValueError(f"imdb.yaml's prompts.n_eval must be >= {EVAL_PROMPTS + VALIDATION_PROMPTS} (judged + validation prompts)")
    return config


def quick_config(seed: int) -> LMExperimentConfig:
    """``--quick``'s config for one seed: ``imdb_quick`` with :data:`QUICK`, under ``runs/quick/imdb_seed_<s>``."""
    raw = LMExperimentConfig.from_yaml(Path(str(resources.files("egalitarian_rl.experiments") / "configs" / "imdb_quick.yaml"))).to_dict()
    for section, values in QUICK.items():
        raw[section] = {**raw[section], **values}
    raw["seed"], raw["out_dir"] = seed, str(runs_dir(f"runs/imdb_seed_{seed}", quick=True))
    return LMExperimentConfig.from_dict(raw)


def maxmin_rule(config: LMExperimentConfig) -> str:
    """``maxmin``'s rule as the reports name it, with its arguments: ``worst_group average=True warmup=4``."""
    return " ".join([config.train.aggregation, *(f"{k}={v}" for k, v in config.train.aggregation_kwargs.items())])


def run_seed(seed: int, quick: bool = False) -> dict[str, Any]:
    """Every stage of one seed (resuming); returns its metrics."""
    config = quick_config(seed) if quick else seed_config(seed)
    _, metrics = LMPipeline(config, log=lambda line: print(f"[seed {seed}] {line}", flush=True)).run()
    return metrics


def main() -> None:
    parser = BenchmarkParser(__doc__.split("\n")[0], quick="imdb_quick made smaller (QUICK)", quick_defaults={"seeds": [QUICK_SEED]})
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once, one process and one torch thread each")
    args = parser.parse_args()
    finished: dict[int, dict[str, Any]] = {}
    for (seed, _), metrics in run_in_processes(run_seed, [(seed, args.quick) for seed in args.seeds], args.jobs):
        finished[seed] = metrics
        if args.quick:
            write_quick(quick_config(seed), {s: finished[s] for s in sorted(finished)})
        else:
            write(seed_config(seed), {s: finished[s] for s in sorted(finished)}, args.seeds)


def mean_over_seeds(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Each method's scores, win-rates and KL averaged over seeds (win-rate s.e. from the seeds' own)."""
    runs = list(per_seed.values())
    methods = {}
    for method in runs[0]["methods"]:
        rows = [run["methods"][method] for run in runs]
        groups = {}
        for group in rows[0]["groups"]:
            cells = [row["groups"][group] for row in rows]
            groups[group] = {
                "mean_score": float(np.mean([c["mean_score"] for c in cells])),
                "win_rate_vs_rlhf": float(np.mean([c["win_rate_vs_rlhf"] for c in cells])),
                # the seeds' prompt sets are independent, so their standard errors add in quadrature
                "win_rate_se": float(np.sqrt(sum(c["win_rate_se"] ** 2 for c in cells)) / len(cells)),
                # ... but that is only the prompts' sampling noise: training seeds differ far more
                # (seeds 7-9: 0.42-0.62 with a prompt s.e. of 0.01), so the seeds' own spread is kept too.
                "win_rate_seed_se": float(np.std([c["win_rate_vs_rlhf"] for c in cells], ddof=1) / np.sqrt(len(cells)))
                if len(cells) > 1
                else 0.0,
                "seed_win_rates": [c["win_rate_vs_rlhf"] for c in cells],
            }
        methods[method] = {
            "groups": groups,
            # judged_iteration / validation_kl exist only with evaluate.match_kl (not in --quick)
            **{key: float(np.mean([row[key] for row in rows])) for key in REPLY_MEASURES if key in rows[0]},
        }
    accuracy = {fit: mean_over_seeds([run["heldout_accuracy"][fit] for run in runs]) for fit in runs[0]["heldout_accuracy"]}
    return {"methods": methods, "em_ari": float(np.mean([run["em_ari"] for run in runs])), "heldout_accuracy": accuracy}


#: The issue's acceptance lines that the scores decide (RESULTS.md's target column).
TARGET = "minority win-rate >= 0.60, majority >= 0.45, EM ARI >= 0.9, single < mixture on minority"


def acceptance(merged: dict[str, Any]) -> dict[str, bool]:
    """Each line of :data:`TARGET` checked on :func:`aggregate`'s output."""
    maxmin, accuracy = merged["methods"]["maxmin"]["groups"], merged["heldout_accuracy"]
    return {
        "minority_win_rate>=0.60": maxmin[MINORITY]["win_rate_vs_rlhf"] >= 0.60,
        "majority_win_rate>=0.45": maxmin[MAJORITY]["win_rate_vs_rlhf"] >= 0.45,
        "em_ari>=0.9": merged["em_ari"] >= 0.9,
        "single_minority_accuracy<mixture": accuracy["single"][MINORITY] < accuracy["mixture"][MINORITY],
    }


def write(config: LMExperimentConfig, per_seed: dict[int, dict[str, Any]], planned: list[int]) -> None:
    """``results/lm_imdb.json`` and the RESULTS.md line from the seeds finished so far."""
    merged = aggregate(per_seed)
    methods, acc = merged["methods"], merged["heldout_accuracy"]
    maxmin = methods["maxmin"]["groups"]
    done = sorted(per_seed)
    passes = {**acceptance(merged), "all_planned_seeds": done == sorted(planned)}
    result = {
        "config": config.to_dict() | {"seed": done, "out_dir": "runs/imdb_seed_<s>"},
        **merged,
        "seeds": {
            str(seed): {
                "em_ari": run["em_ari"],
                "heldout_accuracy": run["heldout_accuracy"],
                "reward_fit": run["reward_fit"],
                "warnings": run["warnings"],
                "methods": {
                    m: {key: row.get(key) for key in ("groups", "kl", "iterations", "judged_iteration", "validation_kl")}
                    for m, row in run["methods"].items()
                },
            }
            for seed, run in per_seed.items()
        },
        "paper": "GPT-2 on IMDB (Chakraborty et al. 2024): MaxMin +16% average win-rate, +33% for the minority",
        "note": (
            f"maxmin ({maxmin_rule(config)}), the evaluation and the seeds {list(SEEDS)} were fixed before this run; "
            "seeds 0 and 10 (design trials, including seed 0's lr 5e-4 and 1e-3 trials and run 6's RLOO trials), "
            "the lr-1e-3 trial retraining of "
            "seeds 7 and 9, and the earlier runs' seeds (under history) are not included. "
            f"Win-rates: mean over seeds of each seed's win-rate over {EVAL_PROMPTS} held-out "
            "prompts against the same seed's RLHF; reports are in runs/imdb_seed_<s>/report.md."
        ),
        "history": HISTORY,
        "passes": passes,
        "passed": all(passes.values()),
    }
    # Three decimals: the targets are compared unrounded (0.448 fails ">= 0.45" though it prints as 0.45 at two).
    seed_rates = ", ".join(f"{r:.2f}" for r in maxmin[MINORITY]["seed_win_rates"])
    # the other MaxMin arm (maxmin_<rule>), reported beside the pre-registered one
    other = next((m for m in methods if m.startswith("maxmin_")), None)
    other_groups = methods[other]["groups"] if other else None
    ppo = config.train.ppo
    budget = (
        f"PPO until {ppo['kl_budget']:g} nats (at most {config.train.iterations} it; mean it/method "
        + ", ".join(f"{m} {row['iterations']:.1f}" for m, row in methods.items() if m != "base")
        + "), "
        if ppo.get("kl_budget")
        else f"{config.train.iterations} PPO it/method, "
    )
    summary = (
        f"SmolLM2-135M, seeds {done}, {budget}80/20 {MAJORITY}/{MINORITY}, {EVAL_PROMPTS} held-out "
        f"prompts x {config.evaluate.completions_per_prompt} completions/seed: maxmin ({maxmin_rule(config)}) "
        f"win-rate vs RLHF {MINORITY} {maxmin[MINORITY]['win_rate_vs_rlhf']:.3f} "
        f"(s.e. over seeds {maxmin[MINORITY]['win_rate_seed_se']:.2f}, over prompts {maxmin[MINORITY]['win_rate_se']:.2f}; "
        f"seeds {seed_rates}) / {MAJORITY} {maxmin[MAJORITY]['win_rate_vs_rlhf']:.3f}"
        + (
            f"; {other.removeprefix('maxmin_')} {other_groups[MINORITY]['win_rate_vs_rlhf']:.3f} / "
            f"{other_groups[MAJORITY]['win_rate_vs_rlhf']:.3f}"
            if other
            else ""
        )
        + f"; KL rlhf {methods['rlhf']['kl']:.1f}, maxmin {methods['maxmin']['kl']:.1f}; EM ARI {merged['em_ari']:.2f}; "
        f"held-out acc {MINORITY} single {acc['single'][MINORITY]:.2f} vs mixture {acc['mixture'][MINORITY]:.2f} "
        f"(paper: minority +33%). `python -m benchmarks.lm_imdb --seeds {' '.join(map(str, done))} --jobs 3`"
    )
    write_result(NAME, result, summary, TARGET)
    print(json.dumps({"seeds": done, "methods": methods, "em_ari": merged["em_ari"], "passes": passes}, indent=2), flush=True)


def write_quick(config: LMExperimentConfig, per_seed: dict[int, dict[str, Any]]) -> None:
    """``results/quick/lm_imdb.json`` and its line in ``results/quick/RESULTS.md`` for a ``--quick`` run (no pre-registration, no claim)."""
    merged = aggregate(per_seed)
    maxmin = merged["methods"]["maxmin"]["groups"]
    minority, majority = maxmin[MINORITY]["win_rate_vs_rlhf"], maxmin[MAJORITY]["win_rate_vs_rlhf"]
    result = {"config": config.to_dict() | {"seed": sorted(per_seed)}, **merged, "passed": all(acceptance(merged).values())}
    summary = (
        f"--quick (imdb_quick made smaller): {config.model.name}, seeds {sorted(per_seed)}, {config.train.iterations} PPO it/method, "
        f"{config.prompts.n_eval} held-out prompts: maxmin ({maxmin_rule(config)}) win-rate vs RLHF {MINORITY} {minority:.2f} / "
        f"{MAJORITY} {majority:.2f}; EM ARI {merged['em_ari']:.2f}. `python -m benchmarks.lm_imdb --quick`"
    )
    write_result(NAME, result, summary, TARGET, quick=True)


if __name__ == "__main__":
    main()
