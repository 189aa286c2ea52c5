"""Reward networks over transitions: K reward members evaluated in one batched call.

A :class:`RewardMixture` holds ``K`` independent MLPs ``r_k(s, a, s')`` (the
inputs chosen with ``use_state`` / ``use_action`` / ``use_next_state``, as in
imitation's ``BasicRewardNet``). Their weights are stacked into tensors with a
leading member axis, so all K members are evaluated by one matmul per layer
(the first layer is one wide matmul over the shared input, later layers one
``baddbmm``): a forward costs one call whatever K is, and the output is
``(batch, K)``. ``K = 1`` is the ordinary single reward of standard RLHF.

Inputs are preprocessed like stable-baselines3's ``preprocess_obs``: ``Box``
spaces are flattened to float, ``Discrete`` spaces are one-hot encoded,
``MultiBinary`` is cast to float. Continuous input columns can be
standardised with statistics fitted on data (:meth:`RewardMixture.fit_input_normalization`);
the statistics are buffers of the module, so they are saved with it and
applied wherever the reward is used (training, the reward VecEnv wrapper).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from egalitarian_rl.io import write_atomic
from egalitarian_rl.preferences.segments import Transitions

_FORMAT = "egalitarian_rl.RewardMixture"
_FORMAT_VERSION = 1

ArrayLike = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------- spaces


def space_to_json(space: gym.Space) -> dict[str, Any]:
    """Describe a ``Box``, ``Discrete`` or ``MultiBinary`` space as JSON-serialisable data.

    Infinite bounds are written as the strings ``"inf"`` / ``"-inf"`` (strict JSON has no infinity).
    """
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "low": _bound_to_json(space.low),
            "high": _bound_to_json(space.high),
            "dtype": np.dtype(space.dtype).name,
        }
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.MultiBinary):
        return {"type": "MultiBinary", "n": np.asarray(space.n).tolist()}
    raise TypeError(f"reward networks support Box, Discrete and MultiBinary spaces, got {space}")


def space_from_json(data: dict[str, Any]) -> gym.Space:
    """Inverse of :func:`space_to_json`."""
    kind = data.get("type")
    if kind == "Box":
        shape, dtype = tuple(data["shape"]), np.dtype(data.get("dtype", "float32"))
        low = _bound_from_json(data["low"], shape, dtype)
        high = _bound_from_json(data["high"], shape, dtype)
        return gym.spaces.Box(low, high, shape=shape, dtype=dtype)
    if kind == "Discrete":
        return gym.spaces.Discrete(int(data["n"]), start=int(data.get("start", 0)))
    if kind == "MultiBinary":
        return gym.spaces.MultiBinary(data["n"])
    raise ValueError(f"unknown space description {data!r}")


def _bound_to_json(bound: np.ndarray) -> Any:
    values = np.asarray(bound, dtype=np.float64)
    # A constant bound (the usual case) is stored as one number, not a list per dimension.
    flat = values.reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return _float_to_json(float(flat[0]))
    return [_float_to_json(float(v)) for v in flat]


def _float_to_json(value: float) -> float | str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _bound_from_json(data: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    # Built in the space's own dtype (Box warns when float64 bounds are cast down).
    if isinstance(data, list):
        return np.array([float(v) for v in data], dtype=dtype).reshape(shape)
    return np.full(shape, float(data), dtype=dtype)


def spaces_from_dataset(dataset: Any) -> tuple[gym.Space, gym.Space]:
    """Observation and action spaces implied by a :class:`~egalitarian_rl.preferences.PreferenceDataset`.

    Observations become an unbounded ``Box`` of the data's observation shape
    (one-hot observations stay a ``Box``: they are already encoded). Actions
    are ``Discrete(metadata["n_actions"])`` when the metadata records an
    action count, otherwise an unbounded ``Box`` of the data's action shape.

    :param dataset: the comparisons; segments have leading shape ``(N, L)``.
    """
    # A pooled dataset (PooledPreferenceDataset) would copy every comparison's segments out of
    # its pool to answer ``segments_a``: read the pool's shapes instead.
    segments = getattr(dataset, "segment_pool", None)
    segments = dataset.segments_a if segments is None else segments
    obs_shape = tuple(segments.obs.shape[2:])
    observation_space = gym.spaces.Box(-np.inf, np.inf, shape=obs_shape, dtype=np.float32)
    n_actions = (dataset.metadata or {}).get("n_actions")
    if n_actions is not None:
        return observation_space, gym.spaces.Discrete(int(n_actions))
    act_shape = tuple(segments.acts.shape[2:])
    return observation_space, gym.spaces.Box(-np.inf, np.inf, shape=act_shape, dtype=np.float32)


def _encoded_size(space: gym.Space) -> int:
    if isinstance(space, gym.spaces.Box):
        return int(np.prod(space.shape))
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    if isinstance(space, gym.spaces.MultiBinary):
        return int(np.prod(space.n))
    raise TypeError(f"reward networks support Box, Discrete and MultiBinary spaces, got {space}")


def _event_ndim(space: gym.Space) -> int:
    """How many trailing axes one sample of ``space`` has (0 for Discrete)."""
    if isinstance(space, gym.spaces.Discrete):
        return 0
    if isinstance(space, gym.spaces.MultiBinary):
        return len(np.asarray(space.n).reshape(-1))
    return len(space.shape)


def _encode(x: ArrayLike, space: gym.Space, device: torch.device) -> torch.Tensor:
    """Encode samples of ``space`` with any leading shape ``(...)`` as float ``(..., encoded_size)``."""
    t = torch.as_tensor(x, device=device)
    if isinstance(space, gym.spaces.Discrete):
        index = t.long() - int(space.start)
        if index.numel() and (index.min() < 0 or index.max() >= space.n):
            raise ValueError(f"discrete value outside {space}: {t.reshape(-1)[:5].tolist()}")
        return nn.functional.one_hot(index, int(space.n)).to(torch.float32)
    event = _event_ndim(space)
    lead = t.shape[: t.dim() - event]
    return t.reshape(*lead, -1).to(torch.float32)


# ----------------------------------------------------------------------------- module


class RewardMixture(nn.Module):
    """``K`` reward MLPs over transitions, evaluated together: ``(batch, K)`` per call.

    :param observation_space: the env's observation space (Box, Discrete or MultiBinary).
    :param action_space: the env's action space (Box, Discrete or MultiBinary).
    :param n_members: ``K``, the number of reward functions (1 = a single reward).
    :param use_state: feed the observation before the step.
    :param use_action: feed the action.
    :param use_next_state: feed the observation after the step.
    :param hidden_sizes: widths of the hidden layers of every member (ReLU between layers).
    """

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        n_members: int,
        use_state: bool = True,
        use_action: bool = True,
        use_next_state: bool = False,
        hidden_sizes: Sequence[int] = (64, 64),
    ) -> None:
        super().__init__()
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        if not (use_state or use_action or use_next_state):
            raise ValueError("a reward network needs at least one of use_state, use_action, use_next_state")
        if any(int(h) < 1 for h in hidden_sizes):
            raise ValueError(f"hidden sizes must be >= 1, got {list(hidden_sizes)}")
        self.observation_space = observation_space
        self.action_space = action_space
        self.use_state = use_state
        self.use_action = use_action
        self.use_next_state = use_next_state
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self._n_members = int(n_members)

        # Which input columns come from continuous (Box) spaces: only those are standardised,
        # one-hot columns keep their 0/1 values.
        parts: list[tuple[int, bool]] = []
        obs_size, act_size = _encoded_size(observation_space), _encoded_size(action_space)
        obs_box = isinstance(observation_space, gym.spaces.Box)
        act_box = isinstance(action_space, gym.spaces.Box)
        if use_state:
            parts.append((obs_size, obs_box))
        if use_action:
            parts.append((act_size, act_box))
        if use_next_state:
            parts.append((obs_size, obs_box))
        self.input_dim = sum(size for size, _ in parts)
        continuous = torch.cat([torch.full((size,), box, dtype=torch.bool) for size, box in parts])

        sizes = [self.input_dim, *self.hidden_sizes, 1]
        # weights[l]: (K, fan_in, fan_out), biases[l]: (K, fan_out). Stacked per member so that
        # every layer is one batched matmul over all members.
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(n_members, i, o)) for i, o in itertools.pairwise(sizes)])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(n_members, o)) for o in sizes[1:]])
        self.register_buffer("input_shift", torch.zeros(self.input_dim))
        self.register_buffer("input_scale", torch.ones(self.input_dim))
        self.register_buffer("continuous_inputs", continuous)
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    @property
    def n_members(self) -> int:
        """``K``, the number of reward functions."""
        return self._n_members

    def reset_parameters(self, members: Sequence[int] | None = None, generator: torch.Generator | None = None) -> None:
        """(Re-)initialise members like ``nn.Linear`` does (uniform in ``±1/sqrt(fan_in)``).

        :param members: which members to reset; all by default.
        :param generator: torch RNG to draw from (for seeded re-initialisation).
        """
        index = list(range(self.n_members)) if members is None else list(members)
        with torch.no_grad():
            for weight, bias in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(weight.shape[1])
                for k in index:
                    weight[k].uniform_(-bound, bound, generator=generator)
                    bias[k].uniform_(-bound, bound, generator=generator)

    def copy_member(self, source: int, targets: Sequence[int]) -> None:
        """Copy member ``source``'s parameters into members ``targets`` (for warm starts)."""
        with torch.no_grad():
            for tensor in [*self.weights, *self.biases]:
                tensor[list(targets)] = tensor[source].clone()

    def fit_input_normalization(self, features: torch.Tensor) -> None:
        """Standardise continuous input columns with the mean and std of ``features``.

        Call before training (it changes what the network computes).

        :param features: raw encoded inputs ``(..., input_dim)`` from :meth:`raw_features`.
        """
        flat = features.reshape(-1, self.input_dim).to(torch.float64)
        self.set_input_normalization(flat.mean(0), flat.std(0, unbiased=False))

    def set_input_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise continuous input columns with a given ``mean`` and ``std``, each ``(input_dim,)``.

        For statistics accumulated elsewhere (e.g. streamed over chunks of a large dataset);
        one-hot columns keep shift 0 and scale 1, constant columns (std <= 1e-8) scale 1.
        """
        mean, std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)
        if mean.shape != (self.input_dim,) or std.shape != (self.input_dim,):
            raise ValueError(f"mean and std must be ({self.input_dim},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        keep = self.continuous_inputs
        with torch.no_grad():
            self.input_shift.copy_(torch.where(keep, mean, torch.zeros_like(mean)).float())
            # Constant columns get scale 1 so they do not blow up.
            self.input_scale.copy_(torch.where(keep & (std > 1e-8), std, torch.ones_like(std)).float())

    # --------------------------------------------------------------- encoding
    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def raw_features(self, obs: ArrayLike, acts: ArrayLike, next_obs: ArrayLike) -> torch.Tensor:
        """Encode transitions with any leading shape ``(...)`` as ``(..., input_dim)`` float32.

        Unused inputs (per the ``use_*`` flags) may be ``None``. No normalisation is applied.
        """
        device = self.device
        parts = []
        if self.use_state:
            parts.append(_encode(obs, self.observation_space, device))
        if self.use_action:
            parts.append(_encode(acts, self.action_space, device))
        if self.use_next_state:
            parts.append(_encode(next_obs, self.observation_space, device))
        lead = parts[0].shape[:-1]
        if any(p.shape[:-1] != lead for p in parts):
            raise ValueError(f"obs, acts and next_obs have different leading shapes: {[tuple(p.shape[:-1]) for p in parts]}")
        return torch.cat(parts, dim=-1)

    def features(self, obs: ArrayLike, acts: ArrayLike, next_obs: ArrayLike) -> torch.Tensor:
        """Network input ``(..., input_dim)``: encoded and normalised transitions."""
        return (self.raw_features(obs, acts, next_obs) - self.input_shift) / self.input_scale

    def segment_features(self, segments: Transitions) -> torch.Tensor:
        """Network input for segments of leading shape ``(n, L)``: ``(n, L, input_dim)``."""
        return self.features(segments.obs, segments.acts, segments.next_obs)

    # ---------------------------------------------------------------- forward
    def _member_params(self, members: Sequence[int] | torch.Tensor | slice | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Weights and biases of the selected members (all when ``None``); indexing keeps gradients.

        A ``slice`` selects a contiguous range of members as views (no copy of the parameters).
        """
        if members is None:
            return list(self.weights), list(self.biases)
        if isinstance(members, slice):
            return [w[members] for w in self.weights], [b[members] for b in self.biases]
        index = torch.as_tensor(members, dtype=torch.long, device=self.device)
        return [w[index] for w in self.weights], [b[index] for b in self.biases]

    def hidden(self, features: torch.Tensor, members: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden layer (after ReLU) of the members, ``(M, B, h_last)`` for features ``(B, input_dim)``.

        :param members: which members (``M`` of them); all ``K`` by default.
        """
        return self._layers(features, members, last=False)

    def _layers(self, x: torch.Tensor, members: Sequence[int] | torch.Tensor | None = None, last: bool = True) -> torch.Tensor:
        """Run members on a shared input ``x`` ``(B, input_dim)``: ``(M, B, 1)``, or the last hidden layer."""
        weights, biases = self._member_params(members)
        m, batch, n_layers = weights[0].shape[0], x.shape[0], len(weights)
        if not last and n_layers == 1:  # no hidden layer: the "last hidden layer" is the input itself
            return x.unsqueeze(0).expand(m, -1, -1)
        # All members read the same input: one (B, D) @ (D, M*h) matmul instead of M small ones.
        h = torch.addmm(biases[0].reshape(1, -1), x, weights[0].permute(1, 0, 2).reshape(self.input_dim, -1))
        h = h.view(batch, m, -1).transpose(0, 1)  # (M, B, h1)
        for index in range(1, n_layers):
            h = torch.relu(h)
            if index == n_layers - 1 and not last:
                return h
            h = torch.baddbmm(biases[index].unsqueeze(1), h, weights[index])
        return h

    def forward_grouped(self, features: torch.Tensor, members: Sequence[int] | torch.Tensor | slice | None = None) -> torch.Tensor:
        """Each member on its *own* inputs: features ``(M, B, input_dim)`` -> rewards ``(M, B)``.

        Used for training members on different comparisons (hard EM): every
        member computes only on its own rows, still in one batched call.

        :param features: prepared inputs, row ``m`` for member ``members[m]``.
        :param members: ``(M,)`` member indices, or a ``slice`` of members (views, cheapest);
            ``None`` means all ``K`` in order (``M = K``).
        """
        weights, biases = self._member_params(members)
        h = features
        for index, (weight, bias) in enumerate(zip(weights, biases)):
            if index > 0:
                h = torch.relu(h)
            h = torch.baddbmm(bias.unsqueeze(1), h, weight)
        return h.squeeze(-1)

    def forward_features(self, features: torch.Tensor, members: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Rewards of the members (all by default) for prepared inputs ``(..., input_dim)`` -> ``(..., M)``."""
        lead = features.shape[:-1]
        out = self._layers(features.reshape(-1, self.input_dim), members)  # (M, B, 1)
        return out.squeeze(-1).transpose(0, 1).reshape(*lead, out.shape[0])

    def forward(self, obs: ArrayLike, acts: ArrayLike, next_obs: ArrayLike) -> torch.Tensor:
        """Step rewards of all members, ``(batch, K)`` (any leading shape ``(...)`` -> ``(..., K)``).

        :param obs: observations ``(batch, *obs_shape)`` (``(batch,)`` for Discrete).
        :param acts: actions ``(batch, *act_shape)`` (``(batch,)`` for Discrete).
        :param next_obs: next observations, like ``obs``.
        """
        return self.forward_features(self.features(obs, acts, next_obs))

    @torch.inference_mode()
    def predict_rewards(self, obs: np.ndarray, acts: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
        """Numpy in, numpy out, no autograd: ``(batch, K)`` float32 step rewards (the per-env-step path)."""
        return self.forward(obs, acts, next_obs).cpu().numpy()

    def returns_from_features(
        self, features: torch.Tensor, discount: float = 1.0, members: Sequence[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Segment returns ``(n, M)`` from prepared segment inputs ``(n, L, input_dim)``.

        :param discount: step ``t`` of a segment is weighted ``discount ** t``.
        :param members: which members (all ``K`` by default).
        """
        rewards = self.forward_features(features, members)  # (n, L, M)
        if discount == 1.0:
            return rewards.sum(dim=1)
        weights = discount ** torch.arange(rewards.shape[1], dtype=rewards.dtype, device=rewards.device)
        return torch.einsum("nlk,l->nk", rewards, weights)

    def segment_returns(self, segments: Transitions, discount: float = 1.0) -> torch.Tensor:
        """Every member's (discounted) return of each segment, ``(n, K)``, differentiable.

        :param segments: transitions with leading shape ``(n, L)``.
        :param discount: step ``t`` of a segment is weighted ``discount ** t``.
        """
        return self.returns_from_features(self.segment_features(segments), discount)

    # ---------------------------------------------------------------- storage
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (spaces described as data)."""
        return {
            "observation_space": space_to_json(self.observation_space),
            "action_space": space_to_json(self.action_space),
            "n_members": self.n_members,
            "use_state": self.use_state,
            "use_action": self.use_action,
            "use_next_state": self.use_next_state,
            "hidden_sizes": list(self.hidden_sizes),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RewardMixture:
        """A freshly initialised mixture built from :meth:`config` output."""
        return cls(
            space_from_json(config["observation_space"]),
            space_from_json(config["action_space"]),
            int(config["n_members"]),
            use_state=bool(config["use_state"]),
            use_action=bool(config["use_action"]),
            use_next_state=bool(config["use_next_state"]),
            hidden_sizes=tuple(config["hidden_sizes"]),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write tensors and JSON config to one safetensors file, atomically (temp file + rename).

        The config is stored in the safetensors header's metadata, so loading
        never unpickles anything.
        """
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        metadata = {"format": _FORMAT, "format_version": str(_FORMAT_VERSION), "config": json.dumps(self.config())}
        data = safetensors_save(tensors, metadata=metadata)
        return write_atomic(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> RewardMixture:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reward file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved RewardMixture (format {metadata.get('format')!r})")
        if metadata.get("format_version") != str(_FORMAT_VERSION):
            raise ValueError(f"{path}: unsupported RewardMixture format version {metadata.get('format_version')!r}")
        reward = cls.from_config(json.loads(metadata["config"])).to(device)
        reward.load_state_dict(tensors)
        return reward

    def extra_repr(self) -> str:
        inputs = [name for name, on in (("s", self.use_state), ("a", self.use_action), ("s'", self.use_next_state)) if on]
        return f"n_members={self.n_members}, inputs=({', '.join(inputs)}), input_dim={self.input_dim}, hidden={list(self.hidden_sizes)}"
