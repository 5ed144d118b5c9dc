"""Training engine: one loop for CPU / 1 GPU / N GPUs."""

from relkd.engine.distiller import Distiller
from relkd.engine.teacher import Teacher
from relkd.engine.trainer import evaluate, fit

__all__ = ["Distiller", "Teacher", "evaluate", "fit"]
