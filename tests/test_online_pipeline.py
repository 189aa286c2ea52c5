"""The online preference loop as the pipeline's method ``online`` (the ``online:`` config section)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from egalitarian_rl import envs
from egalitarian_rl.experiments import ExperimentConfig, Pipeline
from egalitarian_rl.experiments.config import ConfigError

#: A small FairGrid run: 10 users, 2 online rounds of 2 answers each, a few hundred PPO steps.
TINY: dict[str, Any] = {
    "name": "tiny-online",
    "env_id": envs.FAIRGRID_ID,
    "groups": {"majority": 0.8, "minority": 0.2},
    "methods": ["rlhf", "maxmin", "online"],
    "collect": {"n_users": 10, "comparisons_per_user": 4, "segment_length": 4, "env_kwargs": {"random_start": True}},
    "reward": {"n_members": 2, "hidden_sizes": [16], "epochs": 2, "em": {"max_iter": 2, "final_epochs": 2, "init_epochs": 2}},
    "train": {"total_timesteps": 128, "n_envs": 1, "ppo": {"n_steps": 64, "batch_size": 64, "n_epochs": 1}},
    "evaluate": {"n_episodes": 2, "deterministic": False},
    "online": {
        "rounds": 2,
        "segments_per_round": 20,
        "segment_length": 4,
        "candidates_per_round": 60,
        "queries_per_user": 2,
        "timesteps_per_round": 64,
    },
}


def _pipeline(raw: dict[str, Any], out_dir: Path, messages: list[str]) -> Pipeline:
    config = ExperimentConfig.from_dict({**copy.deepcopy(raw), "out_dir": str(out_dir)})
    return Pipeline(config, progress_bar=False, log=messages.append)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pipeline, Path, dict[str, Any]]:
    torch.manual_seed(0)
    pipeline = _pipeline(TINY, tmp_path_factory.mktemp("online"), [])
    report, metrics = pipeline.run()
    return pipeline, report, metrics


def test_the_online_method_is_evaluated_and_reported_with_its_rounds(run: tuple[Pipeline, Path, dict[str, Any]]) -> None:
    pipeline, report, metrics = run
    online = metrics["methods"]["online"]["groups"]
    assert set(online) == {"majority", "minority"} and all("win_rate_vs_rlhf" in online[g] for g in online)
    rounds = json.loads(pipeline.online_rounds_path(0).read_text())
    assert [r["comparisons"] for r in rounds] == [20, 40]  # 10 users x 2 answers per round, accumulated
    assert all(set(r["group_returns"]) == {"majority", "minority"} for r in rounds)
    assert metrics["extra"]["online_rounds"]["seed_0"] == rounds
    text = report.read_text()
    assert "## Online loop" in text and "| 1 | 40 |" in text
    # The learning curve runs over both rounds' steps (each round's agent counts from 0).
    import numpy as np

    with np.load(pipeline.seed_dir(0) / "policies" / "online.curve.npz") as curve:
        assert curve["steps"].max() > TINY["online"]["timesteps_per_round"]


def test_a_changed_online_setting_redoes_the_online_method_only(run: tuple[Pipeline, Path, dict[str, Any]]) -> None:
    pipeline, _, _ = run
    changed = copy.deepcopy(TINY)
    changed["online"]["queries_per_user"] = 1
    messages: list[str] = []
    again = _pipeline(changed, pipeline.out_dir, messages)
    for method in again.methods:
        again.evaluate(0, method)
    redone = [m for m in messages if "redoing" in m]
    assert redone and all("online" in m for m in redone)  # rlhf and maxmin (and collect, fit) are kept
    assert [r["comparisons"] for r in json.loads(again.online_rounds_path(0).read_text())] == [10, 20]


def test_the_online_method_needs_the_online_section() -> None:
    raw = {key: value for key, value in TINY.items() if key != "online"}
    with pytest.raises(ConfigError, match=r"^online: method 'online' needs an online: section"):
        ExperimentConfig.from_dict(raw)
    with pytest.raises(ConfigError, match=r"^online\.queries_per_user: must be >= 1"):
        ExperimentConfig.from_dict({**TINY, "online": {"queries_per_user": 0}})
