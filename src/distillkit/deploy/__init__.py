"""Deployable output of a run: ONNX / TorchScript export with parity checks, and profiling."""

from .export import (
    FORMATS,
    PARITY_TOL,
    Deployable,
    DeployError,
    ExportReport,
    LoadedModel,
    ParityError,
    export_run,
    load_model,
)
from .profile import ProfileSettings, format_profile, profile_runs

__all__ = [
    "FORMATS",
    "PARITY_TOL",
    "DeployError",
    "Deployable",
    "ExportReport",
    "LoadedModel",
    "ParityError",
    "ProfileSettings",
    "export_run",
    "format_profile",
    "load_model",
    "profile_runs",
]
