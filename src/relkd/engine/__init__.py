"""Training engine: one loop for CPU / 1 GPU / N GPUs."""

from relkd.engine.distiller import Distiller
from relkd.engine.plan import Plan, make_plan
from relkd.engine.step import StepStats, TrainStep
from relkd.engine.teacher import Teacher
from relkd.engine.trainer import evaluate, fit

__all__ = ["Distiller", "Plan", "StepStats", "Teacher", "TrainStep", "evaluate", "fit", "make_plan"]
