"""Meta-training: optimizee tasks, the truncated-BPTT trainer with the paper's tricks, evaluation."""

from .cli_support import train_to_zoo
from .data import load_dataset, load_digits, load_mnist, read_idx
from .evaluate import EvalResult, baseline, evaluate, run_seeds, sqrt2_grid, tune_lr, tuning_score
from .tasks import (
                    CNNTask,
                    MLPTask,
                    ModuleTask,
                    QuadraticTask,
                    SinLSTMTask,
                    Task,
                    build_task,
                    convex_term,
                    preset_spec,
)
from .trainer import MetaTrainResult, Objective, TrainConfig, meta_train, paper_recipe

__all__ = [
    "CNNTask", "EvalResult", "MLPTask", "MetaTrainResult", "ModuleTask", "Objective",
    "QuadraticTask", "SinLSTMTask", "Task", "TrainConfig", "baseline", "build_task",
    "convex_term", "evaluate", "load_dataset", "load_digits", "load_mnist", "meta_train",
    "paper_recipe", "preset_spec", "read_idx", "run_seeds", "sqrt2_grid", "train_to_zoo",
    "tune_lr", "tuning_score",
]
