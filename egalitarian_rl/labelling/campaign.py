"""One labelling campaign from a YAML file: build its segments and queries once, then serve the page.

A campaign config (every key but ``database`` and one of ``env_id`` / ``texts`` is optional)::

    title: Which robot do you prefer?
    database: fairgrid_labels.sqlite       # relative paths are relative to this file's folder
    env_id: egalitarian_rl/FairGrid-v0      # a control env with rgb_array rendering ...
    env_kwargs: {random_start: true}
    segments: {n_segments: 60, segment_length: 10, behaviour: random, seed: 0}
    # texts: {file: completions.jsonl}     # ... or text pairs: one {"prompt", "completion"} per line
    n_queries: 300                          # candidate pairs, drawn among the segments
    annotators: [alice, bob]                # personal links are written to <database>.links (mode 0600)
    queries: {rule: disagreement, epsilon: 0.2}   # or rule: random
    em: {n_components: 2, min_answers: 20, refit_every: 20, use_action: false, use_next_state: true}

The first start creates the database, renders the segments and writes every annotator's and
the admin's link to ``<database>.links``; later starts reuse them (new names in ``annotators``
are added). Tokens are printed only as their first 4 characters.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from egalitarian_rl.labelling.app import Campaign, MixtureFitter, create_app, rule_refresher
from egalitarian_rl.labelling.pool import SegmentPool, candidate_pairs, control_pool, hashed_bag_of_words, text_pool
from egalitarian_rl.labelling.queries import RULES, make_rule
from egalitarian_rl.labelling.store import AnswerStore, hash_token, redact

_EM_APP_KEYS = ("min_answers", "refit_every")


@dataclass
class CampaignConfig:
    """A labelling campaign (see the module docstring for the YAML form).

    :param database: the SQLite file; ``env_id`` + ``env_kwargs`` + ``segments``, or ``texts``,
        say what is compared; ``n_queries`` candidate pairs; ``annotators`` their names;
        ``queries`` the rule; ``em`` the mixture (``EMRewardMixture`` keywords plus
        ``min_answers`` and ``refit_every``).
    """

    database: Path
    title: str = "Which behaviour do you prefer?"
    env_id: str | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    segments: dict[str, Any] = field(default_factory=lambda: {"n_segments": 60, "segment_length": 10, "behaviour": "random", "seed": 0})
    texts: dict[str, Any] | None = None
    n_queries: int = 300
    annotators: list[str] = field(default_factory=list)
    queries: dict[str, Any] = field(default_factory=lambda: {"rule": "disagreement", "epsilon": 0.2})
    em: dict[str, Any] = field(default_factory=lambda: {"n_components": 2, "min_answers": 20, "refit_every": 20})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CampaignConfig:
        """Read and check a config file; relative paths are taken from its folder."""
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a campaign config is a mapping of keys, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
        if "database" not in raw:
            raise ValueError(f"{path}: 'database' (the SQLite file) is required")
        raw["database"] = (path.parent / raw["database"]).resolve()
        if raw.get("texts") and "file" in raw["texts"]:
            raw["texts"] = {**raw["texts"], "file": str((path.parent / raw["texts"]["file"]).resolve())}
        config = cls(**raw)
        config.check()
        return config

    def check(self) -> None:
        if (self.env_id is None) == (self.texts is None):
            raise ValueError("a campaign compares either env segments (env_id) or texts (texts), exactly one of them")
        if self.queries.get("rule", "disagreement") not in RULES:
            raise ValueError(f"queries.rule must be one of {RULES}, got {self.queries.get('rule')!r}")
        if self.n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {self.n_queries}")
        if len(set(self.annotators)) != len(self.annotators):
            raise ValueError("annotator names must be unique")

    @property
    def links_file(self) -> Path:
        return self.database.with_name(self.database.name + ".links")


def _embedder(spec: str) -> Any:
    """``"hashing"`` (model-free) or ``"module:function"`` returning ``(n, d)`` features for a list of texts."""
    if spec == "hashing":
        return hashed_bag_of_words
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_pool(config: CampaignConfig) -> SegmentPool:
    """Render the campaign's segments (control env clips) or embed its texts."""
    if config.texts is not None:
        rows = [json.loads(line) for line in Path(config.texts["file"]).read_text().splitlines() if line.strip()]
        return text_pool([r["prompt"] for r in rows], [r["completion"] for r in rows], _embedder(config.texts.get("embedder", "hashing")))
    import gymnasium as gym

    from egalitarian_rl import envs

    settings = {"n_segments": 60, "segment_length": 10, "behaviour": "random", "seed": 0, **config.segments}
    env = gym.make(config.env_id, render_mode="rgb_array", **config.env_kwargs)
    try:
        library = envs.group_library(config.env_id)  # the info keys group rewards will read, if any
        info_keys = library.info_keys
    except ValueError:
        info_keys = ()
    return control_pool(env, settings["n_segments"], settings["segment_length"], settings["behaviour"], info_keys, seed=settings["seed"])


