"""MaxMinLMPPO on a tiny GPT-2 (real GPT-2 vocabulary): issue 8's acceptance test and the trainer's contracts.

The toy task (:mod:`egalitarian_rl.lm.toy`): a tiny GPT-2 shaped like a pretrained LM
(most mass on 20 common words and EOS) and two conflicting groups with true scores
(the learned-reward path is the same callable): ``good`` (majority, share 0.8) counts
the word "good"; ``concise`` (minority, share 0.2) is minus the number of tokens.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from egalitarian_rl.lm import LoraSettings, MaxMinLMPPO, apply_lora
from egalitarian_rl.lm.rollout import left_pad, response_mask, row_generators, sample_completions, score_tokens
from egalitarian_rl.lm.toy import TOY_GROUPS, TOY_PROMPTS, toy_group_scores, toy_lm

torch.set_num_threads(1)

PROMPTS = list(TOY_PROMPTS)
GROUPS = list(TOY_GROUPS)
SHARES = [0.8, 0.2]
FAST = {"batch_size": 16, "minibatch_size": 8, "n_epochs": 2, "max_new_tokens": 8, "learning_rate": 3e-3, "kl_coef": 0.05}


def make_trainer(aggregation="worst_group", seed=0, **kwargs) -> MaxMinLMPPO:
    model, tokenizer = toy_lm(seed)
    settings = {**FAST, **kwargs}
    return MaxMinLMPPO(model, tokenizer, PROMPTS, toy_group_scores(tokenizer), aggregation=aggregation, group_names=GROUPS, **settings)


def lm_parameters(trainer: MaxMinLMPPO) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


# --------------------------------------------------------------------------- acceptance (issue 8)
def test_maxmin_lifts_worst_group_and_beats_share_weighted_mean(tmp_path):
    """The issue's acceptance test: 20 iterations each of MaxMin and share-weighted mean from the same start."""
    maxmin = make_trainer("worst_group", tensorboard_log=tmp_path / "maxmin")
    before = maxmin.evaluate(completions_per_prompt=8)  # fits nothing: the normaliser exists after training starts
    maxmin.learn(20)
    after = maxmin.evaluate(completions_per_prompt=8)
    start_normalized = maxmin.normalizer.normalize(before["scores"][None])[0]

    mean = make_trainer("mean", aggregation_kwargs={"weights": SHARES})
    mean.learn(20)
    after_mean = mean.evaluate(completions_per_prompt=8)

    # MaxMin raised the worse-off group's mean (normalised) score.
    assert after["normalized"].min() > start_normalized.min() + 0.3, (before["scores"], after["scores"])
    # The minority (concise) ends higher under MaxMin than under the majority-weighted mean, by >= 1 token.
    assert after["scores"][1] > after_mean["scores"][1] + 1.0, (after["scores"], after_mean["scores"])
    # ...which served its majority: "good" rose under the mean.
    assert after_mean["scores"][0] > before["scores"][0] + 1.0

    # KL to the reference stays finite, is positive once the policy moved, and is logged.
    kls = [row["charts/kl"] for row in maxmin.history]
    assert all(math.isfinite(kl) for kl in kls) and kls[-1] > 0
    with open(tmp_path / "maxmin" / "progress.csv") as handle:
        logged = list(csv.DictReader(handle))
    assert len(logged) == 20
    for key in ("charts/kl", "charts/entropy", "charts/score_good", "charts/score_concise", "losses/policy_loss", "losses/value_loss"):
        assert all(math.isfinite(float(row[key])) for row in logged), key
    for key in ("groups/return_concise", "groups/weight_good", "groups/selected", "groups/reward_mean_good", "groups/reward_std_concise"):
        assert key in logged[0]
    assert list((tmp_path / "maxmin").glob("events.out.tfevents.*"))
    # worst_group trained on both groups at some point (it follows whichever is behind).
    assert {int(float(row["groups/selected"])) for row in logged} == {0, 1}


def test_rloo_learns():
    """Critic-free variant: leave-one-out baseline over 4 completions per prompt, on the minority's score alone."""
    trainer = make_trainer("mean", aggregation_kwargs={"weights": [0.0, 1.0]}, advantage="rloo", completions_per_prompt=4)
    assert trainer.value_head is None
    before = trainer.evaluate(completions_per_prompt=8)
    trainer.learn(12)
    after = trainer.evaluate(completions_per_prompt=8)
    assert after["scores"][1] > before["scores"][1] + 1.5, (before["scores"], after["scores"])
    assert after["ended"] > before["ended"]


