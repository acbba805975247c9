"""Plots and tables from run directories."""

from distillkit.report.plots import markdown_table, plot_curves

__all__ = ["markdown_table", "plot_curves"]
