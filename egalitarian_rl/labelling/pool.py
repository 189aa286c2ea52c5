"""What annotators look at: a pool of segments, each with the data the rewards learn from and what a person sees.

A control env's segment is shown as a short animated GIF of its ``rgb_array`` frames (recorded
while rolling out, because an env's state cannot in general be restored from an observation);
a text segment is a prompt and a completion, its data a length-1 segment whose observation is
an embedding of the completion (as :mod:`egalitarian_rl.lm` does for text rewards).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from egalitarian_rl.preferences.segments import Behaviour, Transitions, rollout_segments, sample_pairs

#: ``info`` keys the frame recorder adds; removed from the pool's transitions once rendered.
FRAME_KEY = "labelling_frame"
FRAME_BEFORE_KEY = "labelling_frame_before"


@dataclass
class SegmentPool:
    """Segments that can be shown to annotators.

    :param transitions: the segments' step data, leading shape ``(n, L)``: what reward models read.
    :param media: ``(n,)`` encoded clip of each segment (GIF bytes) or ``None`` (text segments).
    :param prompts: ``(n,)`` prompt of each text segment, or ``None`` for control segments.
    :param texts: ``(n,)`` completion of each text segment, or ``None`` for control segments.
    """

    transitions: Transitions
    media: list[bytes] | None = None
    prompts: list[str] | None = None
    texts: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self)
        for name in ("media", "prompts", "texts"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"SegmentPool.{name} has {len(value)} entries for {n} segments")
        if (self.prompts is None) != (self.texts is None):
            raise ValueError("SegmentPool: give prompts and texts together (text segments) or neither")

    def __len__(self) -> int:
        return int(self.transitions.acts.shape[0])

    @property
    def kind(self) -> str:
        """``"text"`` (prompt and completion) or ``"clip"`` (rendered frames) or ``"data"`` (nothing to show)."""
        if self.texts is not None:
            return "text"
        return "clip" if self.media is not None else "data"


def candidate_pairs(pool: SegmentPool, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n_pairs`` distinct unordered pairs of pool positions, ``(M, 2)`` with ``a < b``.

    Text segments are paired only with completions of the same prompt (comparing replies to
    different prompts says little about either); control segments with any other segment.
    """
    if pool.prompts is None:
        pairs = sample_pairs(len(pool), n_pairs, rng)
    else:
        prompts = np.asarray(pool.prompts, dtype=object)
        groups = [np.flatnonzero(prompts == p) for p in dict.fromkeys(pool.prompts)]
        groups = [g for g in groups if len(g) >= 2]
        if not groups:
            raise ValueError("no prompt has two completions to compare")
        # Each draw: a prompt (weighted by its completions), then two of its completions.
        which = rng.choice(len(groups), size=n_pairs, p=np.array([len(g) for g in groups]) / sum(len(g) for g in groups))
        pairs = np.concatenate([groups[g][sample_pairs(len(groups[g]), int((which == g).sum()), rng)] for g in range(len(groups))])
    return np.unique(np.sort(pairs, axis=1), axis=0)


class FrameRecorder(gym.Wrapper):
    """Puts the rendered frame after each step (and the one before it) into ``info``.

    :func:`~egalitarian_rl.preferences.segments.rollout_segments` records ``info`` entries per
    step, so the frames end up cut into the same segments as the transitions, with no second
    rollout loop. The env must have been made with ``render_mode="rgb_array"``.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(f"FrameRecorder needs an env made with render_mode='rgb_array', got {env.render_mode!r}")
        self._last_frame: np.ndarray | None = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self.env.reset(**kwargs)
        self._last_frame = np.asarray(self.env.render())
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        frame = np.asarray(self.env.render())
        info = {**info, FRAME_BEFORE_KEY: self._last_frame, FRAME_KEY: frame}
        self._last_frame = frame
        return obs, reward, terminated, truncated, info


def encode_gif(frames: np.ndarray, fps: float = 4.0, scale: int = 2) -> bytes:
    """An endlessly looping GIF of ``frames``.

    :param frames: ``(T, H, W, 3)`` uint8 pictures.
    :param fps: frames per second.
    :param scale: integer upscaling (nearest neighbour): small renders stay crisp.
    """
    import imageio.v3 as iio  # optional dependency, needed only to show clips

    frames = np.asarray(frames, dtype=np.uint8)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    buffer = io.BytesIO()
    iio.imwrite(buffer, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    return buffer.getvalue()


def control_pool(
    env: gym.Env,
    n_segments: int,
    segment_length: int,
    behaviour: Behaviour = "random",
    info_keys: Sequence[str] = (),
    seed: int | None = None,
    fps: float | None = None,
) -> SegmentPool:
    """Roll out ``behaviour`` and keep every segment with a GIF of its frames.

    :param env: made with ``render_mode="rgb_array"`` (not yet wrapped in a :class:`FrameRecorder`).
    :param n_segments: pool size ``n``.
    :param segment_length: steps per segment ``L``; a clip shows ``L + 1`` frames (start and after each step).
    :param behaviour: who acts (see :func:`~egalitarian_rl.preferences.rollout_segments`).
    :param info_keys: ``info`` entries the group rewards read (kept in the transitions).
    :param seed: seeds the rollout.
    :param fps: clip speed; defaults to the env's ``metadata["render_fps"]`` (or 4).
    """
    keys = (*info_keys, FRAME_BEFORE_KEY, FRAME_KEY)
    segments = rollout_segments(FrameRecorder(env), n_segments, segment_length, behaviour, keys, seed=seed)
    fps = fps or float(env.metadata.get("render_fps") or 4)
    # Frame before the first step, then the frame after every step.
    clips = np.concatenate([segments.infos[FRAME_BEFORE_KEY][:, :1], segments.infos[FRAME_KEY]], axis=1)
    media = [encode_gif(clip, fps=fps) for clip in clips]
    infos = {key: value for key, value in segments.infos.items() if key not in (FRAME_KEY, FRAME_BEFORE_KEY)}
    return SegmentPool(Transitions(segments.obs, segments.acts, segments.next_obs, infos), media=media)


def text_pool(prompts: Sequence[str], texts: Sequence[str], embed: Callable[[list[str]], np.ndarray]) -> SegmentPool:
    """Text segments: each completion is a length-1 segment whose observation is its embedding.

    :param prompts: ``(n,)`` the prompt each completion answers.
    :param texts: ``(n,)`` the completions shown to annotators.
    :param embed: texts -> ``(n, d)`` float features (e.g. a sentence encoder's ``embed``).
    """
    if len(prompts) != len(texts):
        raise ValueError(f"text_pool: {len(prompts)} prompts for {len(texts)} completions")
    features = np.asarray(embed([f"{p}\n{t}" for p, t in zip(prompts, texts)]), dtype=np.float32)
    if features.ndim != 2 or len(features) != len(texts):
        raise ValueError(f"text_pool: embed must return (n, d) features, got shape {features.shape}")
    obs = features[:, None, :]
    acts = np.zeros((len(texts), 1), dtype=np.int64)
    return SegmentPool(Transitions(obs, acts, obs.copy(), {}), prompts=list(prompts), texts=list(texts))


def hashed_bag_of_words(texts: list[str], dim: int = 256) -> np.ndarray:
    """A model-free text embedding: L2-normalised counts of hashed lower-case words, ``(n, dim)``.

    Good enough to label and fit on a machine without a sentence encoder; pass a real encoder's
    ``embed`` to :func:`text_pool` for serious use.
    """
    import hashlib

    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            # A stable hash (Python's hash() is salted per process).
            out[row, int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)
