"""Text rewards on the shared Bradley-Terry / EM code: embeddings, cache, simulated text users, learned scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egalitarian_rl.experiments.config import ConfigError
from egalitarian_rl.experiments.lm_pipeline import PromptConfig, check_prompts, load_prompts
from egalitarian_rl.lm.models import gpt2_tokenizer, tiny_gpt2
from egalitarian_rl.lm.text_rewards import (
    CausalLMEncoder,
    EmbeddingCache,
    EmbeddingCacheError,
    LearnedGroupScores,
    MiniLMEncoder,
    SequenceClassifierReward,
    TextEmbedder,
    TextPool,
    collect_text_preferences,
    text_population,
)
from egalitarian_rl.rewards import EMRewardMixture, adjusted_rand_index, fit_bradley_terry, preference_accuracy

torch.set_num_threads(1)

GROUPS = ("positive", "concise")
GOOD = ["great", "wonderful", "brilliant", "lovely", "beautiful", "excellent", "delightful", "superb"]
BAD = ["awful", "boring", "terrible", "dull", "horrible", "dreadful", "bad", "painful"]
FILLER = "and the story of the people in the town went on through the long second half of the film".split()  # noqa: SIM905 (a sentence reads better as one string)


def synthetic_pool(n_prompts: int = 40, per_prompt: int = 3, seed: int = 0) -> TextPool:
    """Completions whose sentiment and length vary independently: 1 to 3 sentiment words, 2 to 18 filler words."""
    rng = np.random.default_rng(seed)
    texts, index = [], []
    for p in range(n_prompts):
        for _ in range(per_prompt):
            words = list(rng.choice(GOOD if rng.random() < 0.5 else BAD, size=rng.integers(1, 4)))
            words += FILLER[: rng.integers(2, 19)]
            texts.append("It was " + " ".join(words) + ".")
            index.append(p)
    return TextPool.from_completions([f"prompt {p}" for p in range(n_prompts)], index, texts, GROUPS)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def fitted(minilm: MiniLMEncoder) -> dict:
    """Users (80% positive, 20% concise) compare synthetic completions; single BT and K=2 EM on MiniLM embeddings."""
    pool = synthetic_pool()
    embeddings = TextEmbedder(minilm).embed(pool.completions)
    data = collect_text_preferences(pool, embeddings, text_population({"positive": 0.8, "concise": 0.2}, beta=10.0), 40, 30, seed=0)
    train, heldout = data.split_by_comparison(0.2, seed=0)
    inputs = {"use_state": True, "use_action": False, "use_next_state": False, "hidden_sizes": (32,)}
    bt = fit_bradley_terry(train, epochs=40, seed=0, **inputs).reward
    em = EMRewardMixture(2, seed=0, final_epochs=20, m_step_epochs=2, **inputs).fit(train)
    return {"pool": pool, "data": data, "train": train, "heldout": heldout, "bt": bt, "em": em, "embeddings": embeddings}


def test_completions_are_length_one_embedding_segments(fitted: dict) -> None:
    data = fitted["data"]
    assert data.segments_a.obs.shape == (len(data), 1, 384)
    assert data.group_names == GROUPS
    # Both sides of a comparison answer the same prompt, and a user's label follows their group's true score.
    pairs = data.segment_ids
    pool = fitted["pool"]
    assert np.array_equal(pool.prompt_index[pairs[:, 0]], pool.prompt_index[pairs[:, 1]])
    groups = data.comparison_groups()
    true_diff = pool.scores[pairs[:, 0], groups] - pool.scores[pairs[:, 1], groups]
    strict = (data.labels != 0.5) & (np.abs(true_diff) > 0.2)
    assert np.mean((true_diff[strict] > 0) == (data.labels[strict] == 1.0)) > 0.85


def test_em_recovers_the_text_groups_and_the_mixture_serves_the_minority(fitted: dict) -> None:
    em, train, heldout = fitted["em"], fitted["train"], fitted["heldout"]
    assert adjusted_rand_index(train.user_groups, em.assignments_) >= 0.8
    single = preference_accuracy(fitted["bt"], heldout).per_group
    mixture = em.accuracy(heldout).per_group
    # The single reward follows the 80% majority; the mixture has a member for the concise users.
    assert mixture["concise"] > single["concise"] + 0.1
    assert mixture["concise"] > 0.75 and mixture["positive"] > 0.75


def test_true_scores_bound_the_learned_rewards_accuracy(fitted: dict) -> None:
    from egalitarian_rl.lm.text_rewards import true_score_accuracy

    ceiling = true_score_accuracy(fitted["pool"], fitted["heldout"]).per_group
    mixture = fitted["em"].accuracy(fitted["heldout"]).per_group
    assert ceiling["positive"] > 0.85 and ceiling["concise"] > 0.8  # beta = 10: few answers go against the true score
    assert all(ceiling[g] >= mixture[g] - 0.05 for g in GROUPS)


def test_learned_group_scores_rank_texts_like_the_groups(fitted: dict, minilm: MiniLMEncoder) -> None:
    em = fitted["em"]
    scores = LearnedGroupScores(em.reward, TextEmbedder(minilm))
    texts = ["It was wonderful, brilliant and lovely.", "It was awful, boring and dull.", "It was " + " ".join(FILLER) + "."]
    out = scores(["p"] * 3, texts)
    assert out.shape == (3, 2) and out.dtype == np.float64
    member = {name: int(np.bincount(em.assignments_[fitted["train"].user_groups == g]).argmax()) for g, name in enumerate(GROUPS)}
    assert out[0, member["positive"]] > out[1, member["positive"]]  # positive member prefers praise
    assert out[0, member["concise"]] > out[2, member["concise"]]  # concise member prefers the short text


class CountingEncoder:
    """A cheap stand-in encoder that counts what it was asked to encode."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return np.array([[len(t), t.count("a")] for t in texts], dtype=np.float32)


