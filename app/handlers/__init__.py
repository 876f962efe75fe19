"""Ignite handlers of ctclassify, one per module, each with ``attach(engine)``."""

from app.handlers.early_stopping import EarlyStopping
from app.handlers.epoch_seeder import EpochSeeder
from app.handlers.resume import ResumeFromCheckpoint
from app.handlers.run_recorder import RunRecorder
from app.handlers.trainer_checkpoint import AtomicCheckpointSaver, TrainerCheckpointSaver

__all__ = [
    "AtomicCheckpointSaver",
    "EarlyStopping",
    "EpochSeeder",
    "ResumeFromCheckpoint",
    "RunRecorder",
    "TrainerCheckpointSaver",
]
