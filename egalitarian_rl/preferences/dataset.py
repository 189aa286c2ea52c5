"""PreferenceDataset: who compared which two segments, and what they said.

Held-out evaluation needs held-out *segments*, not only held-out comparisons: a
reward that has seen a segment in training can score it from memory. A dataset
may therefore record which segment of the collection pool each side of a
comparison is (``segment_ids``) and a ``fold`` per comparison: comparisons of
different folds never share a segment (:func:`~egalitarian_rl.preferences.collect_preferences`
draws the pairs of each fold from its own part of the pool). Splits then hold
out whole folds (see :meth:`PreferenceDataset.split_by_comparison`).

Large data (issue 10: a million comparisons): :class:`PooledPreferenceDataset` stores every
distinct segment once, in a pool, and the comparisons as pairs of pool rows (``segment_ids``).
A million comparisons of 25-step HalfCheetah segments drawn from 200,000 segments then take
0.8 GB instead of 8 GB; EM (:class:`~egalitarian_rl.rewards.EMRewardMixture`) encodes and
scores each pool segment once instead of once per comparison it appears in.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from egalitarian_rl.io import write_atomic
from egalitarian_rl.preferences.segments import Transitions, concatenate_transitions

_FORMAT_VERSION = 1
_VALID_LABELS = (0.0, 0.5, 1.0)


class PreferenceDatasetError(ValueError):
    """A preference dataset (in memory or on disk) is malformed."""


@dataclass
class PreferenceDataset:
    """Pairwise comparisons of segments by identified users.

    :param user_ids: ``(N,)`` which user made comparison ``i``.
    :param segments_a: first segment of each comparison, leading shape ``(N, L)``.
    :param segments_b: second segment, same shapes as ``segments_a``.
    :param labels: ``(N,)`` probability that ``a`` is preferred: 1 (a), 0 (b) or 0.5 (equal).
    :param users: ``(U,)`` every known user id (a user may have no comparisons,
        for example after a split).
    :param user_groups: ``(U,)`` true group index of each user, -1 where unknown.
    :param group_names: names of the true groups indexed by ``user_groups``.
    :param metadata: JSON-serialisable facts about the data (env id, action count, ...).
    :param segment_ids: ``(N, 2)`` id of segment ``a`` and ``b`` of each comparison in the pool
        they were drawn from (equal ids = the same segment); ``None`` when unknown (hand-built
        data, files written before ids were recorded).
    :param folds: ``(N,)`` segment-disjoint block of each comparison: two comparisons in
        different folds never share a segment. ``None`` when unknown; with ``segment_ids``
        the connected components of the comparison graph are used instead.
    """

    user_ids: np.ndarray
    segments_a: Transitions
    segments_b: Transitions
    labels: np.ndarray
    users: np.ndarray
    user_groups: np.ndarray
    group_names: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    segment_ids: np.ndarray | None = None
    folds: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.user_ids = np.asarray(self.user_ids, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        self.users = np.asarray(self.users, dtype=np.int64)
        self.user_groups = np.asarray(self.user_groups, dtype=np.int64)
        self.group_names = tuple(self.group_names)
        if self.segment_ids is not None:
            self.segment_ids = np.asarray(self.segment_ids, dtype=np.int64)
        if self.folds is not None:
            self.folds = np.asarray(self.folds, dtype=np.int64)
        self.validate()

    # ------------------------------------------------------------------ checks
    def _check_answers(self) -> None:
        """The checks that read no segments: shapes of labels and users, label values, user ids and groups."""
        n = len(self.labels)
        if self.labels.ndim != 1 or self.user_ids.shape != (n,):
            raise PreferenceDatasetError(f"wrong shape: labels {self.labels.shape} and user_ids {self.user_ids.shape} must both be (N,)")
        if self.users.ndim != 1 or self.user_groups.shape != self.users.shape:
            raise PreferenceDatasetError(
                f"wrong shape: users {self.users.shape} and user_groups {self.user_groups.shape} must both be (U,)"
            )
        if len(np.unique(self.users)) != len(self.users):
            raise PreferenceDatasetError("duplicate user ids in users")
        if not np.all(np.isfinite(self.labels)):
            raise PreferenceDatasetError("label is NaN or infinite")
        bad = ~np.isin(self.labels, _VALID_LABELS)
        if bad.any():
            raise PreferenceDatasetError(f"label outside {{0, 0.5, 1}}: {self.labels[bad][:5].tolist()}")
        unknown = ~np.isin(self.user_ids, self.users)
        if unknown.any():
            raise PreferenceDatasetError(f"unknown user id {np.unique(self.user_ids[unknown])[:5].tolist()} not in users")
        bad_group = (self.user_groups < -1) | (self.user_groups >= max(len(self.group_names), 0))
        if self.group_names and bad_group.any():
            raise PreferenceDatasetError(f"user group index out of range for {len(self.group_names)} groups")
        if not self.group_names and (self.user_groups != -1).any():
            raise PreferenceDatasetError("user_groups given without group_names")

    def validate(self) -> None:
        """Raise :class:`PreferenceDatasetError` naming the first problem found."""
        n = len(self.labels)
        self._check_answers()
        for name, seg in (("segments_a", self.segments_a), ("segments_b", self.segments_b)):
            self._check_segments(name, seg, n)
        if self.segments_a.obs.shape != self.segments_b.obs.shape or self.segments_a.acts.shape != self.segments_b.acts.shape:
            raise PreferenceDatasetError(
                f"wrong shape: segments_a {self.segments_a.obs.shape} and segments_b {self.segments_b.obs.shape} differ"
            )
        if set(self.segments_a.infos) != set(self.segments_b.infos):
            raise PreferenceDatasetError("segments_a and segments_b record different info keys")
        if self.segment_ids is not None and self.segment_ids.shape != (n, 2):
            raise PreferenceDatasetError(f"wrong shape: segment_ids {self.segment_ids.shape} must be (N, 2) = ({n}, 2)")
        if self.folds is not None and self.folds.shape != (n,):
            raise PreferenceDatasetError(f"wrong shape: folds {self.folds.shape} must be (N,) = ({n},)")
        if self.folds is not None and self.segment_ids is not None:
            # A segment in two folds would leak between the two sides of a fold split.
            shared = _segments_in_several_folds(self.segment_ids, self.folds)
            if len(shared):
                raise PreferenceDatasetError(f"segment {int(shared[0])} appears in more than one fold; folds must be segment-disjoint")

    @staticmethod
    def _check_segments(name: str, seg: Transitions, n: int) -> None:
        fields = {"obs": seg.obs, "acts": seg.acts, "next_obs": seg.next_obs, **{f"infos[{k}]": v for k, v in seg.infos.items()}}
        length = seg.acts.shape[1] if seg.acts.ndim >= 2 else None
        for field_name, array in fields.items():
            if array.ndim < 2 or array.shape[0] != n or array.shape[1] != length:
                raise PreferenceDatasetError(
                    f"wrong shape: {name}.{field_name} is {array.shape}, expected ({n}, segment_length, ...) with segment_length {length}"
                )
            if array.dtype.kind not in "biuf":
                raise PreferenceDatasetError(f"{name}.{field_name} has non-numeric dtype {array.dtype}")
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise PreferenceDatasetError(f"NaN or infinite value in {name}.{field_name}")
        if seg.obs.shape != seg.next_obs.shape:
            raise PreferenceDatasetError(f"wrong shape: {name}.obs {seg.obs.shape} != {name}.next_obs {seg.next_obs.shape}")

    # --------------------------------------------------------------- accessors
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def segment_length(self) -> int:
        return self.segments_a.acts.shape[1]

    def positions_of(self, user_ids: np.ndarray) -> np.ndarray:
        """Position in ``users`` of each of ``user_ids`` (all must be known users)."""
        order = np.argsort(self.users)
        return order[np.searchsorted(self.users, user_ids, sorter=order)]

    def user_index(self) -> np.ndarray:
        """``(N,)`` position in ``users`` of each comparison's user (0..U-1)."""
        return self.positions_of(self.user_ids)

    def comparison_groups(self) -> np.ndarray:
        """``(N,)`` true group index of each comparison's user (-1 unknown)."""
        return self.user_groups[self.user_index()]

    def comparisons_per_user(self) -> np.ndarray:
        """``(U,)`` number of comparisons of each user in ``users``."""
        return np.bincount(self.user_index(), minlength=self.n_users)

    # ------------------------------------------------------------- selections
    def subset(self, comparison_idx: np.ndarray, users: np.ndarray | None = None) -> PreferenceDataset:
        """The comparisons at ``comparison_idx``; keeps every user unless ``users`` is given."""
        comparison_idx = np.asarray(comparison_idx)
        keep_users = np.isin(self.users, users) if users is not None else np.ones(self.n_users, dtype=bool)
        return PreferenceDataset(
            self.user_ids[comparison_idx],
            self.segments_a.index(comparison_idx),
            self.segments_b.index(comparison_idx),
            self.labels[comparison_idx],
            self.users[keep_users],
            self.user_groups[keep_users],
            self.group_names,
            dict(self.metadata),
            None if self.segment_ids is None else self.segment_ids[comparison_idx],
            None if self.folds is None else self.folds[comparison_idx],
        )

    def for_users(self, users: np.ndarray) -> PreferenceDataset:
        """Only the given users and their comparisons."""
        return self.subset(np.flatnonzero(np.isin(self.user_ids, users)), users=users)

    def split_by_user(self, test_fraction: float, seed: int = 0) -> tuple[PreferenceDataset, PreferenceDataset]:
        """Disjoint users in train and test (for held-out users, e.g. ``assign``)."""
        _check_fraction(test_fraction)
        rng = np.random.default_rng(seed)
        shuffled = rng.permutation(self.users)
        n_test = max(1, round(test_fraction * self.n_users))
        return self.for_users(shuffled[n_test:]), self.for_users(shuffled[:n_test])

    def segment_folds(self) -> np.ndarray | None:
        """``(N,)`` segment-disjoint block of each comparison, or ``None`` if segments are not identified.

        ``folds`` when recorded, otherwise the connected components of the graph whose nodes are
        segments and whose edges are comparisons (from ``segment_ids``).
        """
        if self.folds is not None:
            return self.folds
        if self.segment_ids is None:
            return None
        return _components(self.segment_ids)

    def split_by_comparison(self, test_fraction: float, seed: int = 0) -> tuple[PreferenceDataset, PreferenceDataset]:
        """Held-out comparisons of the same users, on segments the training part never shows.

        Guarantee: when segments are identified (``folds`` or ``segment_ids``, recorded by
        :func:`~egalitarian_rl.preferences.collect_preferences`), no held-out comparison shares a
        segment with a training comparison: whole segment-disjoint folds are held out, in random
        order, until about ``test_fraction`` of the comparisons are. Data collected with one fold
        per answer of a user (the default) gives every user exactly
        ``round(test_fraction * folds)`` held-out comparisons when that is a whole number.

        Without segment ids (hand-built data, files saved before ids were recorded) the split
        falls back to held-out comparisons stratified per user, which is honest only if no
        segment appears in more than one comparison.

        :param test_fraction: share of the comparisons to hold out, in (0, 1).
        :param seed: seeds which folds (or comparisons) are held out.
        :raises ValueError: if the comparisons form fewer than two segment-disjoint folds.
        """
        _check_fraction(test_fraction)
        rng = np.random.default_rng(seed)
        test = np.zeros(len(self), dtype=bool)
        folds = self.segment_folds()
        if folds is None:
            for user in self.users:
                rows = rng.permutation(np.flatnonzero(self.user_ids == user))
                test[rows[: round(test_fraction * len(rows))]] = True
            return self.subset(np.flatnonzero(~test)), self.subset(np.flatnonzero(test))
        names, sizes = np.unique(folds, return_counts=True)
        if len(names) < 2:
            raise ValueError(
                "split_by_comparison: every comparison shares segments with the others (one fold), so no held-out part "
                "can avoid training segments; collect with n_folds >= 2"
            )
        target, held = test_fraction * len(self), 0.0
        chosen = []
        for index in rng.permutation(len(names)):
            # Take a fold if it brings the held-out count closer to the target.
            if held + sizes[index] / 2 <= target and len(chosen) < len(names) - 1:
                chosen.append(names[index])
                held += sizes[index]
        if not chosen:  # even the smallest fold overshoots: hold out one anyway
            chosen.append(names[np.argmin(sizes)])
        test = np.isin(folds, chosen)
        return self.subset(np.flatnonzero(~test)), self.subset(np.flatnonzero(test))

    @staticmethod
    def concatenate(datasets: Sequence[PreferenceDataset]) -> PreferenceDataset:
        """Join datasets; a user id present in several must have the same true group."""
        if not datasets:
            raise PreferenceDatasetError("nothing to concatenate")
        names = datasets[0].group_names
        if any(d.group_names != names for d in datasets):
            raise PreferenceDatasetError(f"datasets have different group names: {[d.group_names for d in datasets]}")
        group_of: dict[int, int] = {}
        for d in datasets:
            for user, group in zip(d.users.tolist(), d.user_groups.tolist()):
                if group_of.setdefault(user, group) != group:
                    raise PreferenceDatasetError(f"user {user} has true group {group_of[user]} in one dataset and {group} in another")
        users = np.array(sorted(group_of), dtype=np.int64)
        # Parts of one collection share one pool: ids and folds are kept as they are.
        identified = all(d.segment_ids is not None for d in datasets)
        segment_ids = np.concatenate([d.segment_ids for d in datasets]) if identified else None  # type: ignore[misc]
        folds = np.concatenate([d.folds for d in datasets]) if identified and all(d.folds is not None for d in datasets) else None  # type: ignore[misc]
        if folds is not None and len(_segments_in_several_folds(segment_ids, folds)):  # type: ignore[arg-type]
            # A pool index in two folds: these are different collections (within one, a segment
            # belongs to one fold). Each keeps its own pool: ids and folds are offset per dataset.
            id_offsets = np.cumsum([0] + [int(d.segment_ids.max()) + 1 if len(d) else 0 for d in datasets[:-1]])  # type: ignore[union-attr]
            fold_offsets = np.cumsum([0] + [int(d.folds.max()) + 1 if len(d) else 0 for d in datasets[:-1]])  # type: ignore[union-attr]
            segment_ids = np.concatenate([d.segment_ids + o for d, o in zip(datasets, id_offsets)])  # type: ignore[operator]
            folds = np.concatenate([d.folds + o for d, o in zip(datasets, fold_offsets)])  # type: ignore[operator]
        return PreferenceDataset(
            np.concatenate([d.user_ids for d in datasets]),
            concatenate_transitions([d.segments_a for d in datasets]),
            concatenate_transitions([d.segments_b for d in datasets]),
            np.concatenate([d.labels for d in datasets]),
            users,
            np.array([group_of[u] for u in users.tolist()], dtype=np.int64),
            names,
            dict(datasets[0].metadata),
            segment_ids,
            folds,
        )

    # ---------------------------------------------------------------- storage
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"user_ids": self.user_ids, "labels": self.labels, "users": self.users, "user_groups": self.user_groups}
        # Optional arrays: files without them (written before they existed) still load.
        if self.segment_ids is not None:
            arrays["segment_ids"] = self.segment_ids
        if self.folds is not None:
            arrays["folds"] = self.folds
        for side, seg in (("a", self.segments_a), ("b", self.segments_b)):
            arrays[f"{side}.obs"] = seg.obs
            arrays[f"{side}.acts"] = seg.acts
            arrays[f"{side}.next_obs"] = seg.next_obs
            for key, value in seg.infos.items():
                arrays[f"{side}.infos.{key}"] = np.asarray(value)
        return arrays

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (no pickle) atomically: a temp file renamed into place."""
        path = Path(path)
        arrays = self._arrays()
        header = {
            "format_version": _FORMAT_VERSION,
            "group_names": list(self.group_names),
            "metadata": self.metadata,
            "sha256": _digest(arrays),
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        return write_atomic(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PreferenceDataset:
        """Read a file written by :meth:`save`, verifying its checksum and contents."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"preference dataset {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except ValueError as err:
            if "allow_pickle" in str(err):  # numpy's own text would suggest loading it unsafely: never
                raise PreferenceDatasetError(f"{path} holds pickled objects, which are never loaded: not a preference dataset") from None
            raise PreferenceDatasetError(f"{path} is truncated or corrupt (ValueError: {err})") from None
        except (zipfile.BadZipFile, EOFError, OSError, KeyError) as err:
            raise PreferenceDatasetError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from None
        try:
            header = json.loads(arrays.pop("header").tobytes().decode())
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PreferenceDatasetError(f"{path} has no readable header ({type(err).__name__}): not a preference dataset") from None
        if header.get("format_version") != _FORMAT_VERSION:
            raise PreferenceDatasetError(f"{path}: unsupported format version {header.get('format_version')!r}")
        if _digest(arrays) != header.get("sha256"):
            raise PreferenceDatasetError(f"{path}: checksum mismatch, the file was modified after it was saved")
        try:
            segments = {
                side: Transitions(
                    arrays[f"{side}.obs"],
                    arrays[f"{side}.acts"],
                    arrays[f"{side}.next_obs"],
                    {k.split(".", 2)[2]: v for k, v in arrays.items() if k.startswith(f"{side}.infos.")},
                )
                for side in ("a", "b")
            }
            return cls(
                arrays["user_ids"],
                segments["a"],
                segments["b"],
                arrays["labels"],
                arrays["users"],
                arrays["user_groups"],
                tuple(header["group_names"]),
                header.get("metadata", {}),
                arrays.get("segment_ids"),
                arrays.get("folds"),
            )
        except KeyError as err:
            raise PreferenceDatasetError(f"{path} lacks array {err}") from None

    def __repr__(self) -> str:
        return (
            f"PreferenceDataset({len(self)} comparisons, {self.n_users} users, "
            f"segment_length={self.segment_length}, groups={list(self.group_names)})"
        )


def _digest(arrays: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        sha.update(f"{key}|{array.dtype.str}|{array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def _segments_in_several_folds(segment_ids: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Segment ids that occur in more than one fold (``segment_ids`` ``(N, 2)``, ``folds`` ``(N,)``)."""
    if len(folds) == 0:
        return np.zeros(0, dtype=np.int64)
    pairs = np.unique(np.stack([segment_ids.reshape(-1), np.repeat(folds, 2)], axis=1), axis=0)
    return pairs[:-1, 0][pairs[:-1, 0] == pairs[1:, 0]]


def _components(segment_ids: np.ndarray) -> np.ndarray:
    """``(N,)`` connected component of each comparison in the graph segments -- comparisons.

    :param segment_ids: ``(N, 2)`` the two segments of each comparison.
    """
    _, nodes = np.unique(segment_ids.reshape(-1), return_inverse=True)
    parent = np.arange(nodes.max() + 1 if len(nodes) else 0)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in nodes.reshape(-1, 2).tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(a) for a in nodes.reshape(-1, 2)[:, 0].tolist()], dtype=np.int64)


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {fraction}")


class PooledPreferenceDataset(PreferenceDataset):
    """Comparisons whose segments are rows of one shared pool, each distinct segment stored once.

    Behaves as a :class:`PreferenceDataset` everywhere: ``segments_a`` / ``segments_b`` are
    gathered from the pool *on every access* (a full copy: avoid them on large data; EM and
    :func:`~egalitarian_rl.rewards.nets.spaces_from_dataset` read the pool directly).
    Selections (:meth:`subset`, :meth:`for_users`, the splits) stay pooled and share the pool;
    :meth:`save` and :meth:`concatenate` write / return the ordinary per-comparison form.

    :param segment_pool: the distinct segments, leading shape ``(S, L)``.
    :param segment_ids: ``(N, 2)`` pool row of segment ``a`` and of segment ``b`` of every comparison.
    :param user_ids: ``(N,)`` which user made comparison ``i``.
    :param labels: ``(N,)`` probability that ``a`` is preferred: 1 (a), 0 (b) or 0.5 (equal).
    :param users: ``(U,)`` every known user id.
    :param user_groups: ``(U,)`` true group index of each user, -1 where unknown.
    :param group_names: names of the true groups indexed by ``user_groups``.
    :param metadata: JSON-serialisable facts about the data.
    :param folds: ``(N,)`` segment-disjoint block of each comparison, or ``None``.
    """

    def __init__(
        self,
        segment_pool: Transitions,
        segment_ids: np.ndarray,
        user_ids: np.ndarray,
        labels: np.ndarray,
        users: np.ndarray,
        user_groups: np.ndarray,
        group_names: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
        folds: np.ndarray | None = None,
    ) -> None:
        # Not the dataclass __init__: segments_a / segments_b are views computed from the pool.
        self.segment_pool = segment_pool
        self.user_ids = np.asarray(user_ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.users = np.asarray(users, dtype=np.int64)
        self.user_groups = np.asarray(user_groups, dtype=np.int64)
        self.group_names = tuple(group_names)
        self.metadata = dict(metadata or {})
        self.segment_ids = np.asarray(segment_ids, dtype=np.int64)
        self.folds = None if folds is None else np.asarray(folds, dtype=np.int64)
        self.validate()

    @property  # type: ignore[override]
    def segments_a(self) -> Transitions:
        """First segment of each comparison, ``(N, L, ...)``: a copy gathered from the pool."""
        return self.segment_pool.index(self.segment_ids[:, 0])

    @property  # type: ignore[override]
    def segments_b(self) -> Transitions:
        """Second segment of each comparison, ``(N, L, ...)``: a copy gathered from the pool."""
        return self.segment_pool.index(self.segment_ids[:, 1])

    @property
    def segment_length(self) -> int:
        return self.segment_pool.acts.shape[1]

    @property
    def n_segments(self) -> int:
        """``S``, the number of segments in the pool (used or not)."""
        return len(self.segment_pool.acts)

    def validate(self) -> None:
        """Raise :class:`PreferenceDatasetError` naming the first problem found (checks the pool once)."""
        n = len(self.labels)
        if self.segment_ids is None or self.segment_ids.shape != (n, 2):
            shape = None if self.segment_ids is None else self.segment_ids.shape
            raise PreferenceDatasetError(f"wrong shape: segment_ids {shape} must be (N, 2) = ({n}, 2) in a pooled dataset")
        n_pool = len(self.segment_pool.acts)
        self._check_segments("segment_pool", self.segment_pool, n_pool)
        if n and (self.segment_ids.min() < 0 or self.segment_ids.max() >= n_pool):
            raise PreferenceDatasetError(f"segment_ids outside the pool of {n_pool} segments")
        self._check_answers()
        if self.folds is not None:
            if self.folds.shape != (n,):
                raise PreferenceDatasetError(f"wrong shape: folds {self.folds.shape} must be (N,) = ({n},)")
            shared = _segments_in_several_folds(self.segment_ids, self.folds)
            if len(shared):
                raise PreferenceDatasetError(f"segment {int(shared[0])} appears in more than one fold; folds must be segment-disjoint")

    def subset(self, comparison_idx: np.ndarray, users: np.ndarray | None = None) -> PooledPreferenceDataset:
        """The comparisons at ``comparison_idx`` (sharing this pool); keeps every user unless ``users`` is given."""
        comparison_idx = np.asarray(comparison_idx)
        keep_users = np.isin(self.users, users) if users is not None else np.ones(self.n_users, dtype=bool)
        return PooledPreferenceDataset(
            self.segment_pool,
            self.segment_ids[comparison_idx],
            self.user_ids[comparison_idx],
            self.labels[comparison_idx],
            self.users[keep_users],
            self.user_groups[keep_users],
            self.group_names,
            dict(self.metadata),
            None if self.folds is None else self.folds[comparison_idx],
        )

    def __repr__(self) -> str:
        return (
            f"PooledPreferenceDataset({len(self)} comparisons of {self.n_segments} pooled segments, {self.n_users} users, "
            f"segment_length={self.segment_length}, groups={list(self.group_names)})"
        )
