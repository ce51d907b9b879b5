"""Training, evaluation and checkpoints."""
from vlprompt.engine.checkpoint import CheckpointError, load_prompt, read_prompt_config, save_prompt
from vlprompt.engine.trainer import TrainConfig, Trainer, TrainingError, run_training_step

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "load_prompt",
    "read_prompt_config",
    "run_training_step",
    "save_prompt",
]
