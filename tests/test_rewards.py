"""Reward learning units: the batched reward mixture, the BT training loop, EM mechanics, metrics, storage, bad input."""

from __future__ import annotations

import json
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from egalitarian_rl.preferences import Population, PreferenceDataset, Transitions, UserGroup
from egalitarian_rl.rewards import (
    EMRewardMixture,
    NotFittedError,
    RewardMixture,
    RewardTrainingError,
    adjusted_rand_index,
    cluster_to_group,
    comparison_log_likelihoods,
    dataset_features,
    fit_bradley_terry,
    preference_accuracy,
    purity,
    select_k,
    space_from_json,
    space_to_json,
    spaces_from_dataset,
    train_reward,
)
from egalitarian_rl.rewards.metrics import accuracy_from_differences

OBS_DIM, ACT_DIM = 3, 2
BOX_OBS = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), dtype=np.float32)
BOX_ACT = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), dtype=np.float32)


def _linear_population(shares=(0.7, 0.3)) -> Population:
    """Two groups that disagree completely: one likes next_obs[0], the other dislikes it."""
    return Population(
        [
            UserGroup("up", lambda t: t.next_obs[..., 0], shares[0]),
            UserGroup("down", lambda t: -t.next_obs[..., 0], shares[1]),
        ]
    )


def _segments(rng: np.random.Generator, n: int, length: int) -> Transitions:
    obs = rng.standard_normal((n, length, OBS_DIM)).astype(np.float32)
    acts = rng.uniform(-1, 1, (n, length, ACT_DIM)).astype(np.float32)
    next_obs = (obs + 0.1 * rng.standard_normal(obs.shape)).astype(np.float32)
    return Transitions(obs, acts, next_obs, {})


def make_dataset(n_users=20, per_user=20, length=4, seed=0, population=None) -> PreferenceDataset:
    """Synthetic comparisons of random continuous segments, labelled by ``population``."""
    population = population or _linear_population()
    rng = np.random.default_rng(seed)
    user_groups = population.make_users(n_users)
    user_ids = np.repeat(np.arange(n_users), per_user)
    seg_a, seg_b = _segments(rng, len(user_ids), length), _segments(rng, len(user_ids), length)
    labels, _ = population.label(seg_a, seg_b, user_groups[user_ids], rng)
    return PreferenceDataset(user_ids, seg_a, seg_b, labels, np.arange(n_users), user_groups, population.group_names)


@pytest.fixture(scope="module")
def two_group_data() -> tuple[PreferenceDataset, PreferenceDataset]:
    return make_dataset(n_users=20, per_user=25, seed=0).split_by_comparison(0.2, seed=0)


@pytest.fixture(scope="module")
def fitted_em(two_group_data) -> EMRewardMixture:
    train, _ = two_group_data
    return EMRewardMixture(2, use_next_state=True, hidden_sizes=(16,), seed=0, batch_size=32, final_epochs=30).fit(train)


# ----------------------------------------------------------------------------- networks
def _reference_member(reward: RewardMixture, k: int, x: torch.Tensor) -> torch.Tensor:
    """Member ``k`` evaluated alone with plain linear layers (what the batched call must equal)."""
    h = x
    for index, (w, b) in enumerate(zip(reward.weights, reward.biases)):
        if index > 0:
            h = torch.relu(h)
        h = h @ w[k] + b[k]
    return h.squeeze(-1)


