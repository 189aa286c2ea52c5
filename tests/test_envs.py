"""Envs, their group libraries, and MultiUserPreferenceWrapper on real envs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator

import gymnasium as gym
import numpy as np
import pytest
from egalitarian_rl.envs import gridworld
from egalitarian_rl.envs.mo import VECTOR_REWARD_KEY, VectorRewardAdapter, mo_group_library
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from egalitarian_rl import envs
from egalitarian_rl.preferences import GROUP_REWARDS_KEY, MultiUserPreferenceWrapper, Transitions, rollout_segments

# Importing envs registers them; every egalitarian_rl/ id must pass the checkers.
# TextGen-v0 needs a tokenizer and prompts to be made: tests/test_textgen.py runs the same checks on it.
REGISTERED_IDS = sorted(env_id for env_id in gym.registry if env_id.startswith("egalitarian_rl/") and env_id != envs.TEXTGEN_ID)
# (env id, population shares) wrapped with MultiUserPreferenceWrapper in the checker tests.
WRAPPED = [
    ("CartPole-v1", {"left": 0.5, "right": 0.5}),
    ("HalfCheetah-v5", {"fast": 0.8, "calm": 0.2}),
    (envs.FAIRGRID_ID, {"majority": 0.8, "minority": 0.2}),
]

# Warnings the checkers give on purpose: we check wrapped envs, and MuJoCo / CartPole
# observations are unbounded. Anything else a checker warns about fails the test.
EXPECTED_CHECKER_WARNINGS = (
    r".*is different from the unwrapped version",
    r".*A Box observation space (minimum|maximum) value is -?infinity",
)


@contextlib.contextmanager
def only_expected_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        for pattern in EXPECTED_CHECKER_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def run_checkers(make_env: Callable[[], gym.Env]) -> None:
    """Gymnasium's and SB3's env checkers, each on a fresh env."""
    with only_expected_warnings():
        env = make_env()
        # "human" rendering needs a display (MuJoCo's opens a GLFW window): not checkable here.
        skip_render = "human" in env.metadata.get("render_modes", [])
        gym_check_env(env, skip_render_check=skip_render)
        env.close()
        env = make_env()
        sb3_check_env(env, warn=True)
        env.close()


def make_wrapped(env_id: str, shares: dict[str, float]) -> MultiUserPreferenceWrapper:
    return MultiUserPreferenceWrapper(gym.make(env_id), envs.make_population(env_id, shares))


def all_groups_population(env_id: str):
    names = sorted(envs.group_library(env_id).rewards)
    return envs.make_population(env_id, {name: 1.0 / len(names) for name in names})


# --- registration -----------------------------------------------------------------------------


def test_registered_ids_have_group_libraries():
    ours = {envs.FAIRGRID_ID, envs.MO_HALFCHEETAH_ID, envs.MO_HOPPER_ID}
    assert ours <= set(REGISTERED_IDS)
    assert ours <= set(envs._GROUP_LIBRARIES)


def test_importing_envs_is_lazy():
    code = (
        "import sys, envs, gymnasium as gym; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mujoco', 'mo_gymnasium')); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- env checkers -----------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", REGISTERED_IDS)
def test_registered_env_passes_checkers(env_id):
    run_checkers(lambda: gym.make(env_id))


@pytest.mark.parametrize(("env_id", "shares"), WRAPPED, ids=[env_id for env_id, _ in WRAPPED])
def test_wrapped_env_passes_checkers(env_id, shares):
    run_checkers(lambda: make_wrapped(env_id, shares))


# --- wrapper: group rewards, and nothing else changed -----------------------------------------


@pytest.mark.parametrize("env_id", sorted(set(envs._GROUP_LIBRARIES) - {envs.TEXTGEN_ID}))
def test_step_group_rewards_match_batched(env_id):
    """info["group_rewards"] (K,) per step == population.group_rewards on the recorded segments."""
    population = all_groups_population(env_id)
    env = MultiUserPreferenceWrapper(gym.make(env_id), population)
    env.reset(seed=1)
    info = env.step(env.action_space.sample())[-1]
    assert info[GROUP_REWARDS_KEY].shape == (population.n_groups,)
    assert info[GROUP_REWARDS_KEY].dtype == np.float64

    # Record the wrapper's per-step values along with what the reward functions read.
    keys = (*population.info_keys, GROUP_REWARDS_KEY)
    segments = rollout_segments(env, n_segments=4, segment_length=6, info_keys=keys, seed=0)
    per_step = segments.infos[GROUP_REWARDS_KEY]
    batched = population.group_rewards(segments)
    assert per_step.shape == batched.shape == (4, 6, population.n_groups)
    np.testing.assert_allclose(per_step, batched, rtol=1e-9, atol=1e-12)
    for k, group in enumerate(population.groups):  # each column is that group's own function
        np.testing.assert_allclose(batched[..., k], group.reward_fn(segments), rtol=1e-12)
    env.close()


def test_half_cheetah_group_formulas():
    population = envs.make_population("HalfCheetah-v5", {"fast": 0.25, "backward": 0.25, "gentle": 0.25, "calm": 0.25})
    env = MultiUserPreferenceWrapper(gym.make("HalfCheetah-v5"), population)
    env.reset(seed=0)
    for _ in range(5):
        info = env.step(env.action_space.sample())[-1]
        v, ctrl = info["x_velocity"], info["reward_ctrl"]
        expected = [v, -v, 10 * ctrl - abs(v - 1.0), ctrl - abs(v)]
        np.testing.assert_allclose(info[GROUP_REWARDS_KEY], expected, rtol=1e-6)
    env.close()


@pytest.mark.parametrize(("env_id", "shares"), WRAPPED, ids=[env_id for env_id, _ in WRAPPED])
def test_wrapper_leaves_obs_and_reward_unchanged(env_id, shares):
    raw, wrapped = gym.make(env_id), make_wrapped(env_id, shares)
    raw.action_space.seed(3)
    actions = [raw.action_space.sample() for _ in range(60)]
    obs_r, info_r = raw.reset(seed=3)
    obs_w, info_w = wrapped.reset(seed=3)
    np.testing.assert_array_equal(obs_r, obs_w)
    assert info_r.keys() == info_w.keys()
    for action in actions:
        obs_r, rew_r, term_r, trunc_r, info_r = raw.step(action)
        obs_w, rew_w, term_w, trunc_w, info_w = wrapped.step(action)
        np.testing.assert_array_equal(obs_r, obs_w)
        assert rew_r == rew_w and type(rew_r) is type(rew_w)
        assert (term_r, trunc_r) == (term_w, trunc_w)
        assert set(info_w) == {*info_r, GROUP_REWARDS_KEY}
        for key, value in info_r.items():
            np.testing.assert_array_equal(value, info_w[key])
        if term_r or trunc_r:
            np.testing.assert_array_equal(raw.reset()[0], wrapped.reset()[0])
    raw.close()
    wrapped.close()


# --- group libraries: errors --------------------------------------------------------------------


def test_unknown_group_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown group \['sprint'\].*offers.*'calm'"):
        envs.make_population("HalfCheetah-v5", {"fast": 0.5, "sprint": 0.5})


def test_unknown_env_id_is_a_clear_error():
    with pytest.raises(ValueError, match="no user groups are defined for env 'Pong-v5'"):
        envs.group_library("Pong-v5")


# --- MO-Gymnasium adapter -----------------------------------------------------------------------


def test_mo_half_cheetah_matches_half_cheetah():
    """Same obs as HalfCheetah-v5; env reward with weights (1, 0.1) = HalfCheetah's reward."""
    raw, mo = gym.make("HalfCheetah-v5"), gym.make(envs.MO_HALFCHEETAH_ID)
    weights = np.array([1.0, 0.1])
    np.testing.assert_array_equal(raw.reset(seed=5)[0], mo.reset(seed=5)[0])
    raw.action_space.seed(5)
    for _ in range(20):
        action = raw.action_space.sample()
        obs_r, rew_r, *_ = raw.step(action)
        obs_m, rew_m, *_, info = mo.step(action)
        np.testing.assert_allclose(obs_r, obs_m)
        vector = info[VECTOR_REWARD_KEY]
        assert vector.shape == (2,) and vector.dtype == np.float64 and isinstance(rew_m, float)
        assert rew_m == pytest.approx(float(vector @ weights))
        assert rew_m == pytest.approx(rew_r, abs=1e-5)  # the MO env rounds its vector to float32
        assert vector[0] == pytest.approx(info["x_velocity"], abs=1e-6)
    raw.close()
    mo.close()


