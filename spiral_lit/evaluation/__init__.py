"""Evaluation of the test-time scaffolds: held-out metrics, predict, compare, plots and rollout text."""
