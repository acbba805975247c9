"""Plots and tables from run directories."""

from distillkit.report.plots import markdown_table, plot_curves
from distillkit.report.run_report import plot_run_curves, summary_markdown, write_run_report

__all__ = [
    "markdown_table",
    "plot_curves",
    "plot_run_curves",
    "summary_markdown",
    "write_run_report",
]
