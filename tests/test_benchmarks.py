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


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid) and not fields.get("State", "").startswith("Z"):
            children.append(int(status.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/status").read_text().split("State:\t", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
def test_benchmark_workers_end_when_the_benchmark_is_killed() -> None:
    """A benchmark killed with SIGKILL leaves no worker running (they would skew the next benchmark's timings)."""
    import signal
    import subprocess
    import sys
    import time

    script = "import time\nfrom benchmarks.common import run_in_processes\nlist(run_in_processes(time.sleep, [(120,), (120,)], 2))"
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while len(workers := _children(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) >= 2, "the pool's workers never started"
        time.sleep(3)  # the workers run their initializer before their first task
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)
