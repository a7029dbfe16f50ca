"""What every dataset reader yields: one image, its mask (or none), and where it came from."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DatasetError(ValueError):
    """Bad input data; the message is one line naming the file and the problem."""


@dataclass
class Sample:
    """One image as read from disk, before preprocessing.

    image  (H, W) or (H, W, C) array in the file's own dtype (uint8, uint16, float32, ...)
    mask   (H, W) uint8 semantic class ids (0 = background), or None for an unlabelled image
    name   unique, stable id within the dataset (e.g. "TCGA-18-5592-01Z-00-DX1", "p05/IMG-0001-00012")
    group  the unit a split must not cut (patient, case, cell line); defaults to the name
    subset "train", "val" or "test" where the distribution fixes it; None where the split decides
    source path of the image file, for error messages and the dataset summary
    """

    name: str
    image: np.ndarray
    mask: np.ndarray | None
    group: str = ""
    subset: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.group:
            self.group = self.name
        if self.image.ndim not in (2, 3):
            raise DatasetError(f"{self.source or self.name}: image must be (H, W) or (H, W, C), got {self.image.shape}")
        if self.mask is not None and self.mask.shape != self.image.shape[:2]:
            raise DatasetError(f"{self.source or self.name}: mask {self.mask.shape} does not match image "
                               f"{self.image.shape[:2]}")
