"""The fairness frontier: what every fixed weighting of the two groups achieves, and where each method lands.

For a pipeline config with two groups, one policy is trained per weight vector
``(w, 1 - w)`` of a grid (``w`` from 1 to 0), twice:

- ``true``: SB3 PPO on ``w * r_1 + (1 - w) * r_2`` of the groups' *true* rewards, each
  z-scored with the preference data's statistics, exactly as the oracles are (the
  ends of the sweep are the two oracles);
- ``learned``: :class:`MaxMinPPO` on the EM mixture with the rule ``Mean(weights)``,
  through the pipeline's own training code, so rewards are normalised as the
  ``maxmin`` / ``mean`` methods normalise them (``mean`` is the point whose weights
  are the EM shares). Weights are given per true group and moved onto the member
  named after that group (:meth:`Pipeline.member_names`); a mixture whose members do
  not match the groups one to one gets no learned points (said in the log and in
  ``frontier.json``'s ``notes``).

Every policy is evaluated like the pipeline's (same episodes, same seeds:
``Pipeline.evaluate``'s ``100_000 + seed``) by every group's true return. The
points, their upper-right convex envelope (playing one of two policies at random
per episode achieves any mixture of their returns, so the convex hull is
achievable), the max-min point and the methods of the run's ``metrics.json`` go to
``frontier.json`` and ``frontier.png`` beside ``metrics.json``; an existing
``report.md`` gets a "Fairness frontier" section (``egalitarian-rl report`` adds it too).

Each point's policy, learning curve and returns are saved under
``seed_<s>/frontier/`` with a record of the settings they were computed from (a
hash, like the pipeline's stage records, including the run id of the preferences
or fitted rewards they used): a rerun reuses every up-to-date point, a changed
setting retrains only what it affects, and the config's own preferences and
rewards are reused (collected and fitted first if missing).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO

from egalitarian_rl.algorithms.aggregation import GroupRewardNormalizer, Mean
from egalitarian_rl.algorithms.maxmin_ppo import MaxMinPPO
from egalitarian_rl.evaluation import evaluate_group_returns
from egalitarian_rl.evaluation.callbacks import GroupReturnCallback
from egalitarian_rl.evaluation.plots import frontier_envelope, maxmin_index, maxmin_on_envelope, plot_frontier
from egalitarian_rl.evaluation.report import FRONTIER_FILE, FRONTIER_PLOT, METRICS_FILE, REPORT_FILE, frontier_section, method_positions
from egalitarian_rl.experiments.config import ConfigError, ExperimentConfig
from egalitarian_rl.experiments.pipeline import Pipeline, _fingerprint
from egalitarian_rl.io import save_json_atomic, to_jsonable, write_atomic, write_text_atomic
from egalitarian_rl.preferences import MultiUserPreferenceWrapper
from egalitarian_rl.preferences.segments import concatenate_transitions
from egalitarian_rl.rewards.vec_env import GroupRewardVecEnv, true_rewards

#: Reward sources of the frontier's policies: the groups' true rewards and the fitted EM mixture.
SOURCES = ("true", "learned")
#: Default number of weights on the grid (w = 1, 0.875, ..., 0).
DEFAULT_POINTS = 9


def weight_grid(n_points: int) -> np.ndarray:
    """``(n_points, 2)`` weight vectors ``(w, 1 - w)``, ``w`` evenly spaced from 1 (all on group 1) to 0.

    :raises ConfigError: ``n_points < 2`` (a frontier needs both ends) or more than 1001 (points are
        saved under their weight to 3 decimals).
    """
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)) or n_points < 2:
        raise ConfigError(f"--points: a frontier needs at least 2 weights (both ends), got {n_points!r}")
    if n_points > 1001:
        raise ConfigError(f"--points: at most 1001 (each point is saved under its weight to 3 decimals), got {n_points}")
    first = np.round(np.linspace(1.0, 0.0, int(n_points)), 10)  # rounded: the weights are part of each point's key
    return np.stack([first, 1.0 - first], axis=1)


def _tag(source: str, weights: Sequence[float]) -> str:
    """File stem of one point: ``true_w0.750`` (the weight on group 1)."""
    return f"{source}_w{weights[0]:.3f}"


class FrontierPipeline(Pipeline):
    """A :class:`Pipeline` that also trains the fixed-weight policies of the fairness frontier.

    Same arguments as :class:`Pipeline` (``force`` names pipeline stages; redo the
    frontier's own points with :meth:`frontier`'s ``force``). The config must have
    exactly two groups.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        progress_bar: bool = True,
        log: Callable[[str], None] = print,
        force: Iterable[str] = (),
    ) -> None:
        super().__init__(config, progress_bar=progress_bar, log=log, force=force)
        if len(self.group_names) != 2:
            raise ConfigError(
                f"groups: the frontier sweeps weights (w, 1 - w) over exactly 2 groups; {config.name!r} has "
                f"{len(self.group_names)}: {self.group_names}"
            )
        if getattr(config.train, "normalize_obs", False):
            # A point's policy would need its observation statistics saved and applied at evaluation, as the
            # pipeline's own policies have; not done here yet, so refuse rather than evaluate on the wrong inputs.
            raise ConfigError("train.normalize_obs: the frontier does not support observation normalisation yet; set it to false")
        # Set only while a learned point trains: the pipeline's "maxmin" training then uses these fixed weights.
        self._fixed_rule: Mean | None = None

    # ------------------------------------------------------------------ hooks into the pipeline's training
    def _maxmin_rule(self) -> Any:
        return self._fixed_rule if self._fixed_rule is not None else super()._maxmin_rule()

    def _ppo_kwargs(self, seed: int) -> dict[str, Any]:
        kwargs = super()._ppo_kwargs(seed)
        if self._fixed_rule is not None:
            # Dozens of runs that SB3 would name maxmin_<n> beside the method's own: the saved curves are the record instead.
            kwargs["tensorboard_log"] = None
        return kwargs

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Silence the pipeline's own messages (it would call a learned point "maxmin")."""
        log, self.log = self.log, lambda _message: None
        try:
            yield
        finally:
            self.log = log

    # ------------------------------------------------------------------ paths and records
    def frontier_dir(self, seed: int) -> Path:
        """``seed_<s>/frontier/``: each point's policy, curve, returns and record."""
        return self.seed_dir(seed) / "frontier"

    def _point_paths(self, seed: int, source: str, weights: Sequence[float]) -> dict[str, Path]:
        folder, tag = self.frontier_dir(seed), _tag(source, weights)
        return {
            "policy": folder / "policies" / f"{tag}.zip",
            "curve": folder / "policies" / f"{tag}.curve.npz",
            "returns": folder / "returns" / f"{tag}.npy",
            "record": folder / "stages" / f"{tag}.json",
        }

    def _point_keys(self, seed: int, source: str, weights: Sequence[float]) -> tuple[dict[str, Any], str, str]:
        """What a point's policy and its returns are computed from: ``(train inputs, train key, evaluate key)``."""
        config = self.config.to_dict()
        upstream = "collect" if source == "true" else "fit"  # the true rewards' normaliser reads the preferences
        inputs = {
            "train": config["train"],
            "env_kwargs": config["env_kwargs"],
            "source": source,
            "weights": [float(w) for w in weights],
            "groups": self.group_names,
            "seed": seed,
            f"{upstream}_run": self._stage_run(upstream, seed),
        }
        train_key = _fingerprint(inputs)
        evaluate_key = _fingerprint({"train_key": train_key, "evaluate": config["evaluate"], "env_kwargs": config["env_kwargs"]})
        return inputs, train_key, evaluate_key

    # ------------------------------------------------------------------ training one point
    def member_weights(self, seed: int, weights: Sequence[float]) -> tuple[np.ndarray | None, list[str], str]:
        """Move weights on the true groups onto the EM mixture's members.

        :param weights: ``(K,)`` weights per true group, in ``group_names`` order.
        :return: ``(member weights (n_members,) or None, member names, reason when None)``; ``None``
            when the members do not match the groups one to one (then no weighting of the members
            means the same as ``weights``).
        """
        _, em = self.fit(seed)
        names = self.member_names(self.collect(seed), em)
        # member_names calls member k "m<k>_<the true group most of its users belong to>".
        served = [name.removeprefix(f"m{k}_") for k, name in enumerate(names)]
        if sorted(served) != sorted(self.group_names):
            return None, names, f"seed {seed}: the EM members {names} do not match the groups {self.group_names} one to one"
        return np.array([weights[self.group_names.index(group)] for group in served], dtype=np.float64), names, ""

    def _train_true(self, seed: int, weights: np.ndarray) -> tuple[PPO, tuple[np.ndarray, np.ndarray]]:
        """SB3 PPO on the weighted sum of the groups' z-scored true rewards (the oracles' scaling)."""
        data = self.collect(seed)
        # As for the oracles: statistics of every step of the compared segments (random behaviour).
        steps = concatenate_transitions([data.segments_a.flatten_steps(), data.segments_b.flatten_steps()])
        normalizer = GroupRewardNormalizer.from_data(self.population.group_rewards(steps))
        venv = self.make_vec_env(seed)
        rule = Mean(weights=weights)
        env = GroupRewardVecEnv(venv, true_rewards(), rule, len(self.group_names), normalizer, self.group_names)
        # No tensorboard run per point (SB3 would name them PPO_<n>): the saved curves are the record.
        model = PPO("MlpPolicy", env, **{**self._ppo_kwargs(seed), "tensorboard_log": None})
        callback = GroupReturnCallback(self.group_names)
        model.learn(self.config.train.total_timesteps, callback=callback, progress_bar=self.progress_bar)
        venv.close()
        return model, callback.curve

    def _train_learned(self, seed: int, member_weights: np.ndarray) -> tuple[MaxMinPPO, tuple[np.ndarray, np.ndarray]]:
        """The pipeline's ``maxmin`` training with the rule ``Mean(member_weights)``: its normaliser, critics and PPO settings."""
        self._fixed_rule = Mean(weights=member_weights)
        try:
            with self._quiet():
                return self._train_offline(seed, "maxmin")
        finally:
            self._fixed_rule = None

    def _evaluate_policy(self, seed: int, model: Any) -> np.ndarray:
        """``(n_episodes, K)`` true group returns on the same episodes as :meth:`Pipeline.evaluate`."""
        env = MultiUserPreferenceWrapper(gym.make(self.config.env_id, **self.config.env_kwargs), self.population)
        cfg = self.config.evaluate
        returns = evaluate_group_returns(model, env, cfg.n_episodes, seed=100_000 + seed, deterministic=cfg.deterministic)
        env.close()
        return returns

    def frontier_point(self, seed: int, source: str, weights: Sequence[float], force: bool = False) -> dict[str, Any] | None:
        """Train (or reuse) and evaluate one point.

        :param seed: the pipeline seed whose preferences / rewards are used; also PPO's seed.
        :param source: ``"true"`` or ``"learned"``.
        :param weights: ``(2,)`` weights per group, in ``group_names`` order.
        :param force: retrain and re-evaluate even if the saved point is up to date.
        :return: ``{"returns": (n_episodes, K) array, "member_weights": {...} (learned only), "reused": bool}``,
            or ``None`` for a learned point the mixture cannot express (see :meth:`member_weights`).
        """
        if source not in SOURCES:
            raise ValueError(f"unknown frontier source {source!r}; choose from {list(SOURCES)}")
        weights = np.asarray(weights, dtype=np.float64)
        extra: dict[str, Any] = {}
        if source == "learned":
            members, names, _ = self.member_weights(seed, weights)
            if members is None:
                return None
            extra["member_weights"] = dict(zip(names, members.tolist()))
        paths = self._point_paths(seed, source, weights)
        inputs, train_key, evaluate_key = self._point_keys(seed, source, weights)
        record = json.loads(paths["record"].read_text()) if paths["record"].exists() else {}
        trained = not force and record.get("train_key") == train_key and paths["policy"].exists() and paths["curve"].exists()
        evaluated = trained and record.get("evaluate_key") == evaluate_key and paths["returns"].exists()
        if evaluated:
            return {"returns": np.load(paths["returns"], allow_pickle=False), "reused": True, **extra}
        self._threads()
        label = f"[seed {seed}] frontier {source} rewards, weights {weights.round(3).tolist()}"
        model: Any
        if trained:
            model = (PPO if source == "true" else MaxMinPPO).load(paths["policy"], device="cpu")
        else:
            if record:
                self.log(f"{label}: {'forced' if force else 'settings changed since it was saved'}, redoing")
            self.log(f"{label}: training for {self.config.train.total_timesteps} steps")
            model, (curve_steps, curve_returns) = (
                self._train_true(seed, weights) if source == "true" else self._train_learned(seed, members)
            )
            write_atomic(paths["policy"], model.save)
            write_atomic(paths["curve"], lambda handle: np.savez(handle, steps=curve_steps, returns=curve_returns))
            # The record follows the policy (a crash in between retrains); no evaluate key until the returns exist.
            record = {"train_key": train_key, "evaluate_key": None, "run_id": uuid.uuid4().hex, "inputs": inputs}
            save_json_atomic(record, paths["record"])
        returns = self._evaluate_policy(seed, model)
        write_atomic(paths["returns"], lambda handle: np.save(handle, returns, allow_pickle=False))
        save_json_atomic({**record, "evaluate_key": evaluate_key}, paths["record"])
        return {"returns": returns, "reused": False, **extra}

    # ------------------------------------------------------------------ the whole frontier
    def frontier(self, n_points: int = DEFAULT_POINTS, force: bool = False) -> Path:
        """Every point of the grid for every seed, then ``frontier.json``, ``frontier.png`` and the report section.

        :param n_points: weights on the grid (see :func:`weight_grid`), >= 2.
        :param force: retrain every point even if saved (collect and fit are reused; use the
            pipeline's ``force`` to redo those).
        :return: the path of ``frontier.json``.
        """
        grid = weight_grid(n_points)
        seeds = list(self.config.seeds)
        returns: dict[tuple[str, int], list[np.ndarray]] = {}
        member_weights: dict[tuple[str, int], dict[str, Any]] = {}
        notes: list[str] = []
        for seed in seeds:
            self.fit(seed)  # collect and fit first (reused when saved): every point reads them
            for source in SOURCES:
                if source == "learned":
                    _, _, reason = self.member_weights(seed, grid[0])
                    if reason:
                        self.log(f"[seed {seed}] frontier: no learned points ({reason})")
                        notes.append(f"no learned points: {reason}")
                        continue
                for index, weights in enumerate(grid):
                    point = self.frontier_point(seed, source, weights, force=force)
                    assert point is not None  # the mixture was checked above
                    returns.setdefault((source, index), []).append(point["returns"])
                    if "member_weights" in point:
                        member_weights.setdefault((source, index), {})[f"seed_{seed}"] = point["member_weights"]
        metrics = self._metrics()
        frontier = self._summarise(grid, seeds, returns, member_weights, notes, metrics)
        path = save_json_atomic(to_jsonable(frontier), self.out_dir / FRONTIER_FILE)
        plot_frontier(frontier, self.out_dir / FRONTIER_PLOT, metrics)
        self._update_report(frontier, metrics)
        return path

    def _metrics(self) -> dict[str, Any] | None:
        """The run's ``metrics.json`` (its methods are marked on the frontier), or ``None`` before ``run`` / ``report``."""
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            return None
        metrics = json.loads(path.read_text())
        if list(metrics.get("groups", [])) != self.group_names:
            self.log(f"frontier: {path} is for groups {metrics.get('groups')}, not {self.group_names}; methods not marked")
            return None
        return metrics

    def _summarise(
        self,
        grid: np.ndarray,
        seeds: list[int],
        returns: dict[tuple[str, int], list[np.ndarray]],
        member_weights: dict[tuple[str, int], dict[str, Any]],
        notes: list[str],
        metrics: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """``frontier.json``'s content: points pooled over seeds (as ``metrics.json`` pools), envelope, max-min point, methods."""
        points = []
        for (source, index), per_seed in returns.items():
            pooled = np.concatenate(per_seed, axis=0)  # (n_seeds * n_episodes, K), every episode counts once
            point: dict[str, Any] = {
                "source": source,
                "weights": dict(zip(self.group_names, grid[index].tolist())),
                "groups": {
                    g: {
                        "mean_return": float(pooled[:, k].mean()),
                        "std_return": float(pooled[:, k].std()),
                        "seed_means": [float(r[:, k].mean()) for r in per_seed],
                    }
                    for k, g in enumerate(self.group_names)
                },
                "min_return": float(pooled.mean(axis=0).min()),
                "n_episodes": int(pooled.shape[0]),
            }
            if (source, index) in member_weights:
                point["member_weights"] = member_weights[(source, index)]
            points.append(point)
        means = np.array([[p["groups"][g]["mean_return"] for g in self.group_names] for p in points])
        envelope = frontier_envelope(means)
        best = maxmin_index(means)
        mixture = maxmin_on_envelope(means, envelope)
        frontier: dict[str, Any] = {
            "name": self.config.name,
            "env_id": self.config.env_id,
            "groups": self.group_names,
            "seeds": seeds,
            "weight_grid": grid.tolist(),
            "total_timesteps": self.config.train.total_timesteps,
            "evaluation": {
                "n_episodes_per_seed": self.config.evaluate.n_episodes,
                "deterministic": self.config.evaluate.deterministic,
                "episode_seeds": "100000 + seed + episode (the pipeline's evaluation episodes)",
            },
            "points": points,
            "envelope": envelope.tolist(),
            "maxmin_point": {
                "index": best,
                "source": points[best]["source"],
                "weights": points[best]["weights"],
                "returns": dict(zip(self.group_names, means[best].tolist())),
                "min_return": float(means[best].min()),
            },
            "maxmin_mixture": {
                "returns": dict(zip(self.group_names, mixture["returns"])),
                "min_return": mixture["min_return"],
                "policies": mixture["mix"],
                "probability_of_second": mixture["weight_j"],
            },
            "notes": notes,
        }
        if metrics is not None:
            frontier["methods"] = method_positions(frontier, metrics)
        return frontier

    def _update_report(self, frontier: dict[str, Any], metrics: dict[str, Any] | None) -> None:
        """Put (or replace) the "Fairness frontier" section of an existing ``report.md``."""
        path = self.out_dir / REPORT_FILE
        if not path.exists():
            return
        text = path.read_text()
        heading = "\n## Fairness frontier\n"
        start = text.find(heading)
        if start >= 0:  # replace the old section, keeping anything after it
            following = text.find("\n## ", start + len(heading))
            text = text[:start] + (text[following:] if following >= 0 else "\n")
        write_text_atomic(text.rstrip("\n") + "\n\n" + frontier_section(frontier, metrics) + "\n", path)


__all__ = ["DEFAULT_POINTS", "SOURCES", "FrontierPipeline", "weight_grid"]
