"""distillkit: compress deep models and the data they learn from."""

__version__ = "0.1.0"
