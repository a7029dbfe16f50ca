"""Tracking: the MLflow store, run records, logged models and progress lines."""