def test_whitened_rloo_advantages_do_not_depend_on_the_reward_scale():
    """Whitened, a reward and the same reward times 0.5 give one update size; unwhitened (the default) they do not."""
    rewards = np.random.default_rng(0).normal(size=(4, 4))
    plain = make_trainer("mean", advantage="rloo", completions_per_prompt=4)
    whitened = make_trainer("mean", advantage="rloo", completions_per_prompt=4, whiten_advantages=True)
    loo = rewards - (rewards.sum(1, keepdims=True) - rewards) / 3
    np.testing.assert_allclose(plain._critic_free_advantages(rewards), loo)
    np.testing.assert_allclose(plain._critic_free_advantages(0.5 * rewards), 0.5 * loo)
    scaled = whitened._critic_free_advantages(rewards)
    np.testing.assert_allclose(scaled, loo / loo.std(), rtol=1e-6)
    np.testing.assert_allclose(whitened._critic_free_advantages(0.5 * rewards), scaled, rtol=1e-6)
    # the ranking within every prompt is the leave-one-out one
    assert (np.argsort(scaled, 1) == np.argsort(loo, 1)).all()


def test_grpo_step_runs_and_moves_policy():
    trainer = make_trainer("per_sample_min", advantage="grpo", completions_per_prompt=4)
    start = lm_parameters(trainer)
    stats = trainer.train_iteration()
    assert any(not torch.equal(start[name], p) for name, p in trainer.model.named_parameters())
    assert "losses/value_loss" not in stats and math.isfinite(stats["losses/policy_loss"])


class TwoPassGRPO(MaxMinLMPPO):
    single_pass = False  # type: ignore[assignment]


def test_grpo_single_pass_equals_a_separate_rollout_pass():
    """With one gradient step per batch, the update's own forward replaces the no-grad pass: same result."""
    settings = {**FAST, "advantage": "grpo", "completions_per_prompt": 4, "n_epochs": 1, "minibatch_size": 16}
    results = []
    for cls in (MaxMinLMPPO, TwoPassGRPO):
        model, tokenizer = toy_lm()
        trainer = cls(model, tokenizer, PROMPTS, toy_group_scores(tokenizer), group_names=GROUPS, **settings)
        assert trainer.single_pass == (cls is MaxMinLMPPO)
        results.append((trainer.learn(2).history, lm_parameters(trainer)))
    (history, weights), (history_two_pass, weights_two_pass) = results
    assert history[1]["charts/kl"] > 0
    for row, row_two_pass in zip(history, history_two_pass):
        assert row.keys() == row_two_pass.keys()
        for key in row:
            assert row[key] == pytest.approx(row_two_pass[key], rel=1e-4, abs=1e-5), key
    for name in weights:
        torch.testing.assert_close(weights[name], weights_two_pass[name], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- rollouts
def test_one_forward_pass_reproduces_sampling_log_probs_with_left_padding():
    model, tokenizer = toy_lm()
    prompts = [tokenizer.encode(p) for p in ["Hello", "The movie was long and", "A"]]
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    assert attention_mask.tolist()[0][: input_ids.shape[1] - 1] == [0] * (input_ids.shape[1] - 1)
    kwargs = {"max_new_tokens": 10, "temperature": 0.7, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    response, sampled_logprobs = sample_completions(model, input_ids, attention_mask, generators=row_generators((0, 0), range(3)), **kwargs)
    scored = score_tokens(model, input_ids, attention_mask, response, 0.7)
    mask = response_mask(response, tokenizer.eos_token_id)
    torch.testing.assert_close(scored.logprobs * mask, sampled_logprobs * mask, atol=1e-4, rtol=1e-4)
    # A row's completion does not depend on the other rows of its batch.
    alone, _ = sample_completions(model, input_ids[1:2], attention_mask[1:2], generators=row_generators((0, 0), [1]), **kwargs)
    assert torch.equal(alone[0, : int(mask[1].sum())], response[1, : int(mask[1].sum())])


def test_response_mask_stops_after_first_eos():
    eos = 9
    ids = torch.tensor([[1, 2, eos, eos, eos], [1, 2, 3, 4, 5], [eos, 1, 2, 3, 4]])
    assert response_mask(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


# --------------------------------------------------------------------------- errors
def test_wrong_shape_scores_is_one_clear_error():
    model, tokenizer = toy_lm()
    three_groups = MaxMinLMPPO(model, tokenizer, PROMPTS, lambda p, c: np.zeros((len(c), 3)), group_names=GROUPS, **FAST)
    with pytest.raises(ValueError, match=r"group_scores returned shape \(16, 3\); expected \(16, 2\)"):
        three_groups.train_iteration()
    model, tokenizer = toy_lm()
    flat = MaxMinLMPPO(model, tokenizer, PROMPTS, lambda p, c: np.zeros(len(c)), **FAST)
    with pytest.raises(ValueError, match=r"group_scores returned shape \(16,\); expected \(16, K\)"):
        flat.train_iteration()


def test_bad_set_ups_are_clear_errors():
    model, tokenizer = toy_lm()
    scores = toy_group_scores(tokenizer)
    with pytest.raises(ValueError, match="no prompts"):
        MaxMinLMPPO(model, tokenizer, [], scores, **FAST)
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        MaxMinLMPPO(model, tokenizer, ["word " * 250], scores, **FAST)
    with pytest.raises(ValueError, match="completions_per_prompt must be >= 2"):
        MaxMinLMPPO(model, tokenizer, PROMPTS, scores, **{**FAST, "advantage": "rloo"})
    with pytest.raises(ValueError, match="unknown argument"):
        MaxMinLMPPO(model, tokenizer, PROMPTS, scores, n_steps=3)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        MaxMinLMPPO(model, tokenizer, PROMPTS, scores, **FAST)


# --------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(tmp_path):
    trainer = make_trainer("egd", aggregation_kwargs={"eta": 0.5})
    trainer.learn(2)
    folder = trainer.save(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "optimizer.safetensors",
        "policy.safetensors",
        "trainer.json",
        "value_head.safetensors",
    ]
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))

    restored = make_trainer("worst_group")  # the same start (the reference), another rule: replaced by the checkpoint
    restored.load(tmp_path)
    for name, p in restored.model.named_parameters():
        torch.testing.assert_close(p, dict(trainer.model.named_parameters())[name], rtol=0, atol=0)
    torch.testing.assert_close(restored.value_head.weight, trainer.value_head.weight, rtol=0, atol=0)
    assert restored.iteration == 2 and restored.aggregation.name == "egd" and restored.aggregation.eta == 0.5
    np.testing.assert_array_equal(restored.aggregation.current_weights, trainer.aggregation.current_weights)
    np.testing.assert_array_equal(restored.normalizer.mean, trainer.normalizer.mean)
    assert restored.history == trainer.history
    # Both continue identically: same weights, optimiser moments, rule state and RNG streams.
    assert restored.train_iteration() == trainer.train_iteration()


def test_lora_trains_only_the_adapter_against_the_base_model(tmp_path):
    model, tokenizer = toy_lm()
    model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainer = MaxMinLMPPO(model, tokenizer, PROMPTS, toy_group_scores(tokenizer), group_names=GROUPS, **FAST)
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled: no second copy
    frozen = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if not p.requires_grad}
    first = trainer.train_iteration()
    assert first["charts/kl"] == 0.0  # LoRA starts as the identity: policy == reference
    second = trainer.train_iteration()
    assert second["charts/kl"] != 0.0
    for name, p in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    folder = trainer.save(tmp_path)
    saved = load_file(str(folder / "policy.safetensors"))
    assert saved and all("lora_" in name for name in saved)

    model, tokenizer = toy_lm()
    restored = MaxMinLMPPO(
        apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)), tokenizer, PROMPTS, toy_group_scores(tokenizer), **FAST
    )
    restored.load(tmp_path)
    for name, p in restored.model.named_parameters():
        torch.testing.assert_close(p, dict(trainer.model.named_parameters())[name], rtol=0, atol=0)


