"""Teachers: local white-box models, black-box views with budgets, output caching, and teachers
trained outside distillkit (a model class plus weights, TorchScript, ONNX)."""

from distillkit.teachers.base import BudgetExceededError, Teacher, TeacherOutput
from distillkit.teachers.cache import CachedTeacher
from distillkit.teachers.external import (
    ExternalTeacherSpec,
    is_external_teacher,
    load_external_teacher,
    teacher_file_format,
)
from distillkit.teachers.local import BlackBoxTeacher, LocalTeacher, OpaqueBlackBoxTeacher

__all__ = [
    "BlackBoxTeacher",
    "BudgetExceededError",
    "CachedTeacher",
    "ExternalTeacherSpec",
    "LocalTeacher",
    "OpaqueBlackBoxTeacher",
    "Teacher",
    "TeacherOutput",
    "is_external_teacher",
    "load_external_teacher",
    "teacher_file_format",
]
