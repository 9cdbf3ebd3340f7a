"""Optimizer, gradient clipping and learning-rate schedules."""