def test_vector_reward_adapter_sums_by_default_and_checks_weights():
    env = gym.make(envs.MO_HOPPER_ID, weights=None)
    env.reset(seed=0)
    _, reward, *_, info = env.step(env.action_space.sample())
    assert reward == pytest.approx(info[VECTOR_REWARD_KEY].sum())
    inner = env.unwrapped
    with pytest.raises(ValueError, match="2 weights for a 3-dimensional reward vector"):
        VectorRewardAdapter(inner, weights=(1.0, 0.0))
    env.close()


def test_mo_group_library_broadcasts_and_validates():
    library = mo_group_library({"a": (1.0, 0.0), "b": (0.5, -2.0)})
    assert library.info_keys == (VECTOR_REWARD_KEY,)
    vectors = np.random.default_rng(0).normal(size=(3, 4, 2))
    population = library.population({"a": 0.7, "b": 0.3})
    segments = Transitions(np.zeros((3, 4, 1)), np.zeros((3, 4, 1)), np.zeros((3, 4, 1)), {VECTOR_REWARD_KEY: vectors})
    np.testing.assert_allclose(population.group_rewards(segments), vectors @ np.array([[1.0, 0.5], [0.0, -2.0]]))
    step = population.step_rewards(np.zeros(1), np.zeros(1), np.zeros(1), {VECTOR_REWARD_KEY: vectors[0, 0]})
    np.testing.assert_allclose(step, population.group_rewards(segments)[0, 0])
    with pytest.raises(ValueError, match="same length"):
        mo_group_library({"a": (1.0, 0.0), "b": (1.0, 0.0, 0.0)})
    with pytest.raises(ValueError, match="finite"):
        mo_group_library({"a": (1.0, np.nan)})
    with pytest.raises(ValueError, match="at least one group"):
        mo_group_library({})


