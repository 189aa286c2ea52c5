"""Policy optimisation for diverse groups: aggregation rules and MaxMinPPO."""

from egalitarian_rl.algorithms.aggregation import AGGREGATIONS, Aggregation, GroupRewardNormalizer, make_aggregation
from egalitarian_rl.algorithms.maxmin_ppo import MaxMinPPO

__all__ = ["AGGREGATIONS", "Aggregation", "GroupRewardNormalizer", "MaxMinPPO", "make_aggregation"]
