"""The language experiment's pipeline: typed config, every stage end to end on a tiny GPT-2, resume."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from egalitarian_rl.experiments.config import ConfigError
from egalitarian_rl.experiments.lm_pipeline import (
    LMExperimentConfig,
    LMPipeline,
    distinct_bigrams,
    is_lm_config,
    method_rule,
    population_tag,
    repeated_replies,
)
from egalitarian_rl.lm.ppo import MaxMinLMPPO

torch.set_num_threads(1)

TINY = {
    "name": "tiny",
    "prompts": {"n_train": 8, "n_eval": 3},
    "model": {"name": "tiny-gpt2", "lora_r": 0, "max_new_tokens": 5, "batch_size": 16},
    "collect": {"completions_per_prompt": 2, "n_users": 10, "comparisons_per_user": 8, "populations": [{"positive": 0.8, "concise": 0.2}]},
    "reward": {"epochs": 3, "em": {"final_epochs": 2, "max_iter": 3}},
    "train": {
        "methods": ["rlhf", "maxmin"],
        "iterations": 1,
        "ppo": {"batch_size": 4, "minibatch_size": 4, "n_epochs": 1, "learning_rate": 1e-3},
    },
}


def config(tmp_path: Path, **overrides: dict) -> LMExperimentConfig:
    raw = {**TINY, "out_dir": str(tmp_path / "run")}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return LMExperimentConfig.from_dict(raw)


@pytest.mark.parametrize(("name", "majority"), [("imdb", "positive_review"), ("imdb_quick", "positive")])
def test_shipped_configs_load(name: str, majority: str) -> None:
    path = Path(str(resources.files("egalitarian_rl.experiments") / "configs" / f"{name}.yaml"))
    cfg = LMExperimentConfig.from_yaml(path)
    assert cfg.group_names == (majority, "concise")
    assert cfg.train.methods[0] == "rlhf" and cfg.model.name == "smollm2"


def test_is_lm_config_tells_the_two_kinds_apart() -> None:
    folder = resources.files("egalitarian_rl.experiments") / "configs"
    assert is_lm_config(Path(str(folder / "imdb.yaml")))
    assert not is_lm_config(Path(str(folder / "fairgrid.yaml")))
    assert not is_lm_config("no/such/file.yaml")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trian": {}}, r"trian: unknown setting \(did you mean 'train'\?\)"),
        ({"train": {"methods": ["maxmin"]}}, "'rlhf' is required"),
        ({"train": {"methods": ["rlhf", "maxmin_nope"]}}, "methods: 'maxmin_nope'"),
        ({"train": {"ppo": {"seed": 3}}}, r"train\.ppo\.seed: set by the pipeline"),
        ({"train": {"aggregation_kwargs": {"avg": True}}}, r"train\.aggregation_kwargs: aggregation 'worst_group' got unexpected"),
        ({"train": {"ppo": {"kl_cof": 0.1}}}, r"train\.ppo\.kl_cof: unknown setting"),
        ({"collect": {"populations": [{"positive": 0.8, "terse": 0.2}]}}, r"collect\.populations\[0\]: unknown text group"),
        ({"collect": {"populations": [{"positive": 0.8, "concise": 0.3}]}}, "shares must sum to 1"),
        ({"collect": {"completions_per_prompt": 1}}, r"collect\.completions_per_prompt: must be >= 2"),
        ({"reward": {"em": {"n_inits": 2}}}, r"reward\.em\.n_inits: unknown setting"),
        ({"model": {"temperature": "hot"}}, r"model\.temperature: expected float"),
        ({"evaluate": {"match_kl": True}}, r"evaluate\.match_kl: needs validation prompts"),
    ],
)
def test_bad_config_is_one_clear_error(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        LMExperimentConfig.from_dict(raw)
    assert "\n" not in str(info.value)


def test_helpers() -> None:
    assert method_rule("rlhf", "worst_group") == "mean"
    assert method_rule("maxmin", "worst_group") == "worst_group"
    assert method_rule("maxmin_per_sample_min", "worst_group") == "per_sample_min"
    assert population_tag({"positive": 0.9, "concise": 0.1}) == "90-10"
    assert distinct_bigrams(["a b c d"]) == 1.0
    assert distinct_bigrams(["so glad so glad so glad"]) == pytest.approx(2 / 5)


def test_repeated_replies_sees_a_stock_reply_that_bigrams_miss() -> None:
    stock = ["Awesome.", "awesome.", "A fine film about love.", "Awesome. ", "It drags on.", "It drags."]
    prompts = [0, 1, 2, 3, 4, 4]
    # three prompts answered "Awesome."; a similar answer twice for one prompt is sampling, not a collapse
    assert repeated_replies(stock, prompts) == pytest.approx(3 / 6)
    assert repeated_replies(["It drags.", "It drags."], [4, 4]) == 0.0
    assert distinct_bigrams(stock) > 0.8  # one-word replies have no bigram to repeat
    assert repeated_replies(["a", "b"], [0, 1]) == 0.0
    assert repeated_replies([], []) == 0.0


@pytest.mark.slow
def test_every_stage_end_to_end_and_resume(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    lines: list[str] = []
    report, metrics = LMPipeline(cfg, log=lines.append).run()
    assert {"collect", "fit", "train", "evaluate"} <= {line.split(":")[0] for line in lines}

    methods = metrics["methods"]
    assert list(methods) == ["base", "rlhf", "maxmin"]
    for row in methods.values():
        assert set(row["groups"]) == {"positive", "concise"}
        assert np.isfinite(row["kl"]) and 0.0 <= row["distinct_2"] <= 1.0
        for group in row["groups"].values():
            assert 0.0 <= group["win_rate_vs_rlhf"] <= 1.0
    assert methods["rlhf"]["groups"]["concise"]["win_rate_vs_rlhf"] == 0.5
    assert methods["base"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert methods["maxmin"]["kl"] > 0.0  # trained away from the base model, measured against it
    assert set(metrics["heldout_accuracy"]) == {"single", "mixture", "true_reward"}
    assert set(metrics["reward_fit"]) == {"80-20"}
    # Every method's group scores are z-scored with the statistics of the base model's pool completions (what the
    # users compared), not with the first 16-completion batch: the same fixed scale for every method and seed.
    pipeline = LMPipeline(cfg)
    for method in ("rlhf", "maxmin"):
        scores, _ = pipeline._group_scores(method)
        expected = pipeline.pool_normalizer(scores, pipeline.pool()[0]).state_dict()
        state = json.loads((MaxMinLMPPO.latest_checkpoint(pipeline.dir / "policies" / method) / "trainer.json").read_text())
        assert not state["fit_normalizer_on_first_batch"]
        np.testing.assert_allclose(state["normalizer_state"]["mean"], expected["mean"], rtol=1e-6)
        np.testing.assert_allclose(state["normalizer_state"]["var"], expected["var"], rtol=1e-6)
    text = report.read_text()
    assert "| method |" in text and "## Examples" in text and "Reward gaming check" in text
    assert (report.parent / "scores.png").stat().st_size > 0

    # Nothing changed: every stage is skipped, also when driven stage by stage as the CLI drives Pipeline.
    lines.clear()
    again = LMPipeline(cfg, log=lines.append)
    again.collect(0), again.fit(0), [again.train(0, m) for m in again.methods], again.evaluate(0, "rlhf")
    again.run()
    assert lines == []
    with pytest.raises(ConfigError, match="runs seed 0, not 1"):
        again.collect(1)

    # More training iterations: training resumes and evaluation follows; collection and fits are kept.
    lines.clear()
    longer = config(tmp_path, train={"iterations": 2})
    LMPipeline(longer, log=lines.append).run()
    stages = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert "collect" not in stages and "fit" not in stages
    assert stages.count("train") == 2 and "evaluate" in stages

    # The maxmin rule's arguments reach its trainer (and only its): maxmin starts afresh, rlhf is kept.
    lines.clear()
    averaged = config(tmp_path, train={"iterations": 2, "aggregation_kwargs": {"average": True, "warmup": 1}})
    LMPipeline(averaged, log=lines.append).run()
    trained = [line for line in lines if line.startswith("train:")]
    assert len(trained) == 1 and trained[0].startswith("train: maxmin (worst_group{'average': True, 'warmup': 1}")
    state = json.loads((MaxMinLMPPO.latest_checkpoint(pipeline.dir / "policies" / "maxmin") / "trainer.json").read_text())
    assert state["aggregation_config"] == {"average": True, "warmup": 1, "num_groups": 2}


@pytest.mark.slow
def test_match_kl_judges_every_method_at_the_smallest_last_kl(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        prompts={"n_train": 8, "n_eval": 4},
        train={"iterations": 3, "ppo": {"batch_size": 4, "minibatch_size": 4, "n_epochs": 1, "learning_rate": 3e-2}},
        evaluate={"max_prompts": 2, "match_kl": True, "validation_completions": 2},
    )
    pipeline = LMPipeline(cfg, log=lambda _: None)
    _, metrics = pipeline.run()
    chosen = pipeline.kl_matched()
    for method in pipeline.methods:
        snapshots = MaxMinLMPPO.snapshots(pipeline.dir / "policies" / method / "snapshots")
        assert sorted(snapshots) == list(range(1, pipeline.iterations_trained(method) + 1))  # every iteration kept
    # The target is a distance every method reached: the smallest last-iteration validation KL.
    last = {m: pipeline.validation_kl(m, chosen[m]["last_iteration"]) for m in pipeline.methods}
    target = min(last.values())
    assert all(row["target"] == pytest.approx(target) for row in chosen.values())
    closest = min(last, key=last.get)
    assert chosen[closest]["iteration"] == chosen[closest]["last_iteration"]
    for method, row in chosen.items():
        # No snapshot measured on the way back from the last iteration is nearer the target than the judged one.
        measured = [pipeline.validation_kl(method, i) for i in range(row["iteration"], row["last_iteration"] + 1)]
        assert abs(row["validation_kl"] - target) <= min(abs(kl - target) for kl in measured) + 1e-9
        assert metrics["methods"][method]["judged_iteration"] == row["iteration"]
    # At this learning rate the methods end far apart, so one is judged before its last iteration, and what was
    # judged is that iteration's snapshot: sampling it again gives the stored completions.
    earlier = [m for m, row in chosen.items() if row["iteration"] < row["last_iteration"]]
    assert earlier
    evaluation = pipeline.evaluate()
    prompts = [evaluation["prompts"][i] for i in evaluation["prompt_index"]]
    judged = pipeline._load_policy(earlier[0], chosen[earlier[0]]["iteration"])
    again = pipeline.sample(judged, pipeline.formatted(prompts), (3, cfg.evaluate.sample_seed), with_kl=True)
    assert again["texts"] == evaluation["methods"][earlier[0]]["texts"]
    assert metrics["methods"][earlier[0]]["kl"] == pytest.approx(float(np.mean(again["kl"])), rel=1e-4)
    assert "validation prompts is nearest" in (tmp_path / "run" / "report.md").read_text()
