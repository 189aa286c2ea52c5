"""The online preference loop (PEBBLE / imitation's preference comparisons, with identified users).

Each round:

1. **segments** from the current policy (random behaviour before the first policy exists),
   added to the pool with candidate pairs that show at least one new segment;
2. **queries**: every user answers ``queries_per_user`` pairs picked by the query rule
   (disagreement of the last mixture's members, or random);
3. **EM** on every answer so far;
4. **training**: the policy continues (its weights are carried over) on the new mixture.

Users are simulated (:class:`~egalitarian_rl.labelling.simulate.SimulatedCampaign`). Rounds with
real people (new segments added to a campaign's :class:`~egalitarian_rl.labelling.store.AnswerStore`,
waiting for their answers) are not implemented yet. EM is refitted from scratch every round:
:class:`~egalitarian_rl.rewards.EMRewardMixture` has no warm start from a previous mixture yet.

What the loop does not own is passed in: how to build the mixture (``make_mixture``), the
agent (``make_agent``, e.g. :func:`maxmin_agent_factory`) and how to score a policy
(``evaluate``), so the pipeline keeps its own PPO settings, envs and evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from egalitarian_rl.labelling.queries import RULES, make_rule
from egalitarian_rl.labelling.simulate import SimulatedCampaign
from egalitarian_rl.preferences.dataset import PreferenceDataset
from egalitarian_rl.preferences.population import Population
from egalitarian_rl.preferences.segments import concatenate_transitions, rollout_segments
from egalitarian_rl.rewards.metrics import adjusted_rand_index


@dataclass
class OnlineSettings:
    """The ``online:`` section of a pipeline config.

    :param rounds: segment -> query -> EM -> train rounds.
    :param segments_per_round: new segments rolled out per round.
    :param segment_length: steps per segment.
    :param candidates_per_round: new candidate pairs per round (each shows >= 1 new segment).
    :param queries_per_user: answers asked of every user per round (total comparisons =
        ``rounds * n_users * queries_per_user`` minus skips).
    :param timesteps_per_round: PPO steps after each refit.
    :param rule: ``"disagreement"`` or ``"random"``; ``epsilon``: its share of random picks.
    """

    rounds: int = 4
    segments_per_round: int = 300
    segment_length: int = 10
    candidates_per_round: int = 3000
    queries_per_user: int = 6
    timesteps_per_round: int = 10_000
    rule: str = "disagreement"
    epsilon: float = 0.2

    def __post_init__(self) -> None:
        # "online.<key>: ..." so the pipeline's config can name the key (see OnlineConfig).
        if self.rule not in RULES:
            raise ValueError(f"online.rule: must be one of {RULES}, got {self.rule!r}")
        names = ("rounds", "segments_per_round", "segment_length", "candidates_per_round", "queries_per_user", "timesteps_per_round")
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"online.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"online.epsilon: must be in [0, 1], got {self.epsilon}")


@dataclass
class RoundRecord:
    """What one round did and reached.

    :param comparisons: answers so far (all rounds); ``ari`` of the mixture's groups against the
        users' true groups; ``shares`` the mixture's; ``group_returns`` ``{group: mean true return}``
        of the policy after this round's training (empty without ``evaluate``).
    """

    round: int
    comparisons: int
    ari: float
    shares: list[float]
    group_returns: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


#: Builds the round's agent from the new mixture, the answers so far and the previous agent (``None`` in round 0).
AgentFactory = Callable[[Any, PreferenceDataset, Any], Any]


def run_online(
    make_env: Callable[[], gym.Env],
    population: Population,
    n_users: int,
    make_mixture: Callable[[], Any],
    make_agent: AgentFactory,
    settings: OnlineSettings,
    evaluate: Callable[[Any], np.ndarray] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    make_callback: Callable[[], Any] | None = None,
) -> tuple[Any, Any, list[RoundRecord]]:
    """Run the online loop with simulated users; returns the last agent, the last mixture and per-round records.

    :param make_env: a fresh env to roll segments out in (with the ``info`` keys the groups read).
    :param population: the simulated users' groups.
    :param n_users: how many users answer (ids ``0..n_users-1``).
    :param make_mixture: an unfitted :class:`~egalitarian_rl.rewards.EMRewardMixture` (refitted every round).
    :param make_agent: ``(mixture, answers, previous_agent) -> agent`` with SB3's ``learn`` and ``predict``.
    :param settings: the ``online:`` settings.
    :param evaluate: ``agent -> (n_episodes, G)`` true group returns (for the per-round report).
    :param seed: seeds rollouts, picks, answers and EM.
    :param make_callback: a fresh SB3 callback for each round's ``learn`` (e.g. a
        :class:`~egalitarian_rl.evaluation.callbacks.GroupReturnCallback`; its steps count from 0 every round).
    """
    env = make_env()
    campaign: SimulatedCampaign | None = None
    agent, mixture, records = None, None, []
    for round_index in range(settings.rounds):
        start = time.perf_counter()
        behaviour = "random" if agent is None else agent
        segments = rollout_segments(
            env, settings.segments_per_round, settings.segment_length, behaviour, population.info_keys, seed=seed + 7919 * round_index
        )
        if campaign is None:
            # The first pool and its candidates come from the first round's segments.
            empty_pool, no_pairs = segments.index(slice(0, 0)), np.zeros((0, 2), dtype=np.int64)
            rule = make_rule(settings.rule, settings.epsilon)
            campaign = SimulatedCampaign(population, empty_pool, no_pairs, n_users, rule, seed=seed, metadata=_metadata(env, settings))
        campaign.extend(segments, settings.candidates_per_round)
        if mixture is not None:
            campaign.refresh(mixture)
        campaign.ask(settings.queries_per_user)
        answers = campaign.dataset()
        mixture = make_mixture().fit(answers)
        groups = answers.user_groups[answers.positions_of(mixture.users_)]
        agent = make_agent(mixture, answers, agent)
        agent.learn(settings.timesteps_per_round, callback=make_callback() if make_callback is not None else None)
        record = RoundRecord(
            round_index, len(answers), adjusted_rand_index(groups, mixture.assignments_), [float(s) for s in mixture.shares_]
        )
        if evaluate is not None:
            returns = evaluate(agent)
            record.group_returns = dict(zip(population.group_names, returns.mean(axis=0).tolist()))
        record.seconds = time.perf_counter() - start
        records.append(record)
        log(f"online round {round_index}: {record.comparisons} comparisons, ARI {record.ari:.2f}, returns {record.group_returns}")
    env.close()
    return agent, mixture, records


def _metadata(env: gym.Env, settings: OnlineSettings) -> dict[str, Any]:
    spec = getattr(env, "spec", None)
    space = env.action_space
    return {
        "env_id": spec.id if spec is not None else None,
        "n_actions": int(space.n) if isinstance(space, gym.spaces.Discrete) else None,
        "segment_length": settings.segment_length,
        "online": asdict(settings),
    }


def maxmin_agent_factory(
    make_vec_env: Callable[[], Any], ppo_kwargs: dict[str, Any] | None = None, aggregation: Any = "per_sample_min"
) -> AgentFactory:
    """A :data:`AgentFactory` building :class:`~egalitarian_rl.algorithms.MaxMinPPO` on each round's mixture.

    Rewards are z-scored with the statistics of every step of the answered segments (as the
    pipeline does); the policy and value weights carry over from the previous round's agent,
    so training continues rather than restarts. One critic on the aggregated reward: the
    members' order may change between refits, which per-group critics would not survive.

    :param make_vec_env: the training VecEnv (a fresh one per round).
    :param ppo_kwargs: PPO keywords (``n_steps``, ``gamma``, ``seed``, ...).
    :param aggregation: the MaxMin rule (a name or an :class:`~egalitarian_rl.algorithms.aggregation.Aggregation`).
    """
    from egalitarian_rl.algorithms import MaxMinPPO
    from egalitarian_rl.algorithms.aggregation import GroupRewardNormalizer

    def make(mixture: Any, answers: PreferenceDataset, previous: Any) -> Any:
        steps = concatenate_transitions([answers.segments_a.flatten_steps(), answers.segments_b.flatten_steps()])
        normalizer = GroupRewardNormalizer.from_data(mixture.reward.predict_rewards(steps.obs, steps.acts, steps.next_obs))
        agent = MaxMinPPO(
            "MlpPolicy", make_vec_env(), reward_mixture=mixture, aggregation=aggregation, normalizer=normalizer, **(ppo_kwargs or {})
        )
        if previous is not None:
            agent.policy.load_state_dict(previous.policy.state_dict())
        return agent

    return make
