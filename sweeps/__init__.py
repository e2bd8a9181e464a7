"""Sweep tooling: learning-rate scaling law (grid, fit, predict), result collection and comparison."""
