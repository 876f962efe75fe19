"""Ignite handlers of ctclassify, one per module, each with ``attach(engine)``."""

from app.training.handlers.early_stopping import EarlyStopping
from app.training.handlers.epoch_seeder import EpochSeeder
from app.training.handlers.resume import ResumeFromCheckpoint
from app.training.handlers.run_recorder import RunRecorder
from app.training.handlers.trainer_checkpoint import AtomicCheckpointSaver, TrainerCheckpointSaver
from app.training.handlers.write_budget import WriteBudget

__all__ = [
    "AtomicCheckpointSaver",
    "EarlyStopping",
    "EpochSeeder",
    "ResumeFromCheckpoint",
    "RunRecorder",
    "TrainerCheckpointSaver",
    "WriteBudget",
]
