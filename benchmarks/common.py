"""What every benchmark shares: machine facts, writing its JSON and its line in RESULTS.md, and the ``--quick`` flag.

``--quick`` (every benchmark; ``make bench QUICK=1`` runs them all in about 6 minutes on 2 free CPU cores) is a
reduced run that checks a benchmark works end to end; its numbers are not the claims. It writes
``benchmarks/results/quick/<name>.json`` (with ``"quick": true``), the PNG beside it and a line in
``benchmarks/results/quick/RESULTS.md``, never the full run's files, and keeps its resumable runs under
``runs/quick/`` (:func:`runs_dir`), never in the full runs' folders.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from egalitarian_rl.io import write_text_atomic

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
#: Where ``--quick`` runs keep their resumable stages (relative, like every ``runs/`` folder).
QUICK_RUNS = Path("runs/quick")
#: The arguments the benchmark was run with, as :meth:`BenchmarkParser.parse_args` last saw them (``None``: ``sys.argv``).
_arguments: list[str] | None = None


def run_in_processes(function: Callable[..., Any], calls: Sequence[tuple], n_jobs: int = 1) -> Iterator[tuple[tuple, Any]]:
    """``(arguments, function(*arguments))`` for every tuple in ``calls``, yielded as each finishes.

    ``n_jobs == 1`` runs them in this process, in order; otherwise in ``n_jobs`` worker processes,
    started with spawn so each gets its own torch (a forked one would share the parent's thread
    pool state). ``function`` must be importable (module level) for the workers.
    """
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    if n_jobs == 1:
        for arguments in calls:
            yield arguments, function(*arguments)
        return
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=spawn, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(function, *arguments): arguments for arguments in calls}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end the worker once the benchmark that started it is gone.

    A benchmark stopped with ``kill`` (not Ctrl-C, which reaches the whole process group) would otherwise leave its
    workers running for hours, loading the machine under the next benchmark's timings.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


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


class BenchmarkParser(argparse.ArgumentParser):
    """A benchmark's command line, with the ``--quick`` flag every benchmark has.

    :param description: the first line of the benchmark's docstring.
    :param quick: what ``--quick`` reduces beyond ``quick_defaults``, in words (shown in ``--help``).
    :param quick_defaults: option (its ``dest``) -> its default under ``--quick``; options given on the command line still win.
    """

    def __init__(self, description: str, quick: str = "", quick_defaults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(description=description, **kwargs)
        self.quick_defaults = dict(quick_defaults or {})
        options = [f"--{key.replace('_', '-')}{_as_argument(value)}" for key, value in self.quick_defaults.items()]
        self.add_argument(
            "--quick",
            action="store_true",
            help="a reduced run that checks the benchmark end to end (its numbers are not the claims): "
            + ", ".join([*options, *([quick] if quick else [])])
            + "; writes benchmarks/results/quick/ and runs/quick/, never the full results",
        )

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        global _arguments
        _arguments = list(sys.argv[1:] if args is None else args)  # for the command written beside the results
        parsed = super().parse_args(args, namespace)
        if parsed.quick and self.quick_defaults:
            self.set_defaults(**self.quick_defaults)  # the quick values replace the defaults; parse again so given options win
            parsed = super().parse_args(args, namespace)
        return parsed


def _as_argument(value: Any) -> str:
    """`` <value>`` as it would follow its option on the command line (nothing for a flag that is on)."""
    if value is True:
        return ""
    return " " + (" ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


def results_dir(quick: bool = False) -> Path:
    """``benchmarks/results``, or ``benchmarks/results/quick`` for a ``--quick`` run."""
    return HERE / "results" / "quick" if quick else HERE / "results"


def runs_dir(path: str | Path, quick: bool = False) -> Path:
    """A benchmark's runs folder: ``path`` (``runs/...``), or for a ``--quick`` run the same under ``runs/quick/``."""
    path = Path(path)
    return QUICK_RUNS / path.relative_to("runs") if quick else path


def update_results_md(name: str, line_cells: list[str], quick: bool = False) -> None:
    """Replace this benchmark's row in RESULTS.md (by the benchmark column), or append it; ``quick``: ``results/quick/RESULTS.md``."""
    path = results_dir(quick=True) / "RESULTS.md" if quick else RESULTS_MD
    text = path.read_text() if path.exists() else MD_HEADER
    row = "| " + " | ".join(line_cells) + " |"
    lines = text.rstrip("\n").split("\n")
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and cells[1] == name:
            lines[i] = row
            break
    else:
        lines.append(row)
    write_text_atomic("\n".join(lines) + "\n", path)


def command(module: str) -> str:
    """The command that ran this benchmark, as a user types it: ``python -m benchmarks.<module> <its arguments>``."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if _arguments is None else _arguments)])


def write_result(
    name: str, result: dict[str, Any], summary: str, target: str, quick: bool = False, commands: Sequence[str] | None = None
) -> Path:
    """Write ``results/<name>.json`` (with date, machine and command) and replace this benchmark's line in RESULTS.md.

    Every number in RESULTS.md comes with the command that reproduces it: the line ends with ``commands`` (a result
    stored over several invocations), else with this invocation's command, unless ``summary`` already names it.

    :param name: the benchmark, also its module under ``benchmarks``.
    :param result: the measurements; must hold a boolean ``passed``.
    :param summary: the key numbers in one line.
    :param target: the target in words, e.g. ``ratio <= 1.15``.
    :param quick: a ``--quick`` run: ``results/quick/<name>.json`` (marked ``"quick": true``) and ``results/quick/RESULTS.md``.
    :param commands: every command behind the stored result (repeats dropped, order kept); ``None``: this one alone.
    """
    marked = {"quick": True} if quick else {}
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    result = {**result, **marked, "command": command(name), "date": date, "machine": machine_info()}
    path = write_text_atomic(json.dumps(result, indent=2) + "\n", results_dir(quick) / f"{name}.json")
    if commands is not None:
        summary = f"{summary.rstrip('. ')}. Made by {'; '.join(f'`{c}`' for c in dict.fromkeys(commands))}"
    elif "python -m benchmarks." not in summary:
        summary = f"{summary}. `{result['command']}`"
    update_results_md(name, [result["date"][:10], name, summary, target, "pass" if result["passed"] else "FAIL"], quick)
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
