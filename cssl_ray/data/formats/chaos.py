"""CHAOS abdominal MRI (T2-SPIR by default, or T1-DUAL in- / opposed-phase): one DICOM per slice.

Layout, searched recursively for ``MR/<pid>/<sequence>/DICOM_anon`` (CT folders are not read):

    Train_Sets/MR/<pid>/T2SPIR/DICOM_anon/IMG-<ssss>-<iiiii>.dcm + .../T2SPIR/Ground/IMG-....png
    Train_Sets/MR/<pid>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm sharing .../T1DUAL/Ground/*.png
    Test_Sets/MR/<pid>/...      no Ground/: mask None, subset "test"

Slices and masks pair by natural sort of both lists (T1-DUAL file names do not match the Ground
names), so their counts must be equal. A patient with Ground/ is subset "train"; one without is
"test", unless it sits under a ``Train_Sets`` folder, which is an incomplete unpack and an error.

image  ``pydicom.dcmread(p).pixel_array``: 12-bit values in the file's dtype, size from the file
mask   8-bit PNG grey codes decoded by ranges (``GREY_RANGES``): (55,70] liver, (110,135] right
       kidney, (175,200] left kidney, (240,255] spleen, anything else background
name   "<pid>/<dicom stem>"; group = pid: split by patient, never by slice (neighbouring slices
       are near-duplicates, so a slice split leaks the test set into training)
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom

from cssl_ray.data.formats import ReadReport, dataset_error, natural_key, read_pil, require_dir
from cssl_ray.data.sample import DatasetError, Sample

CLASSES = ["background", "liver", "right kidney", "left kidney", "spleen"]
GREY_RANGES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))  # (lo, hi] -> class id
SEQUENCES = ("T2SPIR", "T1DUAL")
PHASES = ("InPhase", "OutPhase")


def summary_hint() -> str:
    return ("download CHAOS_Train_Sets.zip (and CHAOS_Test_Sets.zip) from https://chaos.grand-challenge.org/Download/ "
            "(Zenodo record 3431873) and unzip under the root so that "
            "Train_Sets/MR/<pid>/T2SPIR/DICOM_anon/*.dcm and .../T2SPIR/Ground/*.png exist; "
            "configs/nuclei.yaml (the nuclei set) runs with no download")


def decode_grey(grey: np.ndarray) -> np.ndarray:
    """(H, W) CHAOS Ground grey codes -> (H, W) uint8 class ids (``GREY_RANGES``, else 0)."""
    mask = np.zeros(grey.shape, dtype=np.uint8)
    for lo, hi, class_id in GREY_RANGES:
        mask[(grey > lo) & (grey <= hi)] = class_id
    return mask


def read(root: str | Path, report: ReadReport | None = None, sequence: str = "T2SPIR",
         phase: str = "InPhase") -> Iterator[Sample]:
    """Every MR slice of ``sequence`` (T1DUAL: of ``phase``) under ``root``, patient by patient.

    ``report`` is accepted for a uniform API; CHAOS has no documented absences to count."""
    if sequence not in SEQUENCES:
        raise DatasetError(f"chaos: unknown sequence {sequence!r}; allowed: {', '.join(SEQUENCES)}")
    if phase not in PHASES:
        raise DatasetError(f"chaos: unknown phase {phase!r}; allowed: {', '.join(PHASES)}")
    root = require_dir(root, "CHAOS", summary_hint())
    patients: dict[str, Path] = {}
    for dicom_dir in root.rglob("DICOM_anon"):
        seq_dir = dicom_dir.parent
        if not dicom_dir.is_dir() or seq_dir.name != sequence or seq_dir.parent.parent.name != "MR":
            continue
        pid = seq_dir.parent.name
        if pid in patients:
            raise dataset_error(seq_dir.parent, f"patient {pid} found twice (also {patients[pid]}); keep one copy")
        patients[pid] = seq_dir.parent
    if not patients:
        raise DatasetError(f"{root}: no CHAOS slices found (searched **/MR/<pid>/{sequence}/DICOM_anon); "
                           f"{summary_hint()}")
    slices = []  # (pid, dicom, png or None, subset)
    for pid in sorted(patients, key=natural_key):
        slices += _patient_slices(root, pid, patients[pid] / sequence, sequence, phase)
    return _load(slices)


def _patient_slices(root: Path, pid: str, seq_dir: Path, sequence: str,
                    phase: str) -> list[tuple[str, Path, Path | None, str]]:
    dicom_dir = seq_dir / "DICOM_anon"
    if sequence == "T1DUAL":
        dicom_dir = dicom_dir / phase  # in- and opposed-phase series share one Ground/
    dicoms = sorted((p for p in dicom_dir.glob("*") if p.suffix.lower() == ".dcm"), key=lambda p: natural_key(p.name))
    if not dicoms:
        raise dataset_error(dicom_dir, "no *.dcm slices in this patient folder")
    ground = seq_dir / "Ground"
    if not ground.is_dir():
        if "Train_Sets" in seq_dir.relative_to(root).parts or root.name == "Train_Sets":
            raise dataset_error(ground, "missing: a training patient needs its Ground/ masks (incomplete unpack?)")
        return [(pid, d, None, "test") for d in dicoms]
    pngs = sorted((p for p in ground.glob("*") if p.suffix.lower() == ".png"), key=lambda p: natural_key(p.name))
    if len(pngs) != len(dicoms):
        raise dataset_error(seq_dir, f"{len(dicoms)} slices in {dicom_dir.relative_to(seq_dir)} but "
                                     f"{len(pngs)} masks in Ground; they pair one to one")
    return [(pid, d, g, "train") for d, g in zip(dicoms, pngs)]


def _load(slices: list[tuple[str, Path, Path | None, str]]) -> Iterator[Sample]:
    for pid, dicom, png, subset in slices:
        try:
            image = pydicom.dcmread(dicom).pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom raises InvalidDicomError, ValueError, EOFError, ...
            raise dataset_error(dicom, "unreadable DICOM", exc) from exc
        if image.ndim != 2:
            raise dataset_error(dicom, f"expected one 2D slice, got pixel array of shape {image.shape}")
        mask = None
        if png is not None:
            grey = read_pil(png, "L")
            if grey.shape != image.shape:
                raise dataset_error(png, f"mask {grey.shape} does not match its slice {dicom} {image.shape}")
            mask = decode_grey(grey)
        yield Sample(name=f"{pid}/{dicom.stem}", image=image, mask=mask, group=pid, subset=subset,
                     source=str(dicom))
