"""The answer store: one SQLite file per labelling campaign.

What it guarantees, and how:

* **No acknowledged answer is lost.** Every answer is one transaction, committed (WAL journal,
  ``synchronous=FULL``) before :meth:`AnswerStore.record_answer` returns, and the web app
  answers the HTTP request only after that. A killed server loses at most an answer it never
  acknowledged.
* **A double-submitted answer is stored once.** Answers are keyed by ``(user, query)``; a repeat
  with the same choice is acknowledged as a duplicate, one with another choice is refused
  (the first answer stands).
* **Identity.** Each annotator has an unguessable token (``secrets.token_urlsafe``). Only its
  SHA-256 is stored, so a copy of the database does not let anyone answer as somebody else;
  the token is returned once, when the user is created.
* **No pickle.** A segment's arrays are stored as ``.npy`` records (``allow_pickle=False``);
  every SQL statement is parameterised.

Tables: ``users``, ``segments`` (data, and what annotators see), ``queries`` (candidate pairs of
segments), ``answers`` and ``meta`` (JSON facts about the campaign).
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from egalitarian_rl.labelling.pool import SegmentPool
from egalitarian_rl.preferences.dataset import PreferenceDataset
from egalitarian_rl.preferences.segments import Transitions, concatenate_transitions

SCHEMA_VERSION = 1
#: What an annotator can answer: the left or right clip is better, both are equal, or can't tell.
CHOICES = ("left", "right", "equal", "skip")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    true_group INTEGER NOT NULL DEFAULT -1,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    media BLOB,
    prompt TEXT,
    text TEXT
);
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY,
    segment_a INTEGER NOT NULL REFERENCES segments(id),
    segment_b INTEGER NOT NULL REFERENCES segments(id),
    CHECK (segment_a != segment_b)
);
CREATE TABLE IF NOT EXISTS answers (
    user_id INTEGER NOT NULL REFERENCES users(id),
    query_id INTEGER NOT NULL REFERENCES queries(id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'equal', 'skip')),
    swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),
    label REAL CHECK (label IN (0.0, 0.5, 1.0)),
    answered_at REAL NOT NULL,
    PRIMARY KEY (user_id, query_id)
);
"""


class StoreError(ValueError):
    """A request the store refuses (unknown query, conflicting answer, bad input)."""


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a token: what the store keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def redact(token: str) -> str:
    """A token safe to log: its first 4 characters and an ellipsis."""
    return f"{token[:4]}…" if token else "<none>"


def is_swapped(user_id: int, query_id: int) -> bool:
    """Whether ``user_id`` sees ``query_id``'s segment ``a`` on the right.

    Sides are shuffled so that a habit of clicking "left" does not read as a preference for
    ``a``; a hash (not a random draw) keeps a user's view of a query the same after a reload or
    a server restart, so a resubmitted answer means the same thing.
    """
    digest = hashlib.sha256(f"{int(user_id)}:{int(query_id)}".encode()).digest()
    return bool(digest[0] & 1)


def choice_to_label(choice: str, swapped: bool) -> float | None:
    """The dataset label (1 = segment ``a`` preferred, 0 = ``b``, 0.5 = equal) of a shown choice; ``None`` for skip."""
    if choice not in CHOICES:
        raise StoreError(f"choice must be one of {CHOICES}, got {choice!r}")
    if choice == "skip":
        return None
    if choice == "equal":
        return 0.5
    left_is_a = not swapped
    return 1.0 if (choice == "left") == left_is_a else 0.0