def test_members_are_evaluated_in_one_batched_call_matching_each_member_alone():
    torch.manual_seed(0)
    reward = RewardMixture(BOX_OBS, BOX_ACT, n_members=4, use_next_state=True, hidden_sizes=(8, 6))
    obs, acts, next_obs = torch.randn(7, OBS_DIM), torch.rand(7, ACT_DIM), torch.randn(7, OBS_DIM)
    out = reward(obs, acts, next_obs)
    assert out.shape == (7, 4)
    x = reward.features(obs, acts, next_obs)
    assert x.shape == (7, 2 * OBS_DIM + ACT_DIM)
    for k in range(4):
        torch.testing.assert_close(out[:, k], _reference_member(reward, k, x))
    # Grouped path (each member on its own rows) and member subsets agree with the shared path.
    grouped = reward.forward_grouped(x.unsqueeze(0).expand(2, -1, -1), torch.tensor([3, 1]))
    torch.testing.assert_close(grouped, out[:, [3, 1]].T)
    torch.testing.assert_close(reward.forward_features(x, [2]), out[:, [2]])
    assert reward.hidden(x).shape == (4, 7, 6)


def test_any_leading_shape_discrete_one_hot_and_numpy_prediction():
    obs_space, act_space = gym.spaces.Discrete(6), gym.spaces.Discrete(5)
    reward = RewardMixture(obs_space, act_space, 2, use_next_state=True, hidden_sizes=(4,))
    assert reward.input_dim == 6 + 5 + 6
    obs = np.array([[0, 5, 3], [1, 2, 4]])
    out = reward(obs, obs % 5, obs)
    assert out.shape == (2, 3, 2)
    x = reward.raw_features(np.array([2]), np.array([4]), np.array([0]))
    obs_one_hot, act_one_hot, next_one_hot = [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]
    assert x[0].tolist() == [*obs_one_hot, *act_one_hot, *next_one_hot]
    pred = reward.predict_rewards(np.zeros(4, dtype=np.int64), np.ones(4, dtype=np.int64), np.zeros(4, dtype=np.int64))
    assert isinstance(pred, np.ndarray) and pred.shape == (4, 2) and pred.dtype == np.float32
    with pytest.raises(ValueError, match="outside"):
        reward(np.array([6]), np.array([0]), np.array([0]))


