"""FairGrid: the paper's point on a 5x5 grid.

::

    A . . . B      S start        A majority goal   (majority 1.0 per step)
    . . S . .                     B minority goal   (minority 1.0 per step)
    . . . . .                     C compromise      (majority 0.8, minority 0.6)
    . . . . .
    . . C . .

All three goals are 3 steps from the start, so only the per-step values
matter. With 80/20 shares the share-weighted optimum is A (0.8 per step vs
0.76 at C), which leaves the minority at zero; the max-min optimum is C
(min 0.6 vs 0 at A or B), where the majority keeps 80% of its best return.
Rewards are earned for every step the agent *ends* in a goal cell, so a good
policy walks to a goal and stays there ("stay" is an action).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from egalitarian_rl.preferences.population import GroupRewardLibrary
from egalitarian_rl.preferences.segments import Transitions

SIZE = 5
START = (1, 2)
MAJORITY_GOAL = (0, 0)
MINORITY_GOAL = (0, 4)
COMPROMISE = (4, 2)
MAX_STEPS = 30
#: Up, down, left, right, stay as (row, column) moves.
MOVES = np.array([(-1, 0), (1, 0), (0, -1), (0, 1), (0, 0)])


def _cell_values(values: dict[tuple[int, int], float]) -> np.ndarray:
    table = np.zeros(SIZE * SIZE)
    for (row, col), value in values.items():
        table[row * SIZE + col] = value
    return table


#: Per-cell step reward of each group, indexed by the cell the agent ends in.
CELL_VALUES = {
    "majority": _cell_values({MAJORITY_GOAL: 1.0, COMPROMISE: 0.8}),
    "minority": _cell_values({MINORITY_GOAL: 1.0, COMPROMISE: 0.6}),
}
DEFAULT_SHARES = {"majority": 0.8, "minority": 0.2}


def _cell_reward(values: np.ndarray):
    def reward(transitions: Transitions) -> np.ndarray:
        # next_obs is one-hot over cells, so the reward is a dot product and
        # broadcasts over any leading batch shape.
        return transitions.next_obs @ values

    return reward


GROUPS = GroupRewardLibrary({name: _cell_reward(values) for name, values in CELL_VALUES.items()})


class FairGridEnv(gym.Env):
    """5x5 grid with a majority goal, a minority goal and a compromise.

    Observation: one-hot of the agent's cell, ``(25,)`` float32. Actions:
    ``Discrete(5)`` (up, down, left, right, stay); moves into a wall stay put.
    The env's own reward is the share-weighted mean of the default groups
    (what single-reward RL on an 80/20 population optimises). Episodes are
    truncated after 30 steps by the registered ``TimeLimit``; the lowest
    possible episode return of every group is 0.

    :param random_start: start in a uniformly random cell instead of ``S``
        (gives varied segments for preference collection).
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}
    min_episode_return = 0.0

    def __init__(self, random_start: bool = False, render_mode: str | None = None) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(SIZE * SIZE,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(MOVES))
        self.random_start = random_start
        self.render_mode = render_mode
        self._env_reward = sum(share * CELL_VALUES[name] for name, share in DEFAULT_SHARES.items())
        self._position = np.array(START)

    def _obs(self) -> np.ndarray:
        obs = np.zeros(SIZE * SIZE, dtype=np.float32)
        obs[self._position[0] * SIZE + self._position[1]] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if self.random_start:
            self._position = self.np_random.integers(SIZE, size=2)
        else:
            self._position = np.array(START)
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r} for {self.action_space}")
        self._position = np.clip(self._position + MOVES[int(action)], 0, SIZE - 1)
        cell = self._position[0] * SIZE + self._position[1]
        return self._obs(), float(self._env_reward[cell]), False, False, {}

    def render(self) -> str | np.ndarray:
        """``ansi``: the grid as text; ``rgb_array``: a (100, 100, 3) picture (goals coloured, agent black)."""
        if self.render_mode == "rgb_array":
            cell = 20
            image = np.full((SIZE * cell, SIZE * cell, 3), 235, dtype=np.uint8)
            colours = {MAJORITY_GOAL: (66, 133, 244), MINORITY_GOAL: (234, 67, 53), COMPROMISE: (251, 188, 5)}
            for (row, col), colour in colours.items():
                image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = colour
            row, col = self._position
            image[row * cell + 5 : (row + 1) * cell - 5, col * cell + 5 : (col + 1) * cell - 5] = 0
            return image
        grid = [["." for _ in range(SIZE)] for _ in range(SIZE)]
        for mark, (row, col) in (("A", MAJORITY_GOAL), ("B", MINORITY_GOAL), ("C", COMPROMISE)):
            grid[row][col] = mark
        grid[self._position[0]][self._position[1]] = "@"
        return "\n".join(" ".join(row) for row in grid)
