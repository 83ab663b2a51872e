"""GACD: guided adversarial contrastive distillation, the method (no Ray, Optuna or MLflow)."""

from gacd.config import Config, ConfigError

__all__ = ["Config", "ConfigError"]
