"""The command line: bad configs fail with one clear message, never a traceback."""

import subprocess
import sys

import pytest
import yaml

from egalitarian_rl.cli import _config_path, main

GOOD = {
    "env_id": "egalitarian_rl/FairGrid-v0",
    "groups": {"majority": 0.8, "minority": 0.2},
    "collect": {"n_users": 10, "comparisons_per_user": 5},
}


def _write(tmp_path, **changes):
    config = {**GOOD, "out_dir": str(tmp_path / "run"), **changes}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _fails_cleanly(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_unknown_env_id(tmp_path, capsys):
    _fails_cleanly(capsys, ["collect", _write(tmp_path, env_id="NoSuchEnv-v0")], "env_id: unknown env 'NoSuchEnv-v0'")


def test_unknown_aggregation(tmp_path, capsys):
    _fails_cleanly(
        capsys, ["collect", _write(tmp_path, train={"aggregation": "median"})], "train.aggregation: unknown aggregation 'median'"
    )


def test_unknown_group_and_setting(tmp_path, capsys):
    _fails_cleanly(capsys, ["collect", _write(tmp_path, groups={"everyone": 1.0})], "groups: unknown group ['everyone']")
    _fails_cleanly(capsys, ["collect", _write(tmp_path, colect={})], "colect: unknown setting")


def test_missing_config_file(tmp_path, capsys):
    _fails_cleanly(capsys, ["run", str(tmp_path / "nope.yaml")], "does not exist")


def test_k_larger_than_the_users(tmp_path, capsys):
    _fails_cleanly(capsys, ["fit", _write(tmp_path, reward={"n_members": 50})], "reward.n_members: K=50 is more than the 10 users")


def test_mixture_k_not_matching_the_config(tmp_path, capsys):
    path = _write(tmp_path, reward={"n_members": 2, "epochs": 2})
    assert main(["fit", path, "--no-progress"]) == 0
    capsys.readouterr()
    _fails_cleanly(capsys, ["fit", _write(tmp_path, reward={"n_members": 3, "epochs": 2})], "has K=2 but the config asks for K=3")


def test_corrupt_preferences_file(tmp_path, capsys):
    path = _write(tmp_path)
    assert main(["collect", path, "--no-progress"]) == 0
    capsys.readouterr()
    preferences = tmp_path / "run" / "seed_0" / "preferences.npz"
    preferences.write_bytes(preferences.read_bytes()[:100])
    _fails_cleanly(capsys, ["fit", path], "truncated or corrupt")


@pytest.mark.parametrize("command", ["demo", "run", "collect", "fit", "train", "evaluate", "report"])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "egalitarian_rl.cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: egalitarian-rl" in result.stdout


def test_shipped_configs_load():
    from egalitarian_rl.experiments import ExperimentConfig

    for name in ("fairgrid", "halfcheetah"):
        config = ExperimentConfig.from_yaml(_config_path(name))
        assert "rlhf" in config.methods and config.env_id
