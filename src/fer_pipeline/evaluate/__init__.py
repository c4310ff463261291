"""Evaluate stage: `evaluate_models` (stage.py), metrics, reports and the model registry."""