class Interrupted(Exception):
    pass


def test_resume_after_interruption_continues_from_saved_iteration(tmp_path):
    uninterrupted = make_trainer()
    uninterrupted.learn(4)

    killed = make_trainer()
    calls = {"n": 0}
    scores = killed.group_scores

    def dies_in_iteration_four(prompts, completions):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Interrupted
        return scores(prompts, completions)

    killed.group_scores = dies_in_iteration_four
    with pytest.raises(Interrupted):
        killed.learn(4, checkpoint_dir=tmp_path)
    assert MaxMinLMPPO.latest_checkpoint(tmp_path).name == "iteration_000003"

    resumed = make_trainer()  # built as at the start (same base model = same reference), then resumed
    resumed.learn(4, checkpoint_dir=tmp_path)
    assert resumed.iteration == 4 and len(resumed.history) == 4
    assert resumed.history == uninterrupted.history
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, dict(uninterrupted.model.named_parameters())[name])


def test_kl_budget_stops_training_and_a_resumed_run_stays_stopped(tmp_path):
    """Training stops at the first iteration whose last ``kl_budget_window`` batches average >= the budget."""
    budget = {"learning_rate": 3e-4, "kl_budget": 1.2, "kl_budget_window": 2}  # the KL grows ~0.15 nats an iteration
    trainer = make_trainer("mean", **budget)
    trainer.learn(30, checkpoint_dir=tmp_path)
    kls = [row["charts/kl"] for row in trainer.history]
    window_means = [np.mean(kls[i - 1 : i + 1]) for i in range(1, len(kls))]
    assert 2 < trainer.iteration < 30, kls
    assert window_means[-1] >= 1.2 and all(mean < 1.2 for mean in window_means[:-1]), kls
    assert MaxMinLMPPO.latest_checkpoint(tmp_path).name == f"iteration_{trainer.iteration:06d}"

    resumed = make_trainer("mean", **budget)
    resumed.learn(30, checkpoint_dir=tmp_path)  # the checkpoint's budget is spent: nothing more to train
    assert resumed.iteration == trainer.iteration and resumed.history == trainer.history

    with pytest.raises(ValueError, match="kl_budget must be None or > 0"):
        make_trainer(kl_budget=0.0)
    with pytest.raises(ValueError, match="kl_budget_window must be >= 1"):
        make_trainer(kl_budget=1.0, kl_budget_window=0)
