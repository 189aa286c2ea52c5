"""``egalitarian-rl frontier``: fixed-weight policies on true and learned rewards, saved, reused, plotted, reported."""

import json

import numpy as np
import pytest
import yaml

from egalitarian_rl.cli import main
from egalitarian_rl.evaluation import build_metrics, write_report
from egalitarian_rl.evaluation.plots import frontier_envelope, maxmin_index, maxmin_on_envelope
from egalitarian_rl.evaluation.report import method_positions
from egalitarian_rl.experiments.frontier import weight_grid

# A small FairGrid run: enough PPO steps for a policy to settle on one goal 3 steps away.
TINY = {
    "env_id": "egalitarian_rl/FairGrid-v0",
    "groups": {"majority": 0.8, "minority": 0.2},
    "methods": ["rlhf"],
    "collect": {"n_users": 20, "comparisons_per_user": 10, "segment_length": 10, "env_kwargs": {"random_start": True}},
    "reward": {"n_members": 2, "hidden_sizes": [32], "epochs": 5, "em": {"max_iter": 5, "m_step_epochs": 3, "final_epochs": 5}},
    "train": {
        "total_timesteps": 2048,
        "n_envs": 4,
        "ppo": {"n_steps": 128, "batch_size": 128, "n_epochs": 10, "ent_coef": 0.01, "learning_rate": 0.001, "gamma": 0.97},
    },
    "evaluate": {"n_episodes": 4, "deterministic": False},
}


def _write(folder, **changes):
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out_dir": str(folder / "run"), **changes}))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frontier")
    config = _write(folder)
    assert main(["frontier", config, "--points", "3", "--no-progress"]) == 0
    return config, folder / "run"


def _point(frontier, source, first_weight):
    (point,) = [p for p in frontier["points"] if p["source"] == source and p["weights"]["majority"] == first_weight]
    return point


def test_writes_every_point_and_the_plot(run):
    _, out = run
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["groups"] == ["majority", "minority"] and frontier["seeds"] == [0]
    assert frontier["weight_grid"] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert sorted((p["source"], p["weights"]["majority"]) for p in frontier["points"]) == [
        (source, w) for source in ("learned", "true") for w in (0.0, 0.5, 1.0)
    ]
    for point in frontier["points"]:
        assert point["weights"]["majority"] + point["weights"]["minority"] == pytest.approx(1.0)
        assert point["n_episodes"] == 4
        for group in ("majority", "minority"):
            stats = point["groups"][group]
            assert stats["std_return"] >= 0 and len(stats["seed_means"]) == 1
            assert 0.0 <= stats["mean_return"] <= 30.0  # FairGrid: at most 1 per step for 30 steps
        if point["source"] == "learned":  # weights moved onto the EM member named after each group
            (members,) = point["member_weights"].values()
            assert sorted(members.values()) == sorted(point["weights"].values())
    lows = [p["min_return"] for p in frontier["points"]]
    assert frontier["maxmin_point"]["min_return"] == max(lows) == lows[frontier["maxmin_point"]["index"]]
    assert frontier["maxmin_mixture"]["min_return"] >= frontier["maxmin_point"]["min_return"]
    assert set(frontier["envelope"]) <= set(range(len(frontier["points"])))
    assert (out / "frontier.png").stat().st_size > 1000
    for tag in ("true_w1.000", "learned_w0.500"):  # each point's policy, curve, returns and record, per seed
        folder = out / "seed_0" / "frontier"
        assert (folder / "policies" / f"{tag}.zip").exists() and (folder / "policies" / f"{tag}.curve.npz").exists()
        assert np.load(folder / "returns" / f"{tag}.npy").shape == (4, 2)
        assert json.loads((folder / "stages" / f"{tag}.json").read_text())["evaluate_key"]


