"""Evaluation: every policy scored by every user group's *true* return.

Knows nothing of how the policies were trained: anything with a
stable-baselines3-style ``predict`` is run in an env wrapped in
:class:`~egalitarian_rl.preferences.MultiUserPreferenceWrapper`::

    returns = {name: evaluate_group_returns(policy, env, n_episodes=50, seed=1000) for name, policy in policies.items()}
    metrics = build_metrics(returns, population.group_names, baseline="rlhf", min_episode_return=0.0)
    print(format_group_table(metrics))
    write_report(metrics, "runs/gridworld")   # metrics.json, report.md, PNG plots
"""

from egalitarian_rl.evaluation.metrics import (
    MethodReturns,
    add_normalized_scores,
    build_metrics,
    check_metrics,
    format_group_table,
    shifted_ratio,
    win_rate,
    win_rate_over_seeds,
)
from egalitarian_rl.evaluation.plots import (
    group_colors,
    method_colors,
    plot_group_returns,
    plot_learning_curves,
    plot_win_rates,
)
from egalitarian_rl.evaluation.report import verdict, write_report
from egalitarian_rl.evaluation.rollout import Predictor, evaluate_group_returns, find_preference_wrapper
from egalitarian_rl.io import save_json_atomic, to_jsonable, write_atomic, write_text_atomic

__all__ = [
    "MethodReturns",
    "Predictor",
    "add_normalized_scores",
    "build_metrics",
    "check_metrics",
    "evaluate_group_returns",
    "find_preference_wrapper",
    "format_group_table",
    "group_colors",
    "method_colors",
    "plot_group_returns",
    "plot_learning_curves",
    "plot_win_rates",
    "save_json_atomic",
    "shifted_ratio",
    "to_jsonable",
    "verdict",
    "win_rate",
    "win_rate_over_seeds",
    "write_atomic",
    "write_report",
    "write_text_atomic",
]
