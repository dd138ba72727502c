"""Noisy Student operator: API models, core planner, drivers."""