def test_input_flags_and_normalisation_touch_only_continuous_columns():
    reward = RewardMixture(BOX_OBS, gym.spaces.Discrete(3), 1, use_state=False, use_action=True, use_next_state=True)
    assert reward.input_dim == 3 + OBS_DIM
    raw = reward.raw_features(None, np.array([0, 1, 2, 1]), np.arange(12, dtype=np.float32).reshape(4, 3) * 10)
    reward.fit_input_normalization(raw)
    assert reward.input_shift[:3].tolist() == [0, 0, 0] and reward.input_scale[:3].tolist() == [1, 1, 1]
    normed = reward.features(None, np.array([0, 1, 2, 1]), np.arange(12, dtype=np.float32).reshape(4, 3) * 10)
    torch.testing.assert_close(normed[:, 3:].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least one"):
        RewardMixture(BOX_OBS, BOX_ACT, 1, use_state=False, use_action=False)
    with pytest.raises(ValueError, match="n_members"):
        RewardMixture(BOX_OBS, BOX_ACT, 0)


def test_segment_returns_sum_discounted_step_rewards():
    reward = RewardMixture(BOX_OBS, BOX_ACT, 3, hidden_sizes=(5,))
    segments = _segments(np.random.default_rng(0), 4, 6)
    steps = reward(segments.obs, segments.acts, segments.next_obs)  # (4, 6, 3)
    torch.testing.assert_close(reward.segment_returns(segments), steps.sum(1))
    weights = 0.9 ** torch.arange(6, dtype=torch.float32)
    torch.testing.assert_close(reward.segment_returns(segments, 0.9), (steps * weights[None, :, None]).sum(1))
    assert reward.segment_returns(segments).requires_grad


def test_save_load_roundtrip_is_atomic_and_never_unpickles(tmp_path):
    low, high = np.array([-1.0, 0.0, -np.inf], dtype=np.float32), np.array([1.0, 2.0, np.inf], dtype=np.float32)
    obs_space = gym.spaces.Box(low, high, dtype=np.float32)
    reward = RewardMixture(obs_space, gym.spaces.Discrete(4), 3, use_next_state=True, hidden_sizes=(7, 5))
    reward.fit_input_normalization(torch.randn(50, reward.input_dim) * 3 + 1)
    path = reward.save(tmp_path / "sub" / "reward.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["reward.safetensors"]  # no temp file left behind
    loaded = RewardMixture.load(path)
    assert loaded.config() == reward.config() and loaded.n_members == 3
    obs, acts = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32), np.array([0, 1, 2, 3, 0])
    np.testing.assert_array_equal(loaded.predict_rewards(obs, acts, obs), reward.predict_rewards(obs, acts, obs))
    # Spaces survive JSON (infinite bounds included).
    assert space_from_json(json.loads(json.dumps(space_to_json(obs_space)))) == obs_space
    # A corrupt or foreign file fails with a clear error, without unpickling anything.
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        RewardMixture.load(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a saved RewardMixture"):
        RewardMixture.load(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError):
        RewardMixture.load(tmp_path / "missing.safetensors")


def test_spaces_from_dataset_uses_metadata_for_discrete_actions(two_group_data):
    train, _ = two_group_data
    obs_space, act_space = spaces_from_dataset(train)
    assert obs_space.shape == (OBS_DIM,) and act_space.shape == (ACT_DIM,)
    train_discrete = PreferenceDataset(
        train.user_ids, train.segments_a._replace(acts=np.zeros(train.segments_a.acts.shape[:2], dtype=np.int64)),
        train.segments_b._replace(acts=np.zeros(train.segments_b.acts.shape[:2], dtype=np.int64)), train.labels,
        train.users, train.user_groups, train.group_names, {"n_actions": 5},
    )  # fmt: skip
    assert spaces_from_dataset(train_discrete)[1] == gym.spaces.Discrete(5)


# ----------------------------------------------------------------------------- Bradley-Terry
class _RecordingLogger:
    """Duck-typed SB3 logger: keeps every dumped set of records."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = {}
        self.dumps: list[dict[str, float]] = []

    def record(self, key: str, value: float) -> None:
        self.pending[key] = value

    def dump(self, step: int = 0) -> None:
        self.dumps.append(self.pending)
        self.pending = {}


def test_bradley_terry_learns_a_single_reward_seeded():
    data = make_dataset(n_users=10, per_user=40, seed=1, population=Population([UserGroup("up", lambda t: t.next_obs[..., 0], 1.0)]))
    train, test = data.split_by_comparison(0.25, seed=0)
    logger = _RecordingLogger()
    result = fit_bradley_terry(train, use_next_state=True, hidden_sizes=(16,), epochs=30, seed=3, logger=logger)
    assert result.reward.n_members == 1
    assert len(logger.dumps) == result.epochs and {"bt/train_loss", "bt/validation_loss"} <= set(logger.dumps[0])
    assert len(result.train_loss) == len(result.validation_loss) == result.epochs
    assert 1 <= result.best_epoch <= result.epochs
    assert result.validation_loss[result.best_epoch - 1] == min(result.validation_loss)
    assert preference_accuracy(result.reward, test).overall >= 0.9
    again = fit_bradley_terry(train, use_next_state=True, hidden_sizes=(16,), epochs=30, seed=3)
    for a, b in zip(result.reward.parameters(), again.reward.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert result.train_loss == again.train_loss


def test_ties_are_soft_targets():
    reward = RewardMixture(BOX_OBS, BOX_ACT, 2, hidden_sizes=(4,))
    fa = torch.randn(6, 3, reward.input_dim)
    labels = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 0.5])
    ll = comparison_log_likelihoods(reward, fa, fa.clone(), labels)  # identical segments: logit 0
    torch.testing.assert_close(ll, torch.full((6, 2), -math.log(2.0)))
    # Training on "equal" answers only pulls both returns together.
    fa, fb = torch.randn(64, 3, reward.input_dim), torch.randn(64, 3, reward.input_dim)
    with torch.no_grad():
        reward.biases[-1].fill_(0.0)
        reward.weights[-1].mul_(20.0)  # start with large return differences
    before = (reward.returns_from_features(fa) - reward.returns_from_features(fb)).abs().mean()
    train_reward(reward, fa, fb, torch.full((64,), 0.5), epochs=30, lr=1e-2, batch_size=32)
    after = (reward.returns_from_features(fa) - reward.returns_from_features(fb)).abs().mean()
    assert after < 0.25 * before
    loss = F.binary_cross_entropy_with_logits(torch.tensor([2.0]), torch.tensor([0.5]))
    assert loss > F.binary_cross_entropy_with_logits(torch.tensor([0.0]), torch.tensor([0.5]))


def test_member_weights_train_members_independently():
    torch.manual_seed(0)
    reward = RewardMixture(BOX_OBS, BOX_ACT, 3, hidden_sizes=(4,))
    fa, fb = torch.randn(40, 2, reward.input_dim), torch.randn(40, 2, reward.input_dim)
    labels = (torch.rand(40) > 0.5).float()
    weights = torch.zeros(40, 3)
    weights[:25, 0] = 1.0
    weights[25:, 2] = 1.0  # member 1 has no comparisons: must stay untouched
    before = [p.detach().clone() for p in reward.parameters()]
    history = train_reward(reward, fa, fb, labels, weights, epochs=3, lr=1e-2, batch_size=8, weight_decay=0.1)
    assert history.epochs == 3 and len(history.train_loss) == 3
    for old, new in zip(before, reward.parameters()):
        torch.testing.assert_close(old[1], new[1], rtol=0, atol=0)
        assert not torch.equal(old[0], new[0]) and not torch.equal(old[2], new[2])
    with pytest.raises(ValueError, match="member_weights"):
        train_reward(reward, fa, fb, labels, torch.ones(40, 2), epochs=1, lr=1e-2, batch_size=8)


def test_nan_during_training_raises_a_clear_error(two_group_data):
    train, _ = two_group_data
    reward = RewardMixture(*spaces_from_dataset(train), 2, hidden_sizes=(4,))
    fa, fb = dataset_features(reward, train)
    labels = torch.as_tensor(train.labels)
    with torch.no_grad():
        reward.weights[0][0, 0, 0] = float("nan")
    with pytest.raises(RewardTrainingError, match="loss became nan"):
        train_reward(reward, fa, fb, labels, epochs=1, lr=1e-3, batch_size=16)
    # A learning rate that makes the parameters explode is reported the same way.
    with pytest.raises(RewardTrainingError, match="lower the learning rate"):
        fit_bradley_terry(train, hidden_sizes=(8,), lr=1e30, epochs=20, batch_size=8)
    with pytest.raises(RewardTrainingError, match="lower the learning rate"):
        EMRewardMixture(2, hidden_sizes=(8,), lr=1e30, batch_size=8).fit(train)


def test_empty_dataset_is_rejected(two_group_data):
    train, _ = two_group_data
    empty = train.subset(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        fit_bradley_terry(empty)
    with pytest.raises(ValueError, match="empty"):
        EMRewardMixture(2).fit(empty)
    with pytest.raises(ValueError, match="empty"):
        select_k(empty, range(1, 3))


# ----------------------------------------------------------------------------- EM
def test_em_recovers_two_opposed_groups(fitted_em, two_group_data):
    train, test = two_group_data
    em = fitted_em
    assert em.reward.n_members == 2 and em.assignments_.shape == (20,) and em.responsibilities_.shape == (20, 2)
    assert adjusted_rand_index(train.user_groups, em.assignments_) == 1.0
    assert sorted(np.round(em.shares_, 2).tolist()) == [0.3, 0.7]
    np.testing.assert_allclose(em.responsibilities_.sum(1), 1.0)
    assert em.converged_ and em.n_iter_ == len(em.history_) >= 1
    assert {"iteration", "log_likelihood", "changed", "shares", "train_loss", "seconds", "ari", "purity"} <= set(em.history_[-1])
    report = em.accuracy(test)
    assert report.overall >= 0.9 and min(report.per_group.values()) >= 0.9
    assert np.array_equal(em.comparison_members(test), em.assignments_[test.user_index()])


def test_em_options_soft_random_kmeans_restarts(two_group_data):
    train, test = two_group_data
    for options in (dict(soft=True), dict(init="random", n_init=2), dict(init="kmeans")):
        em = EMRewardMixture(2, use_next_state=True, hidden_sizes=(16,), seed=1, final_epochs=30, **options).fit(train)
        # Every option must find the two groups and learn a reward that serves each of them.
        assert adjusted_rand_index(train.user_groups, em.assignments_) >= 0.9, options
        assert sorted(np.round(em.shares_, 2).tolist()) == [0.3, 0.7], options
        assert min(em.accuracy(test).per_group.values()) >= 0.8, options  # chance: 0.5
    # K = 1 is the single reward: everyone in one group.
    one = EMRewardMixture(1, hidden_sizes=(8,), final_epochs=0).fit(train)
    assert one.assignments_.tolist() == [0] * 20 and one.shares_.tolist() == [1.0]


def test_em_is_seeded(two_group_data):
    train, _ = two_group_data
    a = EMRewardMixture(2, hidden_sizes=(8,), seed=5, final_epochs=2).fit(train)
    b = EMRewardMixture(2, hidden_sizes=(8,), seed=5, final_epochs=2).fit(train)
    assert a.assignments_.tolist() == b.assignments_.tolist() and a.log_likelihood_ == b.log_likelihood_
    for p, q in zip(a.reward.parameters(), b.reward.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_empty_cluster_is_reseeded_with_the_worst_fitting_users():
    em = EMRewardMixture(3, reseed_fraction=0.2)
    responsibilities = np.eye(3)[[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]]  # member 2 lost all its users
    user_ll = np.zeros((10, 3))
    user_ll[[4, 7], 1] = [-9.0, -5.0]  # users 4 and 7 are explained worst
    new = em._reseed_empty(responsibilities, user_ll, np.ones(10), 3)
    assert new.argmax(1).tolist() == [0, 0, 0, 0, 2, 1, 1, 2, 1, 1]


def test_assign_new_users(fitted_em, two_group_data):
    train, _ = two_group_data
    new = make_dataset(n_users=10, per_user=10, seed=7)  # different users and segments
    members = fitted_em.assign_users(new)
    mapping = cluster_to_group(train.user_groups, fitted_em.assignments_, 2)
    assert (mapping[members] == new.user_groups).mean() >= 0.9
    assert fitted_em.assign(new.for_users(new.users[:1])) == members[0]
    proba = fitted_em.predict_proba(new)
    assert proba.shape == (10, 2) and np.allclose(proba.sum(1), 1.0)
    with pytest.raises(ValueError, match="one user"):
        fitted_em.assign(new)
    no_comparisons = new.subset(np.array([], dtype=np.int64), users=new.users[:1])
    with pytest.raises(ValueError, match="user 0 has no comparisons"):
        fitted_em.assign(no_comparisons)
    with pytest.raises(ValueError, match="assign them"):
        fitted_em.comparison_members(_renamed(new))


def _renamed(data: PreferenceDataset) -> PreferenceDataset:
    """The same comparisons by user ids the model never saw."""
    return PreferenceDataset(
        data.user_ids + 1000, data.segments_a, data.segments_b, data.labels, data.users + 1000, data.user_groups, data.group_names
    )


def test_bad_k_and_users_without_comparisons(two_group_data):
    train, _ = two_group_data
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="K"):
            EMRewardMixture(k)
    with pytest.raises(ValueError, match="K = 21 components but only 20 users"):
        EMRewardMixture(21).fit(train)
    without_user_3 = train.subset(np.flatnonzero(train.user_ids != 3))  # user 3 stays listed, without comparisons
    with pytest.raises(ValueError, match="user 3 has no comparisons"):
        EMRewardMixture(2).fit(without_user_3)
    with pytest.raises(ValueError, match="init"):
        EMRewardMixture(2, init="bogus")
    with pytest.raises(NotFittedError):
        EMRewardMixture(2).assign_users(train)
    with pytest.raises(ValueError, match="k_range"):
        select_k(train, range(0, 3))
    with pytest.raises(ValueError, match="criterion"):
        select_k(train, range(1, 3), criterion="aic")


def test_em_logs_every_iteration_to_an_sb3_logger_with_progress_bar(tmp_path, two_group_data, capsys):
    from stable_baselines3.common.logger import configure

    train, _ = two_group_data
    logger = configure(str(tmp_path), ["csv"])
    em = EMRewardMixture(2, hidden_sizes=(8,), final_epochs=0, logger=logger, progress_bar=True).fit(train)
    logger.close()
    lines = (tmp_path / "progress.csv").read_text().strip().split("\n")
    header = lines[0].split(",")
    assert {"em/log_likelihood", "em/changed_assignments", "em/share_0", "em/share_1", "em/ari", "em/purity"} <= set(header)
    assert len(lines) - 1 == em.n_iter_
    assert "EM K=2" in capsys.readouterr().err


def test_em_save_load_roundtrip(tmp_path, fitted_em, two_group_data):
    _, test = two_group_data
    fitted_em.save(tmp_path / "em")
    assert sorted(p.name for p in (tmp_path / "em").iterdir()) == ["em.json", "reward.safetensors"]
    loaded = EMRewardMixture.load(tmp_path / "em")
    np.testing.assert_array_equal(loaded.assignments_, fitted_em.assignments_)
    np.testing.assert_allclose(loaded.shares_, fitted_em.shares_)
    np.testing.assert_allclose(loaded.responsibilities_, fitted_em.responsibilities_)
    assert loaded.history_ == json.loads(json.dumps(fitted_em.history_)) and loaded.hyperparameters() == fitted_em.hyperparameters()
    assert loaded.accuracy(test).as_dict() == fitted_em.accuracy(test).as_dict()
    np.testing.assert_array_equal(loaded.assign_users(test), fitted_em.assign_users(test))
    with pytest.raises(FileNotFoundError):
        EMRewardMixture.load(tmp_path / "nowhere")
    # saved by another version with a setting this one does not know: loads, and says what it dropped
    state = json.loads((tmp_path / "em" / "em.json").read_text())
    state["hyperparameters"]["tie_model"] = "davidson"
    (tmp_path / "em" / "em.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match=r"ignoring settings this version does not know: \['tie_model'\]"):
        older = EMRewardMixture.load(tmp_path / "em")
    np.testing.assert_array_equal(older.assign_users(test), fitted_em.assign_users(test))


def test_select_k_heldout_and_bic(two_group_data):
    train, _ = two_group_data
    options = dict(use_next_state=True, hidden_sizes=(16,), batch_size=32, final_epochs=30, max_iter=5)
    heldout = select_k(train, range(1, 4), **options)
    assert heldout.k == 2 and set(heldout.scores) == {1, 2, 3}
    assert heldout.scores[2] > heldout.scores[1] and heldout.standard_errors[heldout.k] >= 0
    # BIC charges every network weight: tiny rewards of s' only (the groups' true input) keep
    # the penalty small enough that two clear groups beat one, and a third member buys nothing.
    tiny = dict(options, hidden_sizes=(4,), use_state=False, use_action=False)
    bic = select_k(train, [1, 2, 3], criterion="bic", **tiny)
    assert set(bic.scores) == {1, 2, 3} and bic.k == 2 and bic.models[2].n_components == 2
    assert bic.scores[2] < bic.scores[1] and bic.scores[2] < bic.scores[3]


def test_select_k_warns_when_users_gave_too_few_answers_to_choose_k():
    few = make_dataset(n_users=20, per_user=5)
    tiny = dict(use_next_state=True, hidden_sizes=(4,), batch_size=32, final_epochs=2, max_iter=2)
    with pytest.warns(UserWarning, match="median of 5 answers each; below 8 no criterion"):
        select_k(few, [1, 2], criterion="bic", **tiny)
    enough = make_dataset(n_users=20, per_user=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_k(enough, [1, 2], criterion="bic", **tiny)


def test_select_k_by_heldout_users(two_group_data):
    """Users held out whole, scored by the mixture's marginal likelihood of all their answers: two groups, K = 2."""
    train, _ = two_group_data
    options = dict(use_next_state=True, use_state=False, use_action=False, hidden_sizes=(4,), batch_size=32, final_epochs=20, max_iter=5)
    selection = select_k(train, range(1, 4), criterion="heldout_users", n_folds=3, **options)
    assert selection.k == 2 and set(selection.scores) == {1, 2, 3}, selection.scores
    assert selection.scores[2] > selection.scores[1] + 2 * selection.standard_errors[1]
    model = selection.models[2]  # refitted on every user
    assert set(model.users_) == set(train.users)
    assert adjusted_rand_index(train.user_groups, model.assign_users(train)) == 1.0
    with pytest.raises(ValueError, match="n_folds must be in 2"):
        select_k(train, range(1, 3), criterion="heldout_users", n_folds=1, **options)


def test_select_k_by_permutation_finds_two_groups_and_only_one_where_there_is_one():
    """Users' answers dealt at random show what an extra head gains from noise: two real groups beat that by far,
    one group does not (the shuffled copies gain as much), with 6 answers a user."""
    options = dict(use_next_state=True, use_state=False, use_action=False, hidden_sizes=(4,), batch_size=32, final_epochs=10, max_iter=3)
    two = make_dataset(n_users=40, per_user=6, seed=1)
    selection = select_k(two, range(1, 4), criterion="permutation", n_permutations=3, **options)
    assert selection.k == 2 and set(selection.scores) == {1, 2, 3}, (selection.scores, selection.noise_gains)
    assert selection.scores[2] - selection.scores[1] > selection.noise_gains[2] + 10.0
    assert adjusted_rand_index(two.user_groups, selection.models[2].assignments_) >= 0.8  # fitted on every user
    one = make_dataset(n_users=40, per_user=6, seed=1, population=Population([UserGroup("up", lambda t: t.next_obs[..., 0], 1.0)]))
    single = select_k(one, range(1, 4), criterion="permutation", n_permutations=3, **options)
    assert single.k == 1 and single.models[1].n_components == 1, (single.scores, single.noise_gains)
    with pytest.raises(ValueError, match="n_permutations must be >= 1"):
        select_k(two, range(1, 3), criterion="permutation", n_permutations=0, **options)


# ----------------------------------------------------------------------------- metrics
def test_accuracy_excludes_ties_and_counts_predicted_ties_as_half():
    data = make_dataset(n_users=2, per_user=3, seed=0)
    data.labels[:] = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0]
    report = accuracy_from_differences(np.array([2.0, -1.0, 5.0, -3.0, 0.0, -0.5]), data)
    # strict: [1 right, 0 right, (tie skipped), 1 wrong, 1 half, 0 right] -> 3.5 / 5
    assert report.n_strict == 5 and report.overall == pytest.approx(3.5 / 5)
    assert report.per_group == {"up": pytest.approx(2 / 2), "down": pytest.approx(1.5 / 3)}


def test_ari_purity_and_cluster_mapping():
    true = np.array([0, 0, 0, 1, 1, -1])
    assert adjusted_rand_index(true, np.array([1, 1, 1, 0, 0, 0])) == 1.0
    assert purity(true, np.array([0, 0, 1, 1, 1, 0])) == pytest.approx(4 / 5)
    assert cluster_to_group(true, np.array([1, 1, 1, 0, 0, 2]), 3).tolist() == [1, 0, -1]
