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


def test_a_changed_setting_redoes_its_stage_and_the_later_ones(tmp_path, capsys):
    from egalitarian_rl.preferences import PreferenceDataset
    from egalitarian_rl.rewards import EMRewardMixture

    path = _write(tmp_path, reward={"n_members": 2, "epochs": 2})
    assert main(["fit", path, "--no-progress"]) == 0
    seed_dir = tmp_path / "run" / "seed_0"
    assert EMRewardMixture.load(seed_dir / "rewards" / "em").reward.n_members == 2
    # K changes: the fit is redone (not reused, not an error); the preferences are kept
    stamp = (seed_dir / "preferences.npz").stat().st_mtime_ns
    assert main(["fit", _write(tmp_path, reward={"n_members": 3, "epochs": 2}), "--no-progress"]) == 0
    assert EMRewardMixture.load(seed_dir / "rewards" / "em").reward.n_members == 3
    assert (seed_dir / "preferences.npz").stat().st_mtime_ns == stamp
    # the number of users changes: new preferences with the new users, and a new fit
    changed = _write(tmp_path, collect={"n_users": 12, "comparisons_per_user": 5}, reward={"n_members": 3, "epochs": 2})
    assert main(["fit", changed, "--no-progress"]) == 0
    assert PreferenceDataset.load(seed_dir / "preferences.npz").n_users == 12
    assert "settings changed since it was saved" in capsys.readouterr().out
    # unchanged: nothing is redone; --force redoes a stage anyway
    stamp = (seed_dir / "preferences.npz").stat().st_mtime_ns
    assert main(["fit", changed, "--no-progress"]) == 0
    assert (seed_dir / "preferences.npz").stat().st_mtime_ns == stamp
    fit_stamp = (seed_dir / "rewards" / "fit_metrics.json").stat().st_mtime_ns
    assert main(["fit", changed, "--no-progress", "--force", "collect"]) == 0
    assert (seed_dir / "preferences.npz").stat().st_mtime_ns != stamp
    assert (seed_dir / "rewards" / "fit_metrics.json").stat().st_mtime_ns != fit_stamp  # later stages follow


def test_a_changed_rule_retrains_maxmin_only(tmp_path):
    tiny = {"total_timesteps": 128, "n_envs": 1, "ppo": {"n_steps": 64, "batch_size": 64, "n_epochs": 1}}
    common = {"methods": ["rlhf", "maxmin", "mean"], "reward": {"n_members": 2, "epochs": 2}}
    assert main(["train", _write(tmp_path, train=tiny, **common), "--no-progress"]) == 0
    policies = tmp_path / "run" / "seed_0" / "policies"
    stamps = {method: (policies / f"{method}.zip").stat().st_mtime_ns for method in ("rlhf", "maxmin", "mean")}
    changed = {**tiny, "aggregation": "worst_group", "aggregation_kwargs": {"average": True}}
    assert main(["train", _write(tmp_path, train=changed, **common), "--no-progress"]) == 0
    # rlhf and mean never read the rule: reused; maxmin is trained again under the new one
    assert (policies / "rlhf.zip").stat().st_mtime_ns == stamps["rlhf"]
    assert (policies / "mean.zip").stat().st_mtime_ns == stamps["mean"]
    assert (policies / "maxmin.zip").stat().st_mtime_ns != stamps["maxmin"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"train": {"ppo": {"n_step": 64}}}, "train.ppo.n_step: unknown setting (did you mean 'n_steps'?)"),
        ({"train": {"ppo": {"seed": 1}}}, "train.ppo.seed: set by the pipeline"),
        ({"train": {"ppo": {"gamma": 1.5}}}, "train.ppo.gamma: must be in [0, 1]"),
        ({"groups": {"majority": "0.8", "minority": 0.2}}, "groups.majority: expected a share (a number)"),
        ({"groups": {"majority": 0.7, "minority": 0.2}}, "groups: shares must sum to 1"),
        ({"reward": {"k_range": ["a"]}}, "reward.k_range[0]: expected int, got 'a'"),
        ({"reward": {"em": {"n_int": 3}}}, "reward.em.n_int: unknown setting (did you mean 'n_init'?)"),
        ({"evaluate": {"n_episodes": 0}}, "evaluate.n_episodes: must be >= 1, got 0"),
        ({"collect": {"n_users": 10, "mistake_rate": 0.7}}, "collect.mistake_rate: must be in [0, 0.5]"),
        ({"groups": {"majority": {"share": 0.8, "beta": -1}, "minority": 0.2}}, "groups.majority.beta: must be > 0"),
        ({"groups_from": "no_such_module:GROUPS"}, "groups_from: cannot import module 'no_such_module'"),
        ({"groups": {"majority": {"share": 0.8, "reward": "math:nope"}, "minority": 0.2}}, "module 'math' has no attribute 'nope'"),
        ({"methods": ["rlhf", "median"]}, "methods: unknown method ['median']"),
    ],
)
def test_bad_settings_stop_before_any_work(tmp_path, capsys, changes, expected):
    _fails_cleanly(capsys, ["run", _write(tmp_path, **changes)], expected)
    assert not (tmp_path / "run").exists()  # nothing was collected


