"""Teachers: local white-box models, black-box views with budgets, and output caching."""

from distillkit.teachers.base import KINDS, BudgetExceededError, Teacher, TeacherOutput, ask_teacher
from distillkit.teachers.cache import CachedTeacher
from distillkit.teachers.local import BlackBoxTeacher, LocalTeacher

__all__ = [
    "KINDS",
    "BlackBoxTeacher",
    "BudgetExceededError",
    "CachedTeacher",
    "LocalTeacher",
    "Teacher",
    "ask_teacher",
    "TeacherOutput",
]