def test_true_weights_move_the_policy_between_the_groups_goals(run):
    _, out = run
    frontier = json.loads((out / "frontier.json").read_text())
    all_majority, all_minority = _point(frontier, "true", 1.0)["groups"], _point(frontier, "true", 0.0)["groups"]
    assert all_majority["majority"]["mean_return"] > all_minority["majority"]["mean_return"] + 5
    assert all_minority["minority"]["mean_return"] > all_majority["minority"]["mean_return"] + 5


def test_rerun_reuses_every_point_and_the_report_gets_one_frontier_section(run, capsys):
    config, out = run
    saved = sorted((out / "seed_0" / "frontier").rglob("*.*"))
    stamps = {path: path.stat().st_mtime_ns for path in saved if path.suffix in (".zip", ".npy", ".npz")}
    # A report with methods: the frontier command marks them and replaces (not repeats) its report section.
    returns = {"rlhf": np.tile([25.0, 0.0], (4, 1)), "maxmin": np.tile([22.0, 16.0], (4, 1))}
    write_report(build_metrics(returns, ["majority", "minority"], baseline="rlhf"), out)
    capsys.readouterr()
    assert main(["frontier", config, "--points", "3", "--no-progress"]) == 0
    assert "training" not in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    frontier = json.loads((out / "frontier.json").read_text())
    best = frontier["maxmin_point"]["min_return"]
    assert frontier["methods"]["maxmin"]["gap_to_maxmin_point"] == pytest.approx(best - 16.0)
    report = (out / "report.md").read_text()
    assert report.count("## Fairness frontier") == 1 and "(frontier.png)" in report and "`maxmin`" in report


def test_bad_input_is_one_clear_line(run, tmp_path, capsys):
    config, _ = run
    for argv, expected in (
        (["frontier", config, "--points", "1"], "--points: a frontier needs at least 2 weights"),
        (["frontier", str(tmp_path / "nope.yaml")], "does not exist"),
        (["frontier", _write(tmp_path, groups={"majority": 1.0})], "exactly 2 groups"),
    ):
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and err.count("\n") == 1


def test_weight_grid_envelope_and_maxmin_geometry():
    assert weight_grid(5)[:, 0].tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    points = np.array([[30, 0], [24, 18], [20, 10], [0, 30], [15, 15], [10, 10]], dtype=float)
    assert frontier_envelope(points).tolist() == [3, 1, 0]  # (20, 10), (15, 15) and (10, 10) are beaten by mixtures
    best = maxmin_on_envelope(points)
    # Between (0, 30) and (24, 18) the two groups get the same at (20, 20): better than any single point's 18.
    assert best["min_return"] == pytest.approx(20.0) and best["mix"] == [3, 1] and best["weight_j"] == pytest.approx(5 / 6)
    assert maxmin_index(points) == 1  # (24, 18): the best worst group of a single policy
    assert maxmin_index([[26.8, 0.0], [28.0, 0.0], [0.0, 27.6]]) == 1  # a tie at 0 goes to who serves someone best


def test_method_positions_say_how_far_each_method_is_from_the_frontier():
    point = {"source": "true", "weights": {"a": 1.0, "b": 0.0}, "min_return": 0.0}
    points = [{**point, "groups": {"a": {"mean_return": x}, "b": {"mean_return": y}}} for x, y in ((30.0, 0.0), (0.0, 30.0))]
    frontier = {"groups": ["a", "b"], "points": points, "maxmin_point": {"min_return": 0.0}, "maxmin_mixture": {"min_return": 15.0}}
    returns = {"rlhf": np.tile([10.0, 10.0], (3, 1)), "maxmin": np.tile([22.0, 16.0], (3, 1))}
    positions = method_positions(frontier, build_metrics(returns, ["a", "b"], baseline="rlhf"))
    # Mixing the two ends gives (15, 15): 5 more for both than rlhf; maxmin is beyond the chord (best mix (18, 12)).
    assert positions["rlhf"]["envelope_margin"] == pytest.approx(5.0)
    assert positions["maxmin"]["envelope_margin"] == pytest.approx(-4.0)
    assert positions["maxmin"]["gap_to_maxmin_mixture"] == pytest.approx(-1.0)
