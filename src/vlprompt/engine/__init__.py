"""Training, evaluation and checkpoints."""
from vlprompt.engine.checkpoint import CheckpointError, load_prompt, read_prompt_config, save_prompt
from vlprompt.engine.trainer import TrainConfig, TrainData, Trainer, TrainingError, evaluate

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainData",
    "Trainer",
    "TrainingError",
    "evaluate",
    "load_prompt",
    "read_prompt_config",
    "save_prompt",
]
