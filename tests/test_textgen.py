"""TextGenEnv and the text groups: Gymnasium/SB3 conformance, group scores at the last token, preferences, errors."""

from __future__ import annotations

import os
from pathlib import Path

import egalitarian_rl.envs as envs
import gymnasium as gym
import numpy as np
import pytest
import torch
from egalitarian_rl.envs.text_groups import TEXT_SCORERS, score_key, score_texts
from egalitarian_rl.envs.textgen import movie_review_prompts, split_observation
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from egalitarian_rl.lm import ModelLoadError, gpt2_tokenizer
from egalitarian_rl.lm.models import CACHE_ENV_VAR
from egalitarian_rl.preferences.collect import collect_preferences
from egalitarian_rl.preferences.wrappers import MultiUserPreferenceWrapper

torch.set_num_threads(1)

PROMPTS = ["The movie was", "I think that this film", "Overall"]
MAX_PROMPT, MAX_NEW = 8, 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    cache = os.environ.get(CACHE_ENV_VAR) or tmp_path_factory.mktemp("cache")
    return gpt2_tokenizer(cache)


def make_env(tokenizer, **kwargs) -> gym.Env:
    kwargs = {"prompts": PROMPTS, "max_prompt_tokens": MAX_PROMPT, "max_new_tokens": MAX_NEW, **kwargs}
    return gym.make(envs.TEXTGEN_ID, tokenizer=tokenizer, **kwargs)


@pytest.fixture
def population():
    return envs.make_population(envs.TEXTGEN_ID, {"positive": 0.8, "concise": 0.2})


def play(env: gym.Env, tokens: list[int]) -> list[tuple]:
    """Step ``tokens`` and return every step's ``(obs, reward, terminated, truncated, info)``."""
    return [env.step(token) for token in tokens]


def test_check_env_unwrapped_and_wrapped(tokenizer, population):
    env = make_env(tokenizer)
    gym_check_env(env.unwrapped, skip_render_check=False)
    sb3_check_env(env.unwrapped, warn=True)
    wrapped = MultiUserPreferenceWrapper(make_env(tokenizer), population)
    gym_check_env(wrapped, skip_render_check=True)
    sb3_check_env(wrapped, warn=True)


def test_observation_layout_and_episode_end_at_eos(tokenizer):
    env = make_env(tokenizer)
    obs, info = env.reset(options={"prompt_index": 0})
    assert obs.shape == env.observation_space.shape == (2 * (MAX_PROMPT + MAX_NEW),)
    ids, mask = split_observation(obs)
    prompt_ids = tokenizer(PROMPTS[0])["input_ids"]
    # Prompt right-aligned before column MAX_PROMPT (left padding), nothing after.
    assert ids[MAX_PROMPT - len(prompt_ids) : MAX_PROMPT].tolist() == prompt_ids
    assert mask.tolist() == [0] * (MAX_PROMPT - len(prompt_ids)) + [1] * len(prompt_ids) + [0] * MAX_NEW
    assert info["prompt"] == PROMPTS[0]

    words = tokenizer(" great fun")["input_ids"]
    steps = play(env, [*words, tokenizer.eos_token_id])
    obs, reward, terminated, truncated, info = steps[-1]
    ids, mask = split_observation(obs)
    assert ids[MAX_PROMPT : MAX_PROMPT + len(words) + 1].tolist() == [*words, tokenizer.eos_token_id]
    assert mask[MAX_PROMPT:].tolist() == [1] * (len(words) + 1) + [0] * (MAX_NEW - len(words) - 1)
    assert terminated and not truncated and reward == 0.0
    assert info["completion"] == " great fun" and info["prompt"] == PROMPTS[0]
    assert all(not (s[2] or s[3]) and "completion" not in s[4] for s in steps[:-1])
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)


def test_truncated_after_max_new_tokens(tokenizer):
    env = make_env(tokenizer)
    env.reset(seed=0)
    steps = play(env, [tokenizer.encode(" the")[0]] * MAX_NEW)
    assert [(s[2], s[3]) for s in steps] == [(False, False)] * (MAX_NEW - 1) + [(False, True)]
    assert steps[-1][4]["completion"] == " the" * MAX_NEW


def test_other_stop_tokens_end_the_episode(tokenizer):
    stop = tokenizer.encode(".")[0]
    env = make_env(tokenizer, eos_token_ids=[stop, tokenizer.eos_token_id])
    env.reset(seed=0)
    steps = play(env, tokenizer.encode(" Fine."))
    assert steps[-1][2] and steps[-1][4]["completion"] == " Fine."


def test_reset_draws_prompts_with_the_seeded_rng(tokenizer):
    env = make_env(tokenizer)
    first = [env.reset(seed=3)[1]["prompt_index"]] + [env.reset()[1]["prompt_index"] for _ in range(9)]
    again = [env.reset(seed=3)[1]["prompt_index"]] + [env.reset()[1]["prompt_index"] for _ in range(9)]
    assert first == again and len(set(first)) > 1