# --- FairGrid layout ----------------------------------------------------------------------------


def _distance(a: tuple[int, int], b: tuple[int, int]) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def _walk_and_stay(goal: tuple[int, int]) -> np.ndarray:
    """Per-group episode returns of walking straight to ``goal`` and staying, read from the wrapper."""
    population = envs.make_population(envs.FAIRGRID_ID, gridworld.DEFAULT_SHARES)
    env = MultiUserPreferenceWrapper(gym.make(envs.FAIRGRID_ID), population)
    env.reset(seed=0)
    position, returns, done = np.array(gridworld.START), np.zeros(population.n_groups), False
    up, down, left, right, stay = range(5)
    while not done:
        rows, cols = goal[0] - position[0], goal[1] - position[1]
        action = (down if rows > 0 else up) if rows else (right if cols > 0 else left) if cols else stay
        position = np.clip(position + gridworld.MOVES[action], 0, gridworld.SIZE - 1)
        _, _, terminated, truncated, info = env.step(action)
        returns += info[GROUP_REWARDS_KEY]
        done = terminated or truncated
    env.close()
    return returns


def test_fairgrid_layout_separates_weighted_and_maxmin_optima():
    names = list(gridworld.DEFAULT_SHARES)
    shares = np.array([gridworld.DEFAULT_SHARES[name] for name in names])
    values = np.stack([gridworld.CELL_VALUES[name] for name in names], axis=1)  # (cells, K)
    cell = lambda index: divmod(int(index), gridworld.SIZE)  # noqa: E731
    # Per-step values: share-weighted best cell is the majority goal, max-min best is the compromise.
    assert cell(np.argmax(values @ shares)) == gridworld.MAJORITY_GOAL
    assert cell(np.argmax(values.min(axis=1))) == gridworld.COMPROMISE
    # All goals equally far from the start, so per-step values decide the episode returns too.
    goals = [gridworld.MAJORITY_GOAL, gridworld.MINORITY_GOAL, gridworld.COMPROMISE]
    assert len({_distance(gridworld.START, goal) for goal in goals}) == 1
    returns = np.array([_walk_and_stay(goal) for goal in goals])  # (goals, K), from real episodes
    steps_at_goal = gridworld.MAX_STEPS - _distance(gridworld.START, gridworld.MAJORITY_GOAL) + 1
    np.testing.assert_allclose(returns[0], steps_at_goal * values[np.ravel_multi_index(goals[0], (5, 5))])
    assert goals[int(np.argmax(returns @ shares))] == gridworld.MAJORITY_GOAL
    assert goals[int(np.argmax(returns.min(axis=1)))] == gridworld.COMPROMISE
    assert returns[2, 0] >= 0.8 * returns[0, 0]  # the majority keeps 80% of its best at the compromise


def test_fairgrid_share_weighted_optimum_over_all_policies_is_the_majority_goal():
    """Finite-horizon value iteration on the share-weighted reward: no policy beats walking to A."""
    shares = gridworld.DEFAULT_SHARES
    reward = sum(share * gridworld.CELL_VALUES[name] for name, share in shares.items())
    cells = [(r, c) for r in range(gridworld.SIZE) for c in range(gridworld.SIZE)]
    shape = (gridworld.SIZE, gridworld.SIZE)
    successors = np.array(
        [[np.ravel_multi_index(tuple(np.clip(np.add(rc, move), 0, gridworld.SIZE - 1)), shape) for move in gridworld.MOVES] for rc in cells]
    )
    value = np.zeros(len(cells))
    for _ in range(gridworld.MAX_STEPS):
        value = (reward[successors] + value[successors]).max(axis=1)
    best = value[np.ravel_multi_index(gridworld.START, shape)]
    assert best == pytest.approx(_walk_and_stay(gridworld.MAJORITY_GOAL) @ np.array(list(shares.values())))
