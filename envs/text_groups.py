"""User groups for text: true scores of a finished completion.

A text group scores whole completions, not tokens. Two ways in:

- :func:`score_texts` scores a batch of finished texts, ``(n_texts, K)``: what an
  LM trainer calls on its completions.
- :data:`TEXT_GROUPS` is the :class:`~egalitarian_rl.preferences.GroupRewardLibrary`
  of :class:`~egalitarian_rl.envs.textgen.TextGenEnv`. The env puts every
  scorer's score of the finished completion into ``info["text_score_<name>"]`` at
  the episode's last token (0.0 at every earlier token); a group's step reward
  reads that key. The score therefore lands once per episode, at the last token,
  through the same Population / ``info_keys`` path as every other env, and
  segments store only numbers (no strings in a preference dataset).

Scorers (each ``texts -> (n,)`` float64):

- ``positive``: VADER compound sentiment in [-1, 1] (``vaderSentiment``'s bundled lexicon).
- ``positive_review``: the same of the whole review, the prompt followed by the reply
  (:class:`ReviewScorer`; TRL's IMDB sentiment example scores query + response alike).
- ``concise``: ``-n_words / CONCISE_WORD_SCALE``: 0 for an empty reply, -1 for 20 words.
- ``on_topic``: share of words about films (:data:`FILM_WORDS`), in [0, 1].
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from egalitarian_rl.preferences.population import GroupRewardLibrary
from egalitarian_rl.preferences.segments import Transitions

#: A text scorer: ``n`` finished texts in, ``(n,)`` float scores out.
TextScorer = Callable[[Sequence[str]], np.ndarray]

#: Words per unit of the ``concise`` score (a 20-word reply scores -1, like VADER's range).
CONCISE_WORD_SCALE = 20.0
#: Prefix of the ``info`` keys holding each scorer's score of the finished completion.
SCORE_KEY_PREFIX = "text_score_"
#: Words the ``on_topic`` group counts as being about films.
FILM_WORDS = frozenset(
    (  # noqa: SIM905 (a word list reads better as one string)
        "acting actor actors actress audience camera cast character characters cinema cinematography comedy director "
        "drama ending episode film films genre horror movie movies performance plot role scene scenes screen screenplay "
        "script sequel series story thriller"
    ).split()
)
_WORD = re.compile(r"[A-Za-z']+")


@functools.cache
def _vader():
    # Built once per process: loading the lexicon takes ~20 ms, scoring a reply ~0.2 ms.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(texts: Sequence[str]) -> np.ndarray:
    """VADER compound sentiment of each text, ``(n,)`` in [-1, 1]; 0 for an empty text."""
    analyzer = _vader()
    return np.array([analyzer.polarity_scores(text)["compound"] for text in texts], dtype=np.float64)


def conciseness(texts: Sequence[str]) -> np.ndarray:
    """Minus the number of whitespace-separated words over :data:`CONCISE_WORD_SCALE`, ``(n,)``."""
    return np.array([-len(text.split()) / CONCISE_WORD_SCALE for text in texts], dtype=np.float64)


def film_topic(texts: Sequence[str]) -> np.ndarray:
    """Share of each text's words that are in :data:`FILM_WORDS`, ``(n,)`` in [0, 1]; 0 for no words."""
    scores = np.zeros(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        if words:
            scores[i] = sum(word in FILM_WORDS for word in words) / len(words)
    return scores


@dataclass(frozen=True)
class ReviewScorer:
    """A scorer that judges the whole review, the prompt followed by the reply, not the reply alone.

    On the reply alone VADER gives a one-word "Awesome." 0.62, so a group that wants positive
    sentiment is served by the shortest possible reply, and a concise group with it (measured:
    PPO pushed hard on reply-only positivity collapsed into "Awesome."; docs/DESIGN.md). On the
    whole review the reply has to outweigh the prompt's own sentiment, which takes words.
    :func:`score_texts` passes ``"<prompt> <reply>"``.

    :param scorer: the text scorer applied to the joined review.
    """

    scorer: TextScorer

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.scorer(texts)


#: The text scorers every :class:`~egalitarian_rl.envs.textgen.TextGenEnv` reports by default, by group name.
TEXT_SCORERS: dict[str, TextScorer] = {
    "positive": sentiment,
    "positive_review": ReviewScorer(sentiment),
    "concise": conciseness,
    "on_topic": film_topic,
}


def score_key(name: str) -> str:
    """The ``info`` key holding scorer ``name``'s score of the finished completion."""
    return f"{SCORE_KEY_PREFIX}{name}"


def score_texts(
    group_names: Sequence[str],
    texts: Sequence[str],
    scorers: Mapping[str, TextScorer] | None = None,
    prompts: Sequence[str] | None = None,
) -> np.ndarray:
    """True scores of finished texts by every named group.

    :param group_names: ``K`` group names, for example ``("positive", "concise")``.
    :param texts: ``n`` finished completions (without the prompt).
    :param scorers: name -> scorer; defaults to :data:`TEXT_SCORERS`.
    :param prompts: ``n`` prompts as given (before any chat template), one per completion; needed only
        by :class:`ReviewScorer` groups, which score ``"<prompt> <completion>"``.
    :return: scores ``(n, K)`` float64, column ``k`` from ``group_names[k]``.
    """
    scorers = TEXT_SCORERS if scorers is None else scorers
    unknown = [name for name in group_names if name not in scorers]
    if unknown:
        raise ValueError(f"unknown text group {unknown}; known: {sorted(scorers)}")
    texts = list(texts)
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"score_texts: {len(prompts)} prompts for {len(texts)} texts; give one prompt per text")
    scores = np.zeros((len(texts), len(group_names)), dtype=np.float64)
    for k, name in enumerate(group_names):
        scorer = scorers[name]
        inputs = texts
        if isinstance(scorer, ReviewScorer):
            if prompts is None:
                raise ValueError(f"text group {name!r} scores the prompt with the reply: pass prompts to score_texts")
            inputs = [f"{prompt} {text}" for prompt, text in zip(prompts, texts)]
        column = np.asarray(scorer(inputs), dtype=np.float64)
        if column.shape != (len(texts),):
            raise ValueError(f"text scorer {name!r} returned shape {column.shape} for {len(texts)} texts, expected ({len(texts)},)")
        scores[:, k] = column
    return scores


