"""Experiments: trials, search spaces, Tune, ablations, reports, the demo and the commands."""