def _pack(transitions: Transitions, row: int) -> bytes:
    """One segment's arrays as an uncompressed ``.npz`` (no pickle)."""
    arrays = {"obs": transitions.obs[row], "acts": transitions.acts[row], "next_obs": transitions.next_obs[row]}
    arrays.update({f"infos.{key}": np.asarray(value[row]) for key, value in transitions.infos.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _unpack(blob: bytes) -> Transitions:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    infos = {key.split(".", 1)[1]: value for key, value in arrays.items() if key.startswith("infos.")}
    return Transitions(arrays["obs"], arrays["acts"], arrays["next_obs"], infos)


@dataclass(frozen=True)
class User:
    """An annotator. ``true_group`` is -1 for real people (known only for simulated or imported users)."""

    id: int
    name: str
    true_group: int = -1


@dataclass(frozen=True)
class AnswerReceipt:
    """What happened to a submitted answer.

    :param stored: a new answer was committed.
    :param duplicate: the same answer had been stored before (nothing new written).
    :param label: dataset label of the answer (``None`` for a skip).
    """

    stored: bool
    duplicate: bool
    label: float | None


class AnswerStore:
    """A labelling campaign's users, segments, queries and answers in one SQLite file.

    :param path: the database file (created if missing) or ``":memory:"``.
    :param timeout: seconds to wait for another connection's write lock.
    """

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = str(path)
        # One connection shared by the web server's threads, serialised by a lock: SQLite allows
        # one writer at a time anyway, and answers are small.
        self._conn = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._segment_cache: dict[int, Transitions] = {}
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before it returns (NORMAL in WAL mode may lose the last
            # transactions on power loss; a killed process loses nothing either way).
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self._transaction() as conn:
                # Statement by statement: executescript() would commit outside this transaction.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
        version = self.get_meta("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: answer store schema version {version!r}, this code reads {SCHEMA_VERSION}")

    # ------------------------------------------------------------ plumbing
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed on success and rolled back on any error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AnswerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- meta
    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable fact about the campaign (env id, group names, ...)."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value))
            )

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    # --------------------------------------------------------------- users
    def add_user(self, name: str, true_group: int = -1, user_id: int | None = None) -> tuple[User, str]:
        """Create an annotator; returns the user and their token (shown this once, never stored).

        :param name: a unique display name (e.g. an e-mail alias).
        :param true_group: the user's true group index when known (simulated / imported users), else -1.
        :param user_id: a specific id (imports keep the dataset's ids); default: the next free one.
        """
        token = secrets.token_urlsafe(32)
        with self._transaction() as conn:
            try:
                cursor = conn.execute(
                    "INSERT INTO users(id, name, token_hash, true_group, created_at) VALUES (?, ?, ?, ?, ?)",
                    (user_id, name, hash_token(token), int(true_group), time.time()),
                )
            except sqlite3.IntegrityError as err:
                raise StoreError(f"cannot add user {name!r}: {err}") from None
        return User(int(cursor.lastrowid), name, int(true_group)), token  # type: ignore[arg-type]

    def user_for_token(self, token: str | None) -> User | None:
        """The user a token belongs to, or ``None`` (missing, malformed or unknown token)."""
        if not token or not isinstance(token, str) or len(token) > 256:
            return None
        rows = self._query("SELECT id, name, true_group FROM users WHERE token_hash = ?", (hash_token(token),))
        return User(*rows[0]) if rows else None

    def users(self) -> list[User]:
        return [User(*row) for row in self._query("SELECT id, name, true_group FROM users ORDER BY id")]

    # ------------------------------------------------------------ segments
    def add_segments(self, pool: SegmentPool) -> np.ndarray:
        """Store every segment of ``pool``; returns their ids ``(n,)`` in pool order."""
        ids = []
        with self._transaction() as conn:
            for row in range(len(pool)):
                cursor = conn.execute(
                    "INSERT INTO segments(data, media, prompt, text) VALUES (?, ?, ?, ?)",
                    (
                        _pack(pool.transitions, row),
                        None if pool.media is None else pool.media[row],
                        None if pool.prompts is None else pool.prompts[row],
                        None if pool.texts is None else pool.texts[row],
                    ),
                )
                ids.append(cursor.lastrowid)
        return np.asarray(ids, dtype=np.int64)

    def segment_ids(self) -> np.ndarray:
        return np.asarray([row[0] for row in self._query("SELECT id FROM segments ORDER BY id")], dtype=np.int64)

    def segment_view(self, segment_id: int) -> dict[str, Any] | None:
        """What an annotator is shown of a segment: ``{"media": bytes | None, "prompt", "text"}``; ``None`` if unknown."""
        rows = self._query("SELECT media, prompt, text FROM segments WHERE id = ?", (int(segment_id),))
        return None if not rows else {"media": rows[0][0], "prompt": rows[0][1], "text": rows[0][2]}

    def segments(self, segment_ids: np.ndarray) -> Transitions:
        """The step data of ``segment_ids`` ``(n,)``, leading shape ``(n, L)`` (decoded once, then cached)."""
        segment_ids = np.asarray(segment_ids, dtype=np.int64)
        missing = sorted(set(segment_ids.tolist()) - set(self._segment_cache))
        for start in range(0, len(missing), 500):  # SQLite caps the number of parameters
            chunk = missing[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for segment_id, blob in self._query(f"SELECT id, data FROM segments WHERE id IN ({marks})", chunk):
                self._segment_cache[int(segment_id)] = _unpack(blob)
        unknown = [s for s in missing if s not in self._segment_cache]
        if unknown:
            raise StoreError(f"unknown segment ids {unknown[:5]}")
        parts = [self._segment_cache[s] for s in segment_ids.tolist()]
        stacked = concatenate_transitions(
            [Transitions(p.obs[None], p.acts[None], p.next_obs[None], {k: v[None] for k, v in p.infos.items()}) for p in parts]
        )
        return stacked

    # ------------------------------------------------------------- queries
    def add_queries(self, pairs: np.ndarray) -> np.ndarray:
        """Add candidate pairs ``(M, 2)`` of segment ids; returns the query ids ``(M,)``."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        ids = []
        with self._transaction() as conn:
            for a, b in pairs.tolist():
                try:
                    cursor = conn.execute("INSERT INTO queries(segment_a, segment_b) VALUES (?, ?)", (a, b))
                except sqlite3.IntegrityError as err:
                    raise StoreError(f"bad query pair ({a}, {b}): {err}") from None
                ids.append(cursor.lastrowid)
        return np.asarray(ids, dtype=np.int64)

    def queries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every query: ids ``(M,)`` and their segment pairs ``(M, 2)``."""
        rows = self._query("SELECT id, segment_a, segment_b FROM queries ORDER BY id")
        array = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return array[:, 0], array[:, 1:]

    def query_pair(self, query_id: int) -> tuple[int, int] | None:
        rows = self._query("SELECT segment_a, segment_b FROM queries WHERE id = ?", (int(query_id),))
        return (int(rows[0][0]), int(rows[0][1])) if rows else None

    def asked_queries(self, user_id: int) -> np.ndarray:
        """Query ids ``user_id`` has answered (skips included): not to be asked again."""
        return np.asarray([r[0] for r in self._query("SELECT query_id FROM answers WHERE user_id = ?", (int(user_id),))], dtype=np.int64)

    # ------------------------------------------------------------- answers
    def record_answer(self, user_id: int, query_id: int, choice: str) -> AnswerReceipt:
        """Store ``user_id``'s answer to ``query_id`` as it was shown to them; committed on return.

        :param choice: one of :data:`CHOICES`, relative to the sides the user saw (see :func:`is_swapped`).
        :raises StoreError: unknown query or user, invalid choice, or a different answer already stored.
        """
        if isinstance(query_id, bool) or not isinstance(query_id, (int, np.integer)):
            raise StoreError(f"query id must be an integer, got {query_id!r}")
        swapped = is_swapped(user_id, query_id)
        label = choice_to_label(choice, swapped)
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM queries WHERE id = ?", (int(query_id),)).fetchone() is None:
                raise StoreError(f"unknown query {int(query_id)}")
            previous = conn.execute(
                "SELECT choice, label FROM answers WHERE user_id = ? AND query_id = ?", (int(user_id), int(query_id))
            ).fetchone()
            if previous is not None:
                if previous[0] != choice:
                    raise StoreError(f"query {int(query_id)} was already answered {previous[0]!r}; the first answer stands")
                return AnswerReceipt(stored=False, duplicate=True, label=previous[1])
            try:
                conn.execute(
                    "INSERT INTO answers(user_id, query_id, choice, swapped, label, answered_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (int(user_id), int(query_id), choice, int(swapped), label, time.time()),
                )
            except sqlite3.IntegrityError as err:  # e.g. unknown user (foreign key)
                raise StoreError(f"cannot store answer: {err}") from None
        return AnswerReceipt(stored=True, duplicate=False, label=label)

    def record_label(self, user_id: int, query_id: int, label: float | None) -> AnswerReceipt:
        """Store an answer given as a dataset label (1 = ``a``, 0 = ``b``, 0.5 = equal, ``None`` = skip).

        For simulated users and imports, who do not see sides: translated to the choice the user
        would have clicked, so the table means one thing whoever answered.
        """
        swapped = is_swapped(user_id, query_id)
        if label is None:
            choice = "skip"
        elif label == 0.5:
            choice = "equal"
        elif label in (0.0, 1.0):
            choice = "left" if (label == 1.0) != swapped else "right"
        else:
            raise StoreError(f"label must be 0, 0.5, 1 or None, got {label!r}")
        return self.record_answer(user_id, int(query_id), choice)

    def n_answers(self, user_id: int | None = None) -> int:
        if user_id is None:
            return int(self._query("SELECT COUNT(*) FROM answers")[0][0])
        return int(self._query("SELECT COUNT(*) FROM answers WHERE user_id = ?", (int(user_id),))[0][0])

    def answers(self) -> list[tuple[int, int, str, float | None]]:
        """Every answer as ``(user_id, query_id, choice, label)``, in the order they were given."""
        return [tuple(r) for r in self._query("SELECT user_id, query_id, choice, label FROM answers ORDER BY answered_at, rowid")]  # type: ignore[misc]

    def answer_counts(self) -> dict[int, dict[str, int]]:
        """``user id -> {choice: count}`` for the admin page."""
        counts: dict[int, dict[str, int]] = {u.id: dict.fromkeys(CHOICES, 0) for u in self.users()}
        for user_id, choice, n in self._query("SELECT user_id, choice, COUNT(*) FROM answers GROUP BY user_id, choice"):
            counts[int(user_id)][choice] = int(n)
        return counts

    # -------------------------------------------------------------- export
    def export_dataset(self, metadata: dict[str, Any] | None = None) -> PreferenceDataset:
        """Every non-skipped answer as a :class:`PreferenceDataset` (users without answers are left out).

        ``segment_ids`` are the store's segment ids, so held-out splits avoid shared segments.
        ``group_names`` / ``user_groups`` come from the campaign's meta and users (unknown: -1).
        """
        rows = self._query(
            "SELECT a.user_id, q.segment_a, q.segment_b, a.label FROM answers a JOIN queries q ON q.id = a.query_id "
            "WHERE a.label IS NOT NULL ORDER BY a.answered_at, a.rowid"
        )
        if not rows:
            raise StoreError("no answers to export yet")
        array = np.asarray(rows, dtype=np.float64)
        user_ids, pairs, labels = array[:, 0].astype(np.int64), array[:, 1:3].astype(np.int64), array[:, 3]
        users = {u.id: u for u in self.users()}
        present = np.unique(user_ids)
        group_names = tuple(self.get_meta("group_names", []))
        user_groups = np.array([users[int(u)].true_group if group_names else -1 for u in present], dtype=np.int64)
        meta = {**self.get_meta("dataset_metadata", {}), **(metadata or {})}
        return PreferenceDataset(
            user_ids,
            self.segments(pairs[:, 0]),
            self.segments(pairs[:, 1]),
            labels,
            present,
            user_groups,
            group_names,
            meta,
            segment_ids=pairs,
        )

    def import_dataset(self, dataset: PreferenceDataset) -> dict[int, str]:
        """Load a :class:`PreferenceDataset` into this (empty) store, keeping its user ids.

        Segments are de-duplicated by the dataset's ``segment_ids`` when it has them. Every user
        gets a new token (returned: ``user id -> token``); comparisons become queries and answers.
        """
        if self.users() or len(self.segment_ids()):
            raise StoreError("import_dataset needs an empty store")
        if dataset.group_names:
            self.set_meta("group_names", list(dataset.group_names))
        self.set_meta("dataset_metadata", dataset.metadata)
        tokens = {}
        for user, group in zip(dataset.users.tolist(), dataset.user_groups.tolist()):
            _, tokens[user] = self.add_user(f"user-{user}", true_group=group, user_id=user)
        n = len(dataset)
        if dataset.segment_ids is not None:
            keys = dataset.segment_ids.reshape(-1)
        else:
            keys = np.arange(2 * n)  # every side its own segment
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        both = concatenate_transitions([dataset.segments_a, dataset.segments_b])
        # Row r of `both` is side a of comparison r (r < n) or side b of comparison r - n.
        side_rows = np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)
        store_ids = self.add_segments(SegmentPool(both.index(side_rows[first])))
        pairs = store_ids[inverse].reshape(n, 2)
        query_ids = self.add_queries(pairs)
        for user, query, label in zip(dataset.user_ids.tolist(), query_ids.tolist(), dataset.labels.tolist()):
            self.record_label(user, query, float(label))
        return tokens
