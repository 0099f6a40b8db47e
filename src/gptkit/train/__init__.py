"""Pre-training: recipes, optimizers and schedules, the training loop."""

from .recipe import TrainConfig, load_recipe
from .trainer import TrainError, train

__all__ = ["TrainConfig", "load_recipe", "train", "TrainError"]