@dataclass(frozen=True)
class FinishedTextScore:
    """A group's step reward: the score the env reported for the finished completion, 0 before it.

    A picklable callable (populations are recorded in env specs and copied).

    :param key: the ``info`` key to read (see :func:`score_key`).
    """

    key: str

    def __call__(self, transitions: Transitions) -> np.ndarray:
        """Rewards of the leading shape ``(...)`` of ``transitions`` (one step, a batch, or segments ``(n, L)``)."""
        return np.asarray(transitions.infos[self.key], dtype=np.float64)


def text_group_library(scorers: Mapping[str, TextScorer]) -> GroupRewardLibrary:
    """The group library for envs that report ``scorers``' scores (``TextGenEnv(scorers=...)``)."""
    return GroupRewardLibrary(
        {name: FinishedTextScore(score_key(name)) for name in scorers},
        info_keys=tuple(score_key(name) for name in scorers),
    )


#: The text groups of ``egalitarian_rl/TextGen-v0``: ``positive``, ``concise`` and ``on_topic``.
TEXT_GROUPS = text_group_library(TEXT_SCORERS)

__all__ = [
    "CONCISE_WORD_SCALE",
    "FILM_WORDS",
    "SCORE_KEY_PREFIX",
    "TEXT_GROUPS",
    "TEXT_SCORERS",
    "FinishedTextScore",
    "ReviewScorer",
    "TextScorer",
    "conciseness",
    "film_topic",
    "score_key",
    "score_texts",
    "sentiment",
    "text_group_library",
]
