"""Plain training with cross-entropy only (the "Student" / "Teacher" rows of the tables)."""

from __future__ import annotations

from relkd.methods.base import Method, MethodContext, register_method


@register_method("ce")
class CE(Method):
    """No distillation term; the engine adds ``ce_weight * CE`` (default 1)."""

    requires_teacher = False

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)

    def forward(self, student, teacher, targets, **extras):
        return {}
