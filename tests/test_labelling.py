"""The labelling campaign: SQLite store, query rules, and the web app driven over HTTP and in a real headless Chromium.

The server runs as a real ``uvicorn`` subprocess (``python -m egalitarian_rl.labelling``) on
127.0.0.1, so a ``kill -9`` is a real crash. The browser test needs Debian's Chromium and its
driver; without them it fails with the command that installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from egalitarian_rl import envs
from egalitarian_rl.labelling import AnswerStore, DisagreementRule, RandomRule, SimulatedCampaign, StoreError, text_pool
from egalitarian_rl.labelling.app import pairwise_agreement, redact_path
from egalitarian_rl.labelling.campaign import CampaignConfig, prepare_campaign
from egalitarian_rl.labelling.pool import candidate_pairs, control_pool, hashed_bag_of_words
from egalitarian_rl.labelling.store import choice_to_label, is_swapped
from egalitarian_rl.preferences import PreferenceDataset, collect_preferences, rollout_segments, sample_pairs
from egalitarian_rl.rewards import EMRewardMixture

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL_CHROMIUM = "apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,720",
)
FAST_EM = {"n_components": 2, "use_action": False, "use_next_state": True, "max_iter": 3, "final_epochs": 2, "init_epochs": 2}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- store
def small_dataset(n_users: int = 6, per_user: int = 4) -> PreferenceDataset:
    population = envs.make_population(envs.FAIRGRID_ID, {"majority": 0.5, "minority": 0.5}, beta=5.0)
    return collect_preferences(gym.make(envs.FAIRGRID_ID, random_start=True), population, n_users, per_user, segment_length=5, seed=0)


def test_export_then_import_gives_back_the_same_dataset(tmp_path: Path) -> None:
    data = small_dataset()
    with AnswerStore(tmp_path / "a.sqlite") as store:
        tokens = store.import_dataset(data)
        exported = store.export_dataset()
    assert sorted(tokens) == data.users.tolist() and len(set(tokens.values())) == len(tokens)
    np.testing.assert_array_equal(exported.user_ids, data.user_ids)
    np.testing.assert_array_equal(exported.labels, data.labels)
    np.testing.assert_array_equal(exported.segments_a.next_obs, data.segments_a.next_obs)
    np.testing.assert_array_equal(exported.segments_b.obs, data.segments_b.obs)
    np.testing.assert_array_equal(exported.users, data.users)
    np.testing.assert_array_equal(exported.user_groups, data.user_groups)
    assert exported.group_names == data.group_names and exported.metadata["env_id"] == envs.FAIRGRID_ID
    # Same segment identity: two comparisons share a store segment exactly when they shared one before.
    same_before = data.segment_ids.reshape(-1)[:, None] == data.segment_ids.reshape(-1)[None, :]
    same_after = exported.segment_ids.reshape(-1)[:, None] == exported.segment_ids.reshape(-1)[None, :]
    np.testing.assert_array_equal(same_before, same_after)
    # The export is a normal dataset file: saved, checksummed, loaded without pickle; it round-trips once more.
    loaded = PreferenceDataset.load(exported.save(tmp_path / "export.npz"))
    with AnswerStore(tmp_path / "b.sqlite") as again:
        again.import_dataset(loaded)
        np.testing.assert_array_equal(again.export_dataset().labels, data.labels)


def test_an_answer_is_stored_once_and_a_different_second_answer_is_refused(tmp_path: Path) -> None:
    with AnswerStore(tmp_path / "s.sqlite") as store:
        store.import_dataset(small_dataset(2, 1))  # users 0 and 1, queries 1 and 2
        store.add_queries(np.array([[1, 2]]))
        first = store.record_answer(0, 3, "left")
        again = store.record_answer(0, 3, "left")
        assert first.stored and not first.duplicate and again.duplicate and not again.stored
        with pytest.raises(StoreError, match="already answered"):
            store.record_answer(0, 3, "right")
        with pytest.raises(StoreError, match="unknown query"):
            store.record_answer(0, 999, "left")
        with pytest.raises(StoreError, match="choice"):
            store.record_answer(0, 3, "both")
        assert store.n_answers(0) == 2  # the imported one and query 3, once
        store.record_answer(1, 3, "skip")
        exported = store.export_dataset()
        assert len(exported) == 3  # the skip is kept in the table but not exported
        assert [row[2] for row in store.answers()].count("skip") == 1


def test_sides_are_shuffled_per_user_and_mapped_back_to_labels() -> None:
    swaps = [is_swapped(user, query) for user in range(20) for query in range(20)]
    assert 0.3 < np.mean(swaps) < 0.7
    assert is_swapped(3, 7) == is_swapped(3, 7)  # stable across calls, restarts, machines
    assert choice_to_label("left", swapped=False) == 1.0 and choice_to_label("left", swapped=True) == 0.0
    assert choice_to_label("right", swapped=True) == 1.0 and choice_to_label("equal", swapped=True) == 0.5
    assert choice_to_label("skip", swapped=False) is None


def test_tokens_are_stored_only_as_hashes(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    with AnswerStore(path) as store:
        user, token = store.add_user("alice")
        assert store.user_for_token(token) == user
        assert store.user_for_token(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
        assert store.user_for_token(None) is None and store.user_for_token("") is None
        assert len(token) >= 40  # 32 random bytes, url-safe
    assert token.encode() not in b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert redact_path(f"/u/{token}") == f"/u/{token[:4]}…" and redact_path(f"/admin/{token}/fit").endswith("…/fit")


def test_text_segments_are_length_one_embeddings_and_export(tmp_path: Path) -> None:
    prompts = ["Review: a film", "Review: a film", "Review: a book", "Review: a book"]
    texts = ["Great, loved it.", "It was long and slow and I did not enjoy the many scenes.", "Wonderful!", "Dull."]
    pool = text_pool(prompts, texts, hashed_bag_of_words)
    assert pool.kind == "text" and pool.transitions.obs.shape == (4, 1, 256)
    with AnswerStore(tmp_path / "x.sqlite") as store:
        ids = store.add_segments(pool)
        query = store.add_queries(ids[[[0, 1], [2, 3]]])
        user, _ = store.add_user("reader")
        assert store.segment_view(ids[1])["text"] == texts[1] and store.segment_view(ids[1])["media"] is None
        store.record_answer(user.id, int(query[0]), "left")
        store.record_answer(user.id, int(query[1]), "right")
        data = store.export_dataset()
    assert data.segment_length == 1 and set(data.labels.tolist()) <= {0.0, 1.0} and data.group_names == ()


def test_agreement_counts_only_shared_strict_answers() -> None:
    answers = [
        (1, 10, "left", 1.0),
        (2, 10, "left", 1.0),
        (1, 11, "left", 1.0),
        (2, 11, "right", 0.0),
        (1, 12, "skip", None),
        (2, 12, "equal", 0.5),
    ]
    assert pairwise_agreement(answers) == {(1, 2): (0.5, 2)}


# --------------------------------------------------------------------------- query rules
def test_disagreement_rule_asks_where_members_differ_under_the_users_posterior() -> None:
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4], [0.99, 0.98]])
    rule = DisagreementRule(probs=probs, prior=np.array([0.5, 0.5]), epsilon=0.0)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(rule.select(0, np.arange(4), 2, rng), [1, 2])
    np.testing.assert_array_equal(rule.select(0, np.array([0, 2, 3]), 1, rng), [2])  # only what is still available
    # A user the mixture is sure about gets (almost) zero scores: disagreement weighted by their posterior.
    rule.posteriors[7] = np.array([1.0, 0.0])
    assert rule.scores(7, np.arange(4)).max() == 0.0 and rule.scores(0, np.arange(4))[1] == pytest.approx(0.16)
    random_picks = DisagreementRule(probs=probs, prior=np.array([0.5, 0.5]), epsilon=1.0).select(0, np.arange(4), 4, rng)
    assert sorted(random_picks.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="epsilon"):
        DisagreementRule(epsilon=1.5)


@pytest.mark.parametrize("rule", [RandomRule(), DisagreementRule(epsilon=0.2)], ids=["random", "disagreement"])
def test_simulated_users_answer_through_the_rule_and_are_never_asked_twice(rule: Any) -> None:
    population = envs.make_population(envs.FAIRGRID_ID, {"majority": 0.8, "minority": 0.2}, beta=5.0)
    pool = rollout_segments(gym.make(envs.FAIRGRID_ID, random_start=True), 40, 5, "random", population.info_keys, seed=0)
    pairs = np.unique(np.sort(sample_pairs(40, 200, np.random.default_rng(0)), axis=1), axis=0)
    campaign = SimulatedCampaign(population, pool, pairs, n_users=10, rule=rule, seed=0, metadata={"env_id": envs.FAIRGRID_ID})
    campaign.ask(3)
    mixture = EMRewardMixture(**FAST_EM).fit(campaign.dataset())
    campaign.refresh(mixture)
    if isinstance(rule, DisagreementRule):
        assert rule.probs.shape == (len(pairs), 2) and set(rule.posteriors) == set(range(10))
    campaign.ask(3)
    data = campaign.dataset()
    assert len(data) == 60 and np.all(data.comparisons_per_user() == 6)
    for user in range(10):
        asked = data.segment_ids[data.user_ids == user]
        assert len(np.unique(asked, axis=0)) == 6  # no pair twice


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m egalitarian_rl.labelling CONFIG`` in a subprocess on 127.0.0.1."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self.log, "a") as log:
            cmd = [sys.executable, "-m", "egalitarian_rl.labelling", str(self.config), "--port", str(self.port)]
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the labelling server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if request(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the labelling server did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """``kill -9``: no shutdown handler, no flush, nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def request(url: str, token: str | None = None, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """``(status, parsed JSON or text)`` of a GET (or a POST when ``body`` is given), never raising on HTTP errors."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Token"] = token
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, raw.decode(errors="replace")


def answer(server: Server, token: str, query_id: Any, choice: Any = "left") -> tuple[int, Any]:
    return request(server.url + "/api/answer", token, json.dumps({"query_id": query_id, "choice": choice}).encode())


def answer_rows(database: Path) -> list[tuple]:
    """The answers table, read by a separate connection (as anyone inspecting the file would)."""
    with sqlite3.connect(database) as conn:
        return conn.execute("SELECT user_id, query_id, choice FROM answers ORDER BY rowid").fetchall()


def write_campaign(folder: Path, annotators: list[str]) -> Path:
    config = {
        "title": "Which walk do you prefer?",
        "database": "campaign.sqlite",
        "env_id": envs.FAIRGRID_ID,
        "env_kwargs": {"random_start": True},
        "segments": {"n_segments": 12, "segment_length": 6, "seed": 0},
        "n_queries": 40,
        "annotators": annotators,
        "queries": {"rule": "disagreement", "epsilon": 0.2},
        "em": {**FAST_EM, "min_answers": 4, "refit_every": 0},
    }
    path = folder / "campaign.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A FairGrid campaign with annotators alice and bob, served by a uvicorn subprocess."""
    folder = tmp_path_factory.mktemp("campaign")
    config_path = write_campaign(folder, ["alice", "bob"])
    config = CampaignConfig.from_yaml(config_path)
    store, tokens = prepare_campaign(config, log=lambda _msg: None)
    users = {u.name: u.id for u in store.users()}
    query_ids = store.queries()[0].tolist()
    store.close()
    server = Server(config_path, folder / "server.log")
    server.start()
    try:
        yield {"server": server, "tokens": tokens, "users": users, "database": config.database, "queries": query_ids, "folder": folder}
    finally:
        server.stop()
    assert tokens["alice"] not in (folder / "server.log").read_text(), "a full token was logged"


def test_forged_or_missing_token_gets_403_and_nothing_is_stored(campaign: dict[str, Any]) -> None:
    server, database = campaign["server"], campaign["database"]
    before = answer_rows(database)
    forged = campaign["tokens"]["alice"][:-2] + "xx"
    for token in (forged, None, "", campaign["tokens"]["admin"]):  # the admin token is not an annotator's
        assert answer(server, token, campaign["queries"][0])[0] == 403
        assert request(server.url + "/api/next", token)[0] == 403
    assert request(server.url + f"/u/{forged}")[0] == 403
    assert request(server.url + f"/admin/{campaign['tokens']['alice']}")[0] == 403  # an annotator is not the admin
    assert request(server.url + f"/u/{campaign['tokens']['alice']}")[0] == 200
    assert answer_rows(database) == before


def test_malformed_posts_get_400_or_422_and_nothing_is_stored(campaign: dict[str, Any]) -> None:
    server, token, database = campaign["server"], campaign["tokens"]["bob"], campaign["database"]
    before = answer_rows(database)
    url, query = server.url + "/api/answer", campaign["queries"][0]
    assert request(url, token, b"{not json")[0] == 400
    assert request(url, token, b"\xff\xfe")[0] == 400
    assert request(url, token, b"x" * 10_000)[0] == 400
    assert request(url, token, b"[1, 2]")[0] == 422
    assert request(url, token, json.dumps({"query_id": query}).encode())[0] == 422
    assert request(url, token, json.dumps({"query_id": query, "choice": "left", "user_id": 1}).encode())[0] == 422
    assert answer(server, token, str(query))[0] == 422
    assert answer(server, token, True)[0] == 422
    assert answer(server, token, query, "LEFT")[0] == 422
    assert answer(server, token, 10**9)[0] == 422  # no such query
    assert answer_rows(database) == before


def test_a_replayed_answer_is_stored_once(campaign: dict[str, Any]) -> None:
    server, token, database = campaign["server"], campaign["tokens"]["bob"], campaign["database"]
    query = campaign["queries"][-1]
    first, replay = answer(server, token, query, "equal"), answer(server, token, query, "equal")
    assert first == (200, {"stored": True, "duplicate": False}) and replay == (200, {"stored": False, "duplicate": True})
    assert answer(server, token, query, "right")[0] == 409  # a changed mind does not overwrite
    rows = [r for r in answer_rows(database) if r[1] == query]
    assert rows == [(campaign["users"]["bob"], query, "equal")]


def chromium_driver(download_dir: Path) -> Any:
    """A headless Chromium under chromedriver, or a test failure saying how to install them."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the browser test needs Debian's Chromium. Install it with: {INSTALL_CHROMIUM}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]' (or pip install selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={download_dir}"):
        options.add_argument(flag)
    # An explicit driver path: selenium never tries to download a driver of its own.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def label_in_browser(driver: Any, url: str, choices: list[str]) -> list[int]:
    """Open ``url`` and answer one pair per choice (``left``/``right`` by click, the others by key); returns the shown query ids."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    keys = {"equal": "3", "skip": "s", "right-key": Keys.ARROW_RIGHT}
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "pair").get_attribute("data-query-id"))
    answered_before = int(driver.find_element(By.ID, "count").text)
    shown = []
    for choice in choices:
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "pair").get_attribute("data-query-id"))
        query = driver.find_element(By.ID, "pair").get_attribute("data-query-id")
        images = driver.find_elements(By.CSS_SELECTOR, "#pair img")
        assert len(images) == 2 and all(img.get_attribute("src").startswith("blob:") for img in images)
        shown.append(int(query))
        if choice in keys:
            driver.find_element(By.TAG_NAME, "body").send_keys(keys[choice])
        else:
            driver.find_element(By.ID, f"btn-{choice}").click()
        # The page moves on only after the server acknowledged (committed) the answer.
        WebDriverWait(driver, 30).until(lambda d, q=query: d.find_element(By.ID, "pair").get_attribute("data-query-id") not in ("", q))
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "count").text == str(answered_before + len(choices)))
    return shown


