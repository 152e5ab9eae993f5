"""Fine-tuning workflow: data preparation, trainer, evaluation, export.

    prepare_dataset / load_records / tokenize_chat   lorakern.train.data
    Trainer, TrainConfig, prepare_model              lorakern.train.trainer
    causal_lm_loss                                   lorakern.train.loss
    evaluate_model, evaluate_loss, generate          lorakern.train.evaluate
    save_trained, merge_and_save, load_for_chat      lorakern.train.export

transformers is imported only inside the functions that need it.
"""

from .data import (IGNORE_INDEX, Collator, DataError, DataIssue, Example, LoadResult, clean_records,
                   format_chat, load_records, pack_examples, prepare_dataset, split_records, tokenize_chat,
                   tokenize_records)
from .evaluate import evaluate_loss, evaluate_model, format_comparison, format_report, generate, task_metrics
from .loss import causal_lm_loss
from .sampler import MixtureSampler, World
from .trainer import TrainConfig, Trainer, TrainingInterrupted, autocast_dtype, cosine_lr, prepare_model

__all__ = [
    "IGNORE_INDEX", "Collator", "DataError", "DataIssue", "Example", "LoadResult", "clean_records",
    "format_chat", "load_records", "pack_examples", "prepare_dataset", "split_records", "tokenize_chat",
    "tokenize_records", "evaluate_loss", "evaluate_model", "format_comparison", "format_report", "generate",
    "task_metrics", "causal_lm_loss", "MixtureSampler", "World", "TrainConfig", "Trainer", "TrainingInterrupted",
    "autocast_dtype", "cosine_lr", "prepare_model",
]
