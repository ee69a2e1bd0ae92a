"""Evaluation harness (tasks, scoring, metrics, reports). Built out by the evaluation work; the package is
part of the distribution from the start so that its import path is stable."""
