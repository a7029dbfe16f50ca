"""A prepared dataset's summary, kept in its Parquet footer: images per subset (and how many have
masks), image sizes, pixel counts per class of the source masks, and what the reader passed over."""
from __future__ import annotations

from typing import Any

import numpy as np

from cssl_ray.data.sample import Sample


class Summary:
    """Images per subset (and how many have masks) and pixel counts per class of the source masks."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.images: dict[str, int] = {}
        self.labelled: dict[str, int] = {}
        self.pixels: dict[str, list[int]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, s: Sample) -> None:
        subset = s.subset or "unassigned"
        self.images[subset] = self.images.get(subset, 0) + 1
        shape = "x".join(str(d) for d in s.image.shape)
        self.sizes[f"{shape} {s.image.dtype}"] = self.sizes.get(f"{shape} {s.image.dtype}", 0) + 1
        if s.mask is not None:
            self.labelled[subset] = self.labelled.get(subset, 0) + 1
            counts = np.bincount(s.mask.ravel(), minlength=self.num_classes)
            total = self.pixels.setdefault(subset, [0] * self.num_classes)
            for k in range(self.num_classes):
                total[k] += int(counts[k])

    def to_dict(self, report: Any = None) -> dict[str, Any]:
        return {"images": self.images, "labelled": self.labelled, "pixels": self.pixels, "sizes": self.sizes,
                "passed_over": dict(report.counts) if report is not None else {},
                "notes": list(report.notes) if report is not None else []}


def pixel_shares(summary: dict[str, Any], subset: str) -> list[float]:
    """Percent of the labelled pixels of ``subset`` per class (empty if it has no masks)."""
    counts = summary.get("pixels", {}).get(subset)
    if not counts or sum(counts) == 0:
        return []
    total = sum(counts)
    return [100.0 * c / total for c in counts]
