"""The compression half of distillation: what a model costs (:mod:`relkd.deploy.profile`) and a
student that runs without relkd (:mod:`relkd.deploy.export`: ONNX, int8, self-verified)."""

from relkd.deploy.profile import ModelCost, machine_label, profile_model, profile_run

__all__ = ["ModelCost", "machine_label", "profile_model", "profile_run"]