def test_group_scores_land_at_the_last_token_only(tokenizer, population):
    env = MultiUserPreferenceWrapper(make_env(tokenizer, max_new_tokens=12), population)
    env.reset(seed=0)
    text = " I love this wonderful film"
    steps = play(env, [*tokenizer(text)["input_ids"], tokenizer.eos_token_id])
    expected = score_texts(population.group_names, [text])[0]
    assert expected[0] > 0.5 and expected[1] == -5 / 20  # VADER likes it; 5 words
    np.testing.assert_allclose(steps[-1][4]["group_rewards"], expected)
    assert all(np.all(s[4]["group_rewards"] == 0.0) for s in steps[:-1])


def test_score_texts():
    texts = ["What a great, wonderful movie!", "Terrible.", ""]
    scores = score_texts(["positive", "concise", "on_topic"], texts)
    assert scores.shape == (3, 3) and scores.dtype == np.float64
    assert scores[0, 0] > 0.5 > -0.3 > scores[1, 0] and scores[2, 0] == 0.0
    np.testing.assert_allclose(scores[:, 1], [-5 / 20, -1 / 20, 0.0])
    np.testing.assert_allclose(scores[:, 2], [1 / 5, 0.0, 0.0])  # "movie" of 5 words
    assert score_texts(["concise"], []).shape == (0, 1)
    with pytest.raises(ValueError, match="unknown text group \\['polite'\\]"):
        score_texts(["positive", "polite"], texts)
    with pytest.raises(ValueError, match="returned shape"):
        score_texts(["bad"], texts, scorers={"bad": lambda t: np.zeros(2)})


def test_review_scorer_judges_prompt_and_reply_together():
    prompt = "Watching this stinker constitutes cruel and unusual punishment"
    replies = ["Awesome.", "Awesome, a wonderful, brilliant and beautiful film full of joy and heart."]
    reply_only = score_texts(["positive"], replies)[:, 0]
    review = score_texts(["positive_review", "concise"], replies, prompts=[prompt, prompt])
    # alone, the one-word reply is already positive; after a negative prompt it does not outweigh it
    assert reply_only[0] > 0.5 and review[0, 0] < 0.0 < 0.5 < review[1, 0]
    np.testing.assert_allclose(review[:, 1], [-1 / 20, -12 / 20])  # concise still reads the reply only
    with pytest.raises(ValueError, match="'positive_review' scores the prompt with the reply: pass prompts"):
        score_texts(["positive_review"], replies)
    with pytest.raises(ValueError, match="1 prompts for 2 texts"):
        score_texts(["positive_review"], replies, prompts=[prompt])


def test_custom_scorers_reach_info(tokenizer):
    env = make_env(tokenizer, scorers={"shouty": lambda texts: np.array([t.count("!") for t in texts], dtype=float)})
    env.reset(seed=0)
    *_, (_, _, _, _, info) = play(env, [*tokenizer("!!")["input_ids"], tokenizer.eos_token_id])
    assert info[score_key("shouty")] == 2.0 and score_key("positive") not in info


def test_collect_preferences_on_text(tokenizer, population):
    env = MultiUserPreferenceWrapper(make_env(tokenizer), population)
    # Segments of a whole episode (random tokens almost never hit EOS), so each holds a finished completion.
    dataset = collect_preferences(env, population, n_users=10, comparisons_per_user=6, segment_length=MAX_NEW, seed=0)
    dataset.validate()
    assert len(dataset) == 60 and dataset.segments_a.obs.shape == (60, MAX_NEW, 2 * (MAX_PROMPT + MAX_NEW))
    # Each group's segment return is its score of the completion decoded from the last observation.
    ids, _ = split_observation(dataset.segments_a.next_obs[:, -1])
    completions = tokenizer.batch_decode(ids[:, MAX_PROMPT:], skip_special_tokens=True)
    returns = np.stack([g.segment_returns(dataset.segments_a) for g in population.groups], axis=1)
    np.testing.assert_allclose(returns, score_texts(population.group_names, completions))
    assert {0.0, 1.0} <= set(dataset.labels.tolist())


def test_prompts_from_a_file_or_an_iterable(tokenizer, tmp_path: Path):
    path = tmp_path / "prompts.txt"
    path.write_text("The plot\n\nThe ending\n", encoding="utf-8")
    assert make_env(tokenizer, prompts=path).unwrapped.prompts == ["The plot", "The ending"]
    assert make_env(tokenizer, prompts=str(path)).unwrapped.prompts == ["The plot", "The ending"]
    assert make_env(tokenizer, prompts=(p for p in PROMPTS)).unwrapped.prompts == PROMPTS


def test_chat_template_prompts(tokenizer, tmp_path_factory):
    chat = gpt2_tokenizer(os.environ.get(CACHE_ENV_VAR) or tmp_path_factory.mktemp("chat"))
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} =>{% endif %}"
    env = make_env(chat, chat_template='Continue: "{prompt}"', max_prompt_tokens=16, render_mode="ansi")
    obs, info = env.reset(options={"prompt_index": 2})
    ids, mask = split_observation(obs)
    assert chat.decode(ids[mask == 1]) == 'Continue: "Overall" =>'
    assert info["prompt"] == "Overall"
    env.step(chat.encode(" Good")[0])
    assert env.render() == "Overall >>>  Good"


