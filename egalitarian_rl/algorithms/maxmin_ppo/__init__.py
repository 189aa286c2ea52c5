from egalitarian_rl.algorithms.maxmin_ppo.maxmin_ppo import MaxMinPPO

__all__ = ["MaxMinPPO"]
