"""Evaluation on a labelled test set: metrics with confidence intervals, plots, a report."""
