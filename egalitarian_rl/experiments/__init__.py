"""The pipeline: collect -> fit -> train -> evaluate -> report, from one typed config."""

from egalitarian_rl.experiments.config import (
    CollectConfig,
    ConfigError,
    EvaluateConfig,
    ExperimentConfig,
    RewardConfig,
    TrainConfig,
)
from egalitarian_rl.experiments.pipeline import Pipeline

__all__ = ["CollectConfig", "ConfigError", "EvaluateConfig", "ExperimentConfig", "Pipeline", "RewardConfig", "TrainConfig"]
