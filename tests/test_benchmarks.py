"""The benchmarks' shared ``--quick`` mode (``benchmarks/common.py``, ``make bench QUICK=1``)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, wrapper_overhead

REPO = Path(__file__).resolve().parent.parent


def test_quick_run_writes_under_results_quick_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "HERE", tmp_path)  # results/ under tmp_path, never the repo's
    full_md = tmp_path / "RESULTS.md"
    full_md.write_text(common.MD_HEADER + "| 2026-01-01 | wrapper_overhead | the full run's line | ratio <= 1.15 | pass |\n")
    monkeypatch.setattr(common, "RESULTS_MD", full_md)
    before = full_md.read_text()

    wrapper_overhead.main(["--quick", "--steps", "100", "--repeats", "1"])

    saved = json.loads((tmp_path / "results" / "quick" / "wrapper_overhead.json").read_text())
    assert saved["quick"] is True and saved["steps"] == 100 and saved["repeats"] == 1  # given options beat the quick defaults
    quick_md = (tmp_path / "results" / "quick" / "RESULTS.md").read_text()
    assert quick_md.startswith(common.MD_HEADER) and "| wrapper_overhead | HalfCheetah-v5" in quick_md
    # every line names the command that produced it, with the arguments it was given
    assert saved["command"] == "python -m benchmarks.wrapper_overhead --quick --steps 100 --repeats 1"
    assert f"`{saved['command']}`" in quick_md
    assert full_md.read_text() == before
    assert not (tmp_path / "results" / "wrapper_overhead.json").exists()


def test_quick_defaults_apply_only_with_quick() -> None:
    parser = common.BenchmarkParser("test", quick="fewer things", quick_defaults={"seeds": [0], "steps": 64})
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    assert vars(parser.parse_args([])) == {"quick": False, "seeds": [0, 1, 2], "steps": 1000}
    assert vars(parser.parse_args(["--quick"])) == {"quick": True, "seeds": [0], "steps": 64}
    assert vars(parser.parse_args(["--steps", "5", "--quick"])) == {"quick": True, "seeds": [0], "steps": 5}
    assert "--seeds 0, --steps 64, fewer things" in " ".join(parser.format_help().split())


def test_quick_runs_go_under_runs_quick() -> None:
    assert common.runs_dir("runs/bench_fairgrid", quick=True) == Path("runs/quick/bench_fairgrid")
    assert common.runs_dir("runs/imdb_seed_7") == Path("runs/imdb_seed_7")


def test_make_bench_runs_every_benchmark() -> None:
    """``make bench`` runs every benchmark module, and ``make bench QUICK=1`` has one --quick line for each."""
    recipe = REPO.joinpath("Makefile").read_text().split("\nbench:", 1)[1].split("\n\n", 1)[0]
    quick, full = recipe.split("\nelse\n", 1)
    assert re.findall(r"benchmarks\.(\w+)", full) == re.findall(r"quick-bench,(\w+)", quick)
    helpers = {"__init__", "common", "impossibility_rewards"}
    modules = {path.stem for path in (REPO / "benchmarks").glob("*.py")} - helpers
    assert modules == set(re.findall(r"benchmarks\.(\w+)", full))


def test_maxmin_point_equalises_the_groups_z_scored_step_rewards() -> None:
    from benchmarks.maxmin_point import equalising_speed

    rng = np.random.default_rng(0)
    rewards = {"majority": rng.normal(-0.2, 0.4, 1000), "minority": rng.normal(0.6, 0.4, 1000)}
    speed = equalising_speed("Hopper-v5", rewards)  # fast = u, steady = 1 - u for a healthy hopper going forward
    z_major = (speed - rewards["majority"].mean()) / rewards["majority"].std()
    z_minor = (1 - speed - rewards["minority"].mean()) / rewards["minority"].std()
    assert 0 < speed < 1 and z_major == pytest.approx(z_minor)
    # calm = -u at best on HalfCheetah: a minority already better off standing still than the majority moving fast
    assert equalising_speed("HalfCheetah-v5", {"majority": rewards["majority"], "minority": rewards["majority"] + 5}) == 0.0
