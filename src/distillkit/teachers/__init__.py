"""Teachers: local white-box models, black-box views with budgets, output caching, and teachers
trained outside distillkit (a model class plus weights, TorchScript, ONNX)."""

from distillkit.teachers.base import KINDS, BudgetExceededError, Teacher, TeacherOutput, ask_teacher
from distillkit.teachers.cache import CachedTeacher
from distillkit.teachers.external import (
    ExternalTeacherSpec,
    is_external_teacher,
    load_external_teacher,
    load_state_dict_file,
    teacher_file_format,
)
from distillkit.teachers.local import (
    BlackBoxTeacher,
    LocalTeacher,
    OpaqueBlackBoxTeacher,
    OpaqueModel,
)

__all__ = [
    "KINDS",
    "BlackBoxTeacher",
    "BudgetExceededError",
    "CachedTeacher",
    "ExternalTeacherSpec",
    "LocalTeacher",
    "OpaqueBlackBoxTeacher",
    "OpaqueModel",
    "Teacher",
    "ask_teacher",
    "is_external_teacher",
    "load_external_teacher",
    "load_state_dict_file",
    "teacher_file_format",
    "TeacherOutput",
]