def test_errors_are_one_clear_line(tokenizer, tmp_path: Path):
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens long, more than max_prompt_tokens=8"):
        make_env(tokenizer, prompts=["short", "a prompt that is far too long for eight tokens of context"])
    with pytest.raises(ValueError, match="prompt set is empty"):
        make_env(tokenizer, prompts=[])
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="prompt set is empty"):
        make_env(tokenizer, prompts=empty_file)
    with pytest.raises(ValueError, match="prompts file .* not found"):
        make_env(tokenizer, prompts=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        make_env(tokenizer, prompts=[""])
    without_pad = gpt2_tokenizer(tmp_path)
    without_pad.pad_token = None
    with pytest.raises(ValueError, match="has no pad token: set tokenizer.pad_token or pass pad_with_eos=True"):
        make_env(without_pad)
    obs, _ = make_env(without_pad, pad_with_eos=True).reset(options={"prompt_index": 2})
    assert obs[0] == without_pad.eos_token_id and without_pad.pad_token is None
    env = make_env(tokenizer)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action 50257 is not a token id in \[0, 50257\)"):
        env.step(50257)
    with pytest.raises(ValueError, match="needs a tokenizer or a model_name_or_path"):
        gym.make(envs.TEXTGEN_ID, prompts=PROMPTS)


def test_model_that_cannot_be_loaded_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot load 'gpt2' offline"):
        gym.make(envs.TEXTGEN_ID, model_name_or_path="gpt2", prompts=PROMPTS)


def test_unknown_text_group_names_the_known_ones():
    with pytest.raises(ValueError, match=r"this env offers \['concise', 'on_topic', 'positive', 'positive_review'\]"):
        envs.make_population(envs.TEXTGEN_ID, {"positive": 0.5, "polite": 0.5})


@pytest.mark.slow
def test_smollm2_acts_in_the_env(monkeypatch, pytestconfig, tmp_path_factory):
    """The embedded model is the agent: greedy tokens from its logits on the env's observation."""
    from egalitarian_rl.lm import CONTINUE_REVIEW, load_smollm2

    cache = os.environ.get(CACHE_ENV_VAR)
    if not cache:
        cache = pytestconfig.cache.mkdir("egalitarian_rl_models") if getattr(pytestconfig, "cache", None) else None
    model, chat = load_smollm2(cache or tmp_path_factory.mktemp("smollm2"))
    env = gym.make(envs.TEXTGEN_ID, tokenizer=chat, prompts=["The acting was"], chat_template=CONTINUE_REVIEW, max_new_tokens=4)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        ids, mask = (torch.as_tensor(a)[None] for a in split_observation(obs))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        action = int(logits[0, int(np.flatnonzero(mask[0])[-1])].argmax())
        obs, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    assert info["completion"].strip()
    assert set(info) >= {score_key(name) for name in TEXT_SCORERS}


def test_movie_review_prompts():
    prompts = movie_review_prompts(20, n_words=8, seed=1)
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert all(1 <= len(p.split()) <= 8 and "<br" not in p for p in prompts)
    assert movie_review_prompts(20, n_words=8, seed=1) == prompts != movie_review_prompts(20, n_words=8, seed=2)
    assert movie_review_prompts(n_words=3)[0] == "I rented I"  # IMDB's first review
    with pytest.raises(ValueError, match="no movie reviews from source 'netflix'"):
        movie_review_prompts(source="netflix")
    # openings that read negative: a reply must carry the positivity itself
    from egalitarian_rl.envs.text_groups import sentiment

    negative = movie_review_prompts(30, n_words=8, max_sentiment=-0.3, seed=1)
    assert len(set(negative)) == 30 and (sentiment(negative) <= -0.3).all()
    with pytest.raises(ValueError, match="max_sentiment -0.99"):
        movie_review_prompts(30, max_sentiment=-0.99)


def test_evaluation_reads_the_true_scores(tokenizer, population):
    """A scripted policy that always writes " great" then ends: its true returns are the scores of " great"."""
    from egalitarian_rl.evaluation.rollout import evaluate_group_returns

    great, eos = tokenizer.encode(" great")[0], tokenizer.eos_token_id

    class Scripted:
        def predict(self, observation: np.ndarray, *, deterministic: bool = True) -> tuple[int, None]:
            _, mask = split_observation(observation)
            return (great if mask[MAX_PROMPT:].sum() == 0 else eos), None

    env = MultiUserPreferenceWrapper(make_env(tokenizer), population)
    returns = evaluate_group_returns(Scripted(), env, n_episodes=3)
    np.testing.assert_allclose(returns, np.repeat(score_texts(population.group_names, [" great"]), 3, axis=0))
