"""The rounds' one-line warnings (``RunState.check_coverage`` / ``check_patches`` log them and keep them in
``RunState.warnings``, which tracking turns into a tag and the report into a note): a class of D_U whose
pseudo-labels are (almost) gone at round 1, and an L_CL batch well under ``patches.batch_size``."""
from __future__ import annotations

import math

from cssl_ray.config import Config

LOW_COVERAGE = 0.01  # a class whose pseudo-label coverage is under this at round 1 gets a warning


def coverage_warnings(cfg: Config, stats: dict[str, float], class_names: list[str]) -> list[str]:
    """Round 1's line for every class of D_U whose pseudo-labels are (almost) gone: under 1% coverage, or
    no pixel predicted as it at all. The line names the class, its coverage, the model's median
    confidence on it and what to change."""
    lines: list[str] = []
    p = cfg.pseudo
    for name in class_names:
        share = stats.get(f"pseudo_coverage/{name}", float("nan"))
        conf = stats.get(f"confidence/{name}", float("nan"))
        if f"pseudo_coverage/{name}" not in stats:
            continue
        if math.isnan(share):
            line = (f"round 1: no pixel of D_U is predicted as {name!r}, so it has no pseudo-label, no "
                    f"unlabelled patch and no L_CR target: stage A does not find it (raise train.stage_a_steps, "
                    f"or label more images of it)")
        elif share < LOW_COVERAGE:
            fix = ("set pseudo.class_fraction (e.g. 0.5: each image's most confident half of its "
                   f"{name} pixels, down to pseudo.floor {p.floor})" if p.class_fraction == 0 else
                   f"lower pseudo.floor (now {p.floor}) or raise pseudo.class_fraction (now {p.class_fraction})")
            line = (f"round 1: class {name!r} has {100 * share:.3g}% pseudo-label coverage at threshold "
                    f"{p.threshold} (median confidence {conf:.2f} on its pixels): {fix}, or raise "
                    f"train.stage_a_steps (an unconverged stage A is uncalibrated)")
        else:
            continue
        lines.append(line)
    return lines


def patches_warning(cfg: Config, round_: int, stats: dict[str, float]) -> str | None:
    """The line when L_CL's realised contrastive batch (``patches_per_step``) is under 80% of
    ``patches.batch_size`` (the steps' images hold too few valid windows); None otherwise."""
    pt = cfg.patches
    realised = stats.get("patches_per_step", float("nan"))
    if not cfg.train.use_cl or math.isnan(realised) or realised >= 0.8 * pt.batch_size:
        return None
    return (f"round {round_}: L_CL's batch held {realised:.0f} patches per step, under 80% of "
            f"patches.batch_size {pt.batch_size}: the step's images give too few windows of >= "
            f"patches.min_pixels {pt.min_pixels} class pixels (raise patches.per_image, now {pt.per_image}, "
            f"or consistency.batch_size; lower patches.size or min_pixels; or cover more pixels: "
            f"pseudo.class_fraction)")