def test_cache_computes_each_text_once_and_survives_a_reload(tmp_path) -> None:
    encoder = CountingEncoder("counter-v1")
    first = TextEmbedder(encoder, tmp_path).embed(["abc", "aa", "abc"])
    assert encoder.calls == [["abc", "aa"]]
    again = CountingEncoder("counter-v1")
    second = TextEmbedder(again, tmp_path).embed(["aa", "abc", "new"])
    assert again.calls == [["new"]]  # the other two came from disk
    np.testing.assert_array_equal(second[:2], first[[1, 0]])
    assert len(EmbeddingCache(tmp_path, "counter-v1")) == 3


def test_cache_built_with_another_encoder_is_refused_in_one_line(tmp_path) -> None:
    TextEmbedder(CountingEncoder("counter-v1"), tmp_path).embed(["x"])
    with pytest.raises(EmbeddingCacheError, match="built with encoder 'counter-v1', not 'all-MiniLM") as info:
        EmbeddingCache(tmp_path, "all-MiniLM-L6-v2/mean/max128")
    assert "\n" not in str(info.value)


def test_prompts_that_tokenize_to_nothing_are_refused() -> None:
    tokenizer = gpt2_tokenizer()
    check_prompts(tokenizer, ["The movie was", " good"])
    with pytest.raises(ValueError, match=r"prompt 1 \(''\) tokenizes to nothing") as info:
        check_prompts(tokenizer, ["The movie was", ""])
    assert "\n" not in str(info.value)


def test_missing_prompt_file_is_one_clear_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match="prompts.file: prompts file .*not found") as info:
        load_prompts(PromptConfig(file=str(tmp_path / "nope.txt"), n_train=2, n_eval=1), seed=0)
    assert "\n" not in str(info.value)
    path = tmp_path / "prompts.txt"
    path.write_text("one\ntwo\n\nthree\n")
    train, held_out = load_prompts(PromptConfig(file=str(path), n_train=2, n_eval=1), seed=0)
    assert sorted(train + held_out) == ["one", "three", "two"]


def test_causal_lm_encoder_pools_hidden_states() -> None:
    model, tokenizer = tiny_gpt2(seed=0)
    out = CausalLMEncoder(model, tokenizer, name="tiny").encode(["a good film", "", "bad"])
    assert out.shape == (3, model.config.n_embd) and np.isfinite(out).all()
    assert np.abs(out[0] - out[2]).sum() > 0


@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": ("c_attn",)}])
def test_sequence_classifier_reward_learns_a_preference(lora) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=2)
    reward = SequenceClassifierReward(GPT2ForSequenceClassification(config), tokenizer, lora=lora)
    rng = np.random.default_rng(0)
    good = [f"the film was {w} indeed" for w in GOOD]
    bad = [f"the film was {w} indeed" for w in BAD]
    a = [good[i] if flip else bad[i] for i, flip in zip(rng.integers(8, size=64), rng.random(64) < 0.5)]
    labels = np.array([1.0 if text in good else 0.0 for text in a])
    b = [bad[i] if label else good[i] for i, label in zip(rng.integers(8, size=64), labels)]
    # Member 0 is trained on the comparisons, member 1 on none (weights 0): only member 0 learns.
    weights = np.stack([np.ones(64), np.zeros(64)], axis=1)
    losses = reward.fit(a, b, labels, weights, epochs=15, lr=3e-3 if lora is None else 1e-2, batch_size=16)
    assert losses[-1] < losses[0]
    scores = reward.group_scores([""] * 16, good + bad)
    assert scores.shape == (16, 2)
    assert (scores[:8, 0].mean() - scores[8:, 0].mean()) > 0.5


def test_with_length_appends_the_log_word_count_and_renames_the_cache_key(tmp_path) -> None:
    from egalitarian_rl.lm.text_rewards import WithLength

    encoder = WithLength(CountingEncoder("counter-v1"))
    out = TextEmbedder(encoder, tmp_path).embed(["one two three", ""])
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out[:, -1], np.log1p([3, 0]))
    with pytest.raises(EmbeddingCacheError, match="'counter-v1\\+log1p_words', not 'counter-v1'"):
        EmbeddingCache(tmp_path, "counter-v1")