def test_preferences_from_another_env_are_refused(tmp_path):
    from egalitarian_rl.experiments import ConfigError, ExperimentConfig, Pipeline
    from egalitarian_rl.preferences import PreferenceDataset

    path = _write(tmp_path)
    assert main(["collect", path, "--no-progress"]) == 0
    preferences = tmp_path / "run" / "seed_0" / "preferences.npz"
    other = ExperimentConfig.from_dict({"env_id": "CartPole-v1", "groups": {"left": 0.5, "right": 0.5}, "out_dir": str(tmp_path)})
    pipeline = Pipeline(other, progress_bar=False, log=lambda _: None)
    with pytest.raises(ConfigError, match="collected in 'egalitarian_rl/FairGrid-v0', not in env_id 'CartPole-v1'"):
        pipeline._check_dataset(PreferenceDataset.load(preferences), preferences)


def test_corrupt_preferences_file(tmp_path, capsys):
    path = _write(tmp_path)
    assert main(["collect", path, "--no-progress"]) == 0
    capsys.readouterr()
    preferences = tmp_path / "run" / "seed_0" / "preferences.npz"
    preferences.write_bytes(preferences.read_bytes()[:100])
    _fails_cleanly(capsys, ["fit", path], "truncated or corrupt")


@pytest.mark.parametrize("command", ["demo", "run", "collect", "fit", "train", "evaluate", "report", "assign", "label"])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "egalitarian_rl.cli", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: egalitarian-rl" in result.stdout


@pytest.mark.parametrize("name", ["fairgrid", "halfcheetah", "hopper", "reacher"])
def test_shipped_configs_are_valid(name):
    from egalitarian_rl.experiments import ExperimentConfig, Pipeline

    config = ExperimentConfig.from_yaml(_config_path(name))
    pipeline = Pipeline(config, progress_bar=False, log=lambda _: None)  # validates env, groups, rule and PPO keys
    assert pipeline.population.n_groups == len(config.groups) >= 2
    assert "rlhf" in pipeline.methods and "maxmin" in pipeline.methods


def test_assign_new_users_or_refuse_below_the_threshold(tmp_path, capsys, fairgrid_population):
    import gymnasium as gym

    from egalitarian_rl.preferences import collect_preferences

    config = {"reward": {"n_members": 2, "epochs": 5, "min_confidence": 0.9}, "collect": {"n_users": 30, "comparisons_per_user": 20}}
    path = _write(tmp_path, **config)
    assert main(["fit", path, "--no-progress"]) == 0
    env = gym.make("egalitarian_rl/FairGrid-v0", random_start=True)
    many = collect_preferences(env, fairgrid_population, n_users=10, comparisons_per_user=20, segment_length=10, seed=7)
    many.save(tmp_path / "many.npz")
    capsys.readouterr()
    assert main(["assign", path, str(tmp_path / "many.npz")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10
    # 20 answers each: most users are confidently put in the member named after their true group
    truth = dict(zip(many.users.tolist(), (many.group_names[g] for g in many.user_groups)))
    right = [line for line in lines if line.split(" (")[0].split()[1].isdigit() and f"_{truth[int(line.split()[1])]} (confidence" in line]
    assert len(right) >= 8
    few = collect_preferences(env, fairgrid_population, n_users=10, comparisons_per_user=1, segment_length=10, seed=8)
    few.save(tmp_path / "few.npz")
    assert (
        main(["assign", _write(tmp_path, **{**config, "reward": {**config["reward"], "min_confidence": 0.999}}), str(tmp_path / "few.npz")])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("not personalised") >= 8  # one answer each is not enough to be 99.9% sure
