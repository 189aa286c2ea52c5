"""Causal language models as policies: loading, rollouts and LM PPO on the same aggregation rules."""
