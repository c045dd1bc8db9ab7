"""Evaluation during a run: held-out loss and forgetting, greedy generation with its scores,
and multiple-choice accuracy."""
