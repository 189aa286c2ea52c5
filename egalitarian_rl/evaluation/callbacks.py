"""Record every group's *true* episode return during training (for curves and tensorboard)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from egalitarian_rl.preferences.wrappers import GROUP_REWARDS_KEY


class GroupReturnCallback(BaseCallback):
    """Sums ``info["group_rewards"]`` per episode of the training envs.

    Works for any SB3 algorithm whose envs are wrapped in
    :class:`~egalitarian_rl.preferences.MultiUserPreferenceWrapper`. At each
    rollout's end it logs ``groups/true_return_<name>`` (mean over the episodes
    finished in that rollout) and appends a point to :attr:`curve`.

    :param group_names: names of the true groups, in ``info["group_rewards"]`` order.
    """

    def __init__(self, group_names: Sequence[str], verbose: int = 0) -> None:
        super().__init__(verbose)
        self.group_names = tuple(group_names)
        self.curve_steps: list[int] = []
        self.curve_returns: list[np.ndarray] = []
        self._running: np.ndarray | None = None
        self._finished: list[np.ndarray] = []

    def _on_step(self) -> bool:
        infos, dones = self.locals["infos"], self.locals["dones"]
        rewards = np.stack([info[GROUP_REWARDS_KEY] for info in infos])
        if self._running is None:
            self._running = np.zeros_like(rewards)
        self._running += rewards
        for index in np.flatnonzero(dones):
            self._finished.append(self._running[index].copy())
            self._running[index] = 0.0
        return True

    def _on_rollout_end(self) -> None:
        if not self._finished:
            return
        mean_returns = np.mean(self._finished, axis=0)
        self._finished = []
        self.curve_steps.append(self.num_timesteps)
        self.curve_returns.append(mean_returns)
        for name, value in zip(self.group_names, mean_returns):
            self.logger.record(f"groups/true_return_{name}", float(value))

    @property
    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``steps`` ``(n_points,)`` and mean true group returns ``(n_points, K)``."""
        returns = np.array(self.curve_returns) if self.curve_returns else np.zeros((0, len(self.group_names)))
        return np.array(self.curve_steps), returns
