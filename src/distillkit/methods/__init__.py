"""Distillation methods, one file each, all behind the Distiller contract."""

from distillkit.methods.base import Distiller
from distillkit.methods.ce import CrossEntropy
from distillkit.methods.fitnet import FitNet
from distillkit.methods.kd import KD
from distillkit.methods.losses import kd_kl

METHODS = ("ce", "kd", "fitnet")

__all__ = ["KD", "METHODS", "CrossEntropy", "Distiller", "FitNet", "kd_kl"]
