"""Datasets and splits: procedural ``synthetic`` data and seeded D_L / D_U / val / test splits."""
from __future__ import annotations

from cssl_ray.data.splits import Split, labelled_size, make_split, read_split, write_split
from cssl_ray.data.synthetic import SYNTHETIC_CLASS_NAMES, class_names, make_synthetic

__all__ = [
    "SYNTHETIC_CLASS_NAMES",
    "Split",
    "class_names",
    "labelled_size",
    "make_split",
    "make_synthetic",
    "read_split",
    "write_split",
]