def test_two_annotators_label_in_a_real_browser_and_em_runs_on_the_export(campaign: dict[str, Any], tmp_path: Path) -> None:
    server, tokens, users, database = campaign["server"], campaign["tokens"], campaign["users"], campaign["database"]
    rows_before = answer_rows(database)
    driver = chromium_driver(Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        alice = label_in_browser(driver, f"{server.url}/u/{tokens['alice']}", ["left", "right", "equal", "left"])
        bob = label_in_browser(driver, f"{server.url}/u/{tokens['bob']}", ["right", "right-key", "left", "skip"])
        driver.get(f"{server.url}/admin/{tokens['admin']}")
        admin_text = driver.find_element("tag name", "body").text
    finally:
        driver.quit()
    new = [r for r in answer_rows(database) if r not in rows_before]
    assert [(u, q) for u, q, _ in new if u == users["alice"]] == [(users["alice"], q) for q in alice]
    assert [(u, q) for u, q, _ in new if u == users["bob"]] == [(users["bob"], q) for q in bob]
    assert [c for u, _, c in new if u == users["alice"]] == ["left", "right", "equal", "left"]
    assert [c for u, _, c in new if u == users["bob"]] == ["right", "right", "left", "skip"]
    assert "alice" in admin_text and "bob" in admin_text and "Agreement between users" in admin_text
    # The answers as a dataset file, loaded back, and EM on it.
    with AnswerStore(database) as store:
        data = PreferenceDataset.load(store.export_dataset().save(tmp_path / "labels.npz"))
    assert set(data.users.tolist()) == {users["alice"], users["bob"]} and data.metadata["env_id"] == envs.FAIRGRID_ID
    assert len(data) == len([r for r in answer_rows(database) if r[2] != "skip"])
    mixture = EMRewardMixture(**FAST_EM).fit(data)
    assert mixture.assignments_.shape == (2,) and np.isclose(mixture.shares_.sum(), 1.0)
    # The admin's "fit EM now" runs EM inside the server on the same answers.
    # EM runs inside the request: on a loaded 2-core machine it took over 30 s, so the wait is longer here.
    status, page = request(f"{server.url}/admin/{tokens['admin']}/fit", body=b"", timeout=300.0)
    assert status == 200 and "Last fit on" in page


def test_a_killed_server_loses_no_acknowledged_answer(tmp_path: Path) -> None:
    config_path = write_campaign(tmp_path, ["carol"])
    config = CampaignConfig.from_yaml(config_path)
    store, tokens = prepare_campaign(config, log=lambda _msg: None)
    queries = store.queries()[0].tolist()
    store.close()
    server = Server(config_path, tmp_path / "server.log")
    acknowledged = []
    try:
        server.start()
        for query in queries[:5]:
            assert answer(server, tokens["carol"], query, "left")[0] == 200
            acknowledged.append(query)
        server.kill()  # right after the last acknowledgement
        assert [q for _, q, _ in answer_rows(config.database)] == acknowledged
        server.start()
        assert answer(server, tokens["carol"], queries[0], "left")[1] == {"stored": False, "duplicate": True}
        for query in queries[5:8]:
            assert answer(server, tokens["carol"], query, "right")[0] == 200
            acknowledged.append(query)
        server.kill()
    finally:
        server.stop()
    assert [q for _, q, _ in answer_rows(config.database)] == acknowledged
    assert len(AnswerStore(config.database).export_dataset()) == 8


def test_control_pool_renders_a_gif_per_segment() -> None:
    env = gym.make(envs.FAIRGRID_ID, random_start=True, render_mode="rgb_array")
    pool = control_pool(env, 3, 4, seed=0)
    assert pool.kind == "clip" and len(pool.media) == 3 and all(m[:6] in (b"GIF89a", b"GIF87a") for m in pool.media)
    assert pool.transitions.obs.shape == (3, 4, 25) and not pool.transitions.infos  # the frames are not kept as data
    with pytest.raises(ValueError, match="rgb_array"):
        control_pool(gym.make(envs.FAIRGRID_ID), 2, 3)


def test_campaign_config_refuses_unknown_keys_and_ambiguous_sources(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("database: x.sqlite\nenv_id: egalitarian_rl/FairGrid-v0\nannotator: [a]\n")
    with pytest.raises(ValueError, match="unknown key"):
        CampaignConfig.from_yaml(path)
    path.write_text("database: x.sqlite\nenv_id: egalitarian_rl/FairGrid-v0\ntexts: {file: t.jsonl}\n")
    with pytest.raises(ValueError, match="exactly one"):
        CampaignConfig.from_yaml(path)
    path.write_text("database: x.sqlite\nenv_id: egalitarian_rl/FairGrid-v0\nqueries: {rule: smart}\n")
    with pytest.raises(ValueError, match="queries.rule"):
        CampaignConfig.from_yaml(path)


def test_extending_a_campaign_adds_new_candidates_that_show_a_new_segment() -> None:
    population = envs.make_population(envs.FAIRGRID_ID, {"majority": 0.8, "minority": 0.2}, beta=5.0)
    env = gym.make(envs.FAIRGRID_ID, random_start=True)
    first = rollout_segments(env, 20, 4, "random", population.info_keys, seed=0)
    pairs = np.unique(np.sort(sample_pairs(20, 50, np.random.default_rng(0)), axis=1), axis=0)
    campaign = SimulatedCampaign(population, first, pairs, n_users=5, rule=RandomRule(), seed=0)
    campaign.ask(2)
    campaign.extend(rollout_segments(env, 10, 4, "random", population.info_keys, seed=1), 40)
    added = campaign.pairs[len(pairs) :]
    assert len(campaign.pool.acts) == 30 and len(added) > 0 and np.all(added.max(axis=1) >= 20)
    assert len(np.unique(campaign.pairs, axis=0)) == len(campaign.pairs) and campaign.asked.shape == (5, len(campaign.pairs))
    campaign.ask(2)
    assert len(campaign.dataset()) == 20


def test_online_loop_runs_rounds_and_carries_the_policy_over() -> None:
    from stable_baselines3 import PPO

    from egalitarian_rl.labelling.online import OnlineSettings, run_online

    population = envs.make_population(envs.FAIRGRID_ID, {"majority": 0.8, "minority": 0.2}, beta=5.0)
    previous_agents: list[Any] = []

    def make_agent(mixture: Any, answers: PreferenceDataset, previous: Any) -> Any:
        previous_agents.append(previous)
        agent = PPO("MlpPolicy", gym.make(envs.FAIRGRID_ID), n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
        if previous is not None:
            agent.policy.load_state_dict(previous.policy.state_dict())
        return agent

    settings = OnlineSettings(
        rounds=2, segments_per_round=30, segment_length=4, candidates_per_round=100, queries_per_user=2, timesteps_per_round=64
    )
    agent, mixture, records = run_online(
        lambda: gym.make(envs.FAIRGRID_ID, random_start=True),
        population,
        10,
        lambda: EMRewardMixture(**FAST_EM),
        make_agent,
        settings,
        evaluate=lambda a: np.ones((3, 2)),
        log=lambda _msg: None,
    )
    assert [r.comparisons for r in records] == [20, 40] and previous_agents[0] is None and previous_agents[1] is not None
    assert records[-1].group_returns == {"majority": 1.0, "minority": 1.0} and np.isclose(sum(records[-1].shares), 1.0)
    assert mixture.users_.tolist() == list(range(10)) and agent is not previous_agents[1]


def test_text_candidates_pair_completions_of_the_same_prompt() -> None:
    prompts = ["p1", "p1", "p1", "p2", "p2", "p3"]
    pool = text_pool(prompts, [f"reply {i}" for i in range(6)], hashed_bag_of_words)
    pairs = candidate_pairs(pool, 50, np.random.default_rng(0))
    assert len(pairs) == 4  # 3 pairs among p1's replies, 1 among p2's, none for the lone p3
    assert all(prompts[a] == prompts[b] and a < b for a, b in pairs.tolist())


def test_the_apps_em_fit_points_the_active_rule_at_the_new_mixture(tmp_path: Path) -> None:
    from egalitarian_rl.labelling.app import Campaign, MixtureFitter, rule_refresher

    with AnswerStore(tmp_path / "f.sqlite") as store:
        store.import_dataset(small_dataset(6, 4))
        store.add_queries(np.array([[1, 2], [3, 4], [5, 6]]))
        rule = DisagreementRule(epsilon=0.0)
        too_few = MixtureFitter(store, lambda: EMRewardMixture(**FAST_EM), min_answers=100)
        assert too_few.fit() is None and too_few.result is None
        fitter = MixtureFitter(store, lambda: EMRewardMixture(**FAST_EM), min_answers=10, on_fit=rule_refresher(store, rule))
        result = fitter.fit()
        assert result is not None and result.n_answers == 24 and set(result.members) == set(range(6))
        assert rule.probs.shape == (len(store.queries()[0]), 2) and set(rule.posteriors) == set(range(6))
        campaign = Campaign(store, rule, "unused", fitter=fitter, rule_name="disagreement", rng=np.random.default_rng(0))
        user = store.users()[0]
        asked = set(store.asked_queries(user.id).tolist())
        picked = campaign.next_query(user)
        assert picked is not None and picked not in asked
