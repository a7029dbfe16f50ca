"""Evaluation: segmentation metrics, surface distances and the run's figures."""
