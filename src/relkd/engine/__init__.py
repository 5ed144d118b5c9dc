"""Training engine: one loop for CPU / 1 GPU / N GPUs.

Layering inside: ``plan`` / ``step`` / ``teacher`` / ``distiller`` / ``schedule`` (the parts)
<- ``build`` (their assembly) <- ``trainer`` (the loop, ``fit``); see docs/architecture.md.
"""

from relkd.engine.build import build_components, build_method_parts, build_step
from relkd.engine.distiller import Distiller
from relkd.engine.evaluation import evaluate
from relkd.engine.plan import Plan, make_plan
from relkd.engine.step import ForwardOutput, StepStats, TrainStep, forward_loss
from relkd.engine.teacher import CachedTeacher, ReplayTeacher, Teacher, TeacherSource
from relkd.engine.trainer import fit

__all__ = [
    "CachedTeacher",
    "Distiller",
    "ForwardOutput",
    "Plan",
    "ReplayTeacher",
    "StepStats",
    "Teacher",
    "TeacherSource",
    "TrainStep",
    "build_components",
    "build_method_parts",
    "build_step",
    "evaluate",
    "fit",
    "forward_loss",
    "make_plan",
]