def prepare_campaign(config: CampaignConfig, log: Any = print) -> tuple[AnswerStore, dict[str, str]]:
    """Open (or create) the campaign's store: segments, queries, annotators, admin token.

    :return: the store and the links of users created *now* (``name -> token``, ``"admin"`` for the
        admin); every link created so far is also in ``config.links_file`` (mode 0600).
    """
    config.database.parent.mkdir(parents=True, exist_ok=True)
    store = AnswerStore(config.database)
    created: dict[str, str] = {}
    if not len(store.segment_ids()):
        log(f"building the segments of {config.database.name} ...")
        pool = build_pool(config)
        ids = store.add_segments(pool)
        rng = np.random.default_rng(int(config.segments.get("seed", 0)))
        store.add_queries(ids[candidate_pairs(pool, config.n_queries, rng)])
        metadata = {"env_id": config.env_id, "segment_length": int(pool.transitions.acts.shape[1]), "campaign": config.title}
        if config.env_id is not None:
            import gymnasium as gym

            space = gym.make(config.env_id, **config.env_kwargs).action_space
            metadata["n_actions"] = int(space.n) if isinstance(space, gym.spaces.Discrete) else None
        store.set_meta("dataset_metadata", metadata)
    if store.get_meta("admin_token_hash") is None:
        token = secrets.token_urlsafe(32)
        store.set_meta("admin_token_hash", hash_token(token))
        created["admin"] = token
    existing = {u.name for u in store.users()}
    for name in config.annotators:
        if name not in existing:
            created[name] = store.add_user(name)[1]
    if created:
        _append_links(config.links_file, created)
    return store, created


def _append_links(path: Path, tokens: dict[str, str]) -> None:
    """Append ``name token`` lines to a file only its owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        for name, token in tokens.items():
            f.write(f"{name}\t{token}\n")


def link(host: str, port: int, name: str, token: str) -> str:
    """The personal URL of an annotator (or of the admin page for ``name == "admin"``)."""
    return f"http://{host}:{port}/{'admin' if name == 'admin' else 'u'}/{token}"


def make_campaign(config: CampaignConfig, store: AnswerStore, seed: int | None = None) -> Campaign:
    """The app's campaign object: the configured query rule, and EM refitting in the background."""
    rule_name = config.queries.get("rule", "disagreement")
    rule = make_rule(rule_name, float(config.queries.get("epsilon", 0.2)))
    em = {"n_components": 2, **config.em}
    app_keys = {k: em.pop(k) for k in _EM_APP_KEYS if k in em}

    def make_mixture() -> Any:
        # torch is imported at the first fit, not at start-up: the page is up in a second.
        import torch

        from egalitarian_rl.rewards import EMRewardMixture

        torch.set_num_threads(1)  # EM refits share the machine with the server (and everyone else)
        return EMRewardMixture(**em)

    fitter = MixtureFitter(store, make_mixture, on_fit=rule_refresher(store, rule), **app_keys)
    return Campaign(
        store,
        rule,
        store.get_meta("admin_token_hash"),
        fitter=fitter,
        title=config.title,
        rule_name=rule_name,
        rng=np.random.default_rng(seed),
    )


def label_main(config_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, export: str | os.PathLike | None = None) -> int:
    """``egalitarian-rl label CONFIG``: prepare the campaign, then serve it (or export its answers and stop).

    :param config_path: the campaign's YAML file.
    :param host: interface to listen on (default: this machine only).
    :param port: TCP port.
    :param export: write the answers so far as a ``PreferenceDataset`` ``.npz`` here and exit.
    :return: the process exit code.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = CampaignConfig.from_yaml(config_path)
    store, created = prepare_campaign(config)
    if export is not None:
        path = store.export_dataset().save(export)
        print(f"exported {store.n_answers()} answers to {path}")
        return 0
    for name, token in created.items():
        print(f"new link for {name}: {link(host, port, name, redact(token))} (full link in {config.links_file})")
    print(f"{len(store.users())} annotators; links in {config.links_file}; serving on http://{host}:{port}")
    app = create_app(make_campaign(config, store))
    # access_log=False: uvicorn's log would print the token in /u/TOKEN; the app logs redacted paths.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")
    return 0
