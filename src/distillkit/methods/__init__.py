"""Distillation methods, one file each, all behind the Distiller contract and the registry."""

from distillkit.methods.base import Distiller
from distillkit.methods.fitnet import FitNet
from distillkit.methods.kd import KD
from distillkit.methods.losses import kd_kl
from distillkit.methods.registry import get_method, list_methods, register_method

__all__ = [
    "KD",
    "Distiller",
    "FitNet",
    "get_method",
    "kd_kl",
    "list_methods",
    "register_method",
]
