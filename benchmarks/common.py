"""What every benchmark shares: machine facts, and writing its JSON and its line in RESULTS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from egalitarian_rl.io import write_text_atomic

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
MD_HEADER = """# Benchmark results

One line per benchmark, updated in place by each benchmark script (details in `results/*.json`).

| date | benchmark | key numbers | target | result |
|---|---|---|---|---|
"""


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    packages = {}
    for package in ("numpy", "gymnasium", "mujoco"):
        try:
            packages[package] = version(package)
        except PackageNotFoundError:
            packages[package] = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **packages,
    }


def update_results_md(name: str, line_cells: list[str]) -> None:
    """Replace this benchmark's row in RESULTS.md (matched by the benchmark column), or append it."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else MD_HEADER
    row = "| " + " | ".join(line_cells) + " |"
    lines = text.rstrip("\n").split("\n")
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and cells[1] == name:
            lines[i] = row
            break
    else:
        lines.append(row)
    RESULTS_MD.write_text("\n".join(lines) + "\n")


def write_result(name: str, result: dict[str, Any], summary: str, target: str) -> Path:
    """Write ``results/<name>.json`` (with date and machine) and replace this benchmark's line in RESULTS.md.

    :param result: the measurements; must hold a boolean ``passed``.
    :param summary: the key numbers in one line.
    :param target: the target in words, e.g. ``ratio <= 1.15``.
    """
    result = {**result, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info()}
    path = write_text_atomic(json.dumps(result, indent=2) + "\n", HERE / "results" / f"{name}.json")
    update_results_md(name, [result["date"][:10], name, summary, target, "pass" if result["passed"] else "FAIL"])
    return path


def maxmin_vs_rlhf(metrics: dict, majority: str, minority: str) -> dict:
    """The paper's claims for ``maxmin`` against ``rlhf`` in a ``metrics.json``, with pass flags."""
    methods = metrics["methods"]
    maxmin, rlhf = methods["maxmin"]["groups"], methods["rlhf"]["groups"]
    ratio = maxmin[minority].get("ratio_vs_rlhf")
    learned = [m for m in ("rlhf", "maxmin", "mean") if m in methods]
    return {
        "minority_win_rate": maxmin[minority]["win_rate_vs_rlhf"],
        "minority_seed_win_rate": maxmin[minority].get("seed_win_rate_vs_rlhf"),
        "minority_return": maxmin[minority]["mean_return"],
        "rlhf_minority_return": rlhf[minority]["mean_return"],
        "minority_ratio": ratio,  # None = unbounded: RLHF at the floor (0), MaxMin above it
        "majority_return": maxmin[majority]["mean_return"],
        "rlhf_majority_return": rlhf[majority]["mean_return"],
        "majority_kept": maxmin[majority]["mean_return"] / rlhf[majority]["mean_return"],
        "worst_group_returns": {m: methods[m]["worst_group_return"] for m in learned},
        "passes": {
            "minority_win_rate>=0.60": maxmin[minority]["win_rate_vs_rlhf"] >= 0.60,
            # Ratios count from the lowest possible return; without one there is no ratio to check.
            "minority_ratio>=1.33": None if "min_episode_return" not in metrics else (ratio is None or ratio >= 1.33),
            "worst_group_highest": methods["maxmin"]["worst_group_return"] >= max(methods[m]["worst_group_return"] for m in learned),
            "majority_kept>=0.75": maxmin[majority]["mean_return"] >= 0.75 * rlhf[majority]["mean_return"],
        },
    }
