"""EMRewardMixture's fitted state and assignment API (issue 7): consistent assignments, one prior, untouched parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rewards import make_dataset

from egalitarian_rl.preferences import Population, PreferenceDataset, UserGroup
from egalitarian_rl.rewards import EMRewardMixture, cluster_to_group

torch.set_num_threads(1)

#: Noisy annotators (Bradley-Terry beta 1 plus 10% flipped answers): assignments are uncertain,
#: which is where the final E-step and the prior matter.
NOISY = Population(
    [
        UserGroup("up", lambda t: t.next_obs[..., 0], 0.7, beta=1.0, mistake_rate=0.1),
        UserGroup("down", lambda t: -t.next_obs[..., 0], 0.3, beta=1.0, mistake_rate=0.1),
    ]
)


@pytest.fixture(scope="module")
def noisy_fit() -> tuple[PreferenceDataset, EMRewardMixture]:
    data = make_dataset(n_users=40, per_user=8, seed=3, population=NOISY)
    em = EMRewardMixture(2, use_next_state=True, hidden_sizes=(16,), seed=0, batch_size=32, final_epochs=30)
    return data, em.fit(data)


@pytest.mark.parametrize("soft", [False, True])
def test_assignments_are_the_returned_models_own_e_step(soft):
    data = make_dataset(n_users=40, per_user=8, seed=3, population=NOISY)
    em = EMRewardMixture(2, soft=soft, use_next_state=True, hidden_sizes=(16,), seed=0, batch_size=32, final_epochs=30).fit(data)
    np.testing.assert_array_equal(em.assignments_, em.assign_users(data))
    np.testing.assert_allclose(em.shares_, em.responsibilities_.mean(0), atol=1e-8)
    np.testing.assert_array_equal(em.assignments_, em.responsibilities_.argmax(1))


def test_predict_proba_and_assign_agree_on_new_users_with_two_answers(noisy_fit):
    _, em = noisy_fit
    new = make_dataset(n_users=200, per_user=2, seed=11, population=NOISY)
    proba = em.predict_proba(new)
    members = em.assign_users(new)
    np.testing.assert_array_equal(proba.argmax(1), members)
    for user in new.users[:20]:
        one = new.for_users(np.array([user]))
        assert em.assign(one) == members[user]
    # The uniform-prior (maximum-likelihood) rule is still available, and consistent across methods too.
    np.testing.assert_array_equal(em.predict_proba(new, prior=False).argmax(1), em.assign_users(new, prior=False))


def test_assign_reports_confidence_that_grows_with_answers_and_can_refuse(noisy_fit):
    train, em = noisy_fit
    to_group = cluster_to_group(train.user_groups, em.assignments_, 2)
    confidence, correct = {}, {}
    for per_user in (2, 10):
        new = make_dataset(n_users=60, per_user=per_user, seed=20 + per_user, population=NOISY)
        results = [em.assign_with_confidence(new.for_users(np.array([u]))) for u in new.users]
        assert all(r.n_comparisons == per_user and np.isclose(r.posterior.sum(), 1.0) for r in results)
        confidence[per_user] = np.array([r.confidence for r in results])
        correct[per_user] = np.array([to_group[r.best_member] == g for r, g in zip(results, new.user_groups)])
    assert confidence[10].mean() > confidence[2].mean() + 0.05
    # Confident assignments are right more often than the rest.
    sure = confidence[10] >= 0.9
    assert sure.any() and correct[10][sure].mean() >= correct[10].mean()
    one = make_dataset(n_users=2, per_user=2, seed=5, population=NOISY).for_users(np.array([0]))
    refused = em.assign_with_confidence(one, min_confidence=1.0)
    assert refused.member is None and refused.best_member == em.assign(one) and refused.confidence < 1.0
    assert em.assign_with_confidence(one, min_confidence=0.0).member == refused.best_member
    with pytest.raises(ValueError, match="min_confidence"):
        em.assign_with_confidence(one, min_confidence=1.5)


def test_fit_leaves_constructor_arguments_untouched(noisy_fit):
    data, _ = noisy_fit
    em = EMRewardMixture(2, use_next_state=True, hidden_sizes=(8,), seed=0, max_iter=2, final_epochs=0)
    before = em.hyperparameters()
    em.fit(data)
    assert em.observation_space is None and em.action_space is None
    assert em.hyperparameters() == before
    assert em.observation_space_.shape == data.segments_a.obs.shape[2:] and em.reward.n_members == 2
    # Refitting on data of another shape works, because nothing was frozen by the first fit.
    wider = PreferenceDataset(
        data.user_ids, *(s._replace(obs=np.pad(s.obs, ((0, 0), (0, 0), (0, 1))), next_obs=np.pad(s.next_obs, ((0, 0), (0, 0), (0, 1))))
                         for s in (data.segments_a, data.segments_b)),
        data.labels, data.users, data.user_groups, data.group_names,
    )  # fmt: skip
    em.fit(wider)
    assert em.observation_space_.shape == (data.segments_a.obs.shape[2] + 1,)
