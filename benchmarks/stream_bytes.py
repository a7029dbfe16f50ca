"""Benchmark: bytes the labelling stream moves through Ray's object store per D_U image per round,
the slim stream (now) against the design before it, from the same steps in one run.

    python benchmarks/stream_bytes.py [--geometry monuseg|nuclei|smoke] [--steps 3]
                                      [--json benchmarks/results/stream_bytes.json]

Per step of ``consistency.batch_size`` D_U images, three messages cross the object store:

              the design before (commit 05f11ee and earlier)        now (``cssl_ray.distributed.stream``)
    request   task -> labeller: the images float32 (b, C, H, W),      the D_U positions (b,) and the
              their positions, the hidden masks int64 (b, H, W)      ``DataSource`` (split, store path)
    reply     labeller -> task: the request's images and positions   uint8 pseudo-labels (b, H, W),
              back, uint8 pseudo-labels, counts                      counts (``label_reply``)
    row       task -> trainer: the images float32, the masked        uint8 pseudo-labels, windows
              float32 patches (P, C, s, s), classes int64, counts    (P, 4) int32, counts (``step_row``)

Now each process reads an image from the store (or makes it, synthetic) where it is used: the
labeller to label it, the trainer for L_CR and to cut the patches; both are long-lived and keep
what they read (``data.bundle``'s row cache), so neither read repeats per round while the cache
holds the shard. Those reads are not object-store traffic and are not counted here; the old
design read each image once per round in a task as well.

The messages are built by the pipeline's own functions (now) and as the code before built them
(before), for the same images; a message's size is ``len(pickle.dumps(message, protocol=5))``,
what Ray serialises (numpy buffers travel out of band at their ``nbytes``). The pseudo-labels are
the images' true masks, as a converged labeller would give (every class covered, so every window
is drawn: the patch count a real round approaches). Images: synthetic, at the geometry of
``--geometry``: ``monuseg`` (tune_spaces/monuseg.yaml: RGB 512 x 512, 2 classes, 102 windows of
64 px per image, 8 images a step), ``nuclei`` (configs/nuclei.yaml: 256 x 256 grey, 3 classes, 24
windows of 32 px, 4 a step) or ``smoke``. The labeller's model is tiny: a reply's size does not
depend on it. Target: >= 10x fewer bytes per image.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cssl_ray.config import Config, from_dict
from cssl_ray.data.bundle import DataSource
from cssl_ray.data.splits import Split
from cssl_ray.data.synthetic import class_names
from cssl_ray.distributed.stream import label_reply, step_row
from cssl_ray.models import create_model
from cssl_ray.run.plan import image_patches

GEOMETRIES: dict[str, dict[str, Any]] = {
    "monuseg": {"data": {"num_classes": 2, "in_channels": 3, "image_size": [512, 512]},
                "patches": {"size": 64, "min_pixels": 25, "per_image": 102, "batch_size": 816},
                "consistency": {"batch_size": 8}},
    "nuclei": {"data": {"num_classes": 3, "in_channels": 1, "image_size": [256, 256]},
               "patches": {"size": 32, "min_pixels": 4, "per_image": 24, "batch_size": 96},
               "consistency": {"batch_size": 4}},
    "smoke": {"data": {"num_classes": 4, "in_channels": 1, "image_size": [32, 32]},
              "patches": {"size": 16, "min_pixels": 10, "per_image": 6, "batch_size": 24},
              "consistency": {"batch_size": 4}},
}
TINY_MODEL = {"base_channels": 4, "depth": 2, "embed_dim": 16, "proj_hidden": 16}


def size(message: Any) -> int:
    return len(pickle.dumps(message, protocol=5))


def old_messages(cfg: Config, index: np.ndarray, images: torch.Tensor, masks: torch.Tensor,
                 reply: dict[str, np.ndarray], round_: int) -> dict[str, int]:
    """The three messages of one step as the design before the slim stream built them."""
    request = {"image": images.numpy(), "index": index, "hidden_mask": masks.numpy()}
    back = {"image": images.numpy(), "index": index, **reply}  # the labeller returned the batch it got
    patches, classes = image_patches(cfg, images, masks, index.tolist(), round_, labelled=False)
    row = {"step": np.zeros(1, np.int64), "image": images.numpy()[None], "patch": patches.numpy()[None],
           "patch_class": classes.numpy()[None], **{k: np.asarray(v)[:1] for k, v in reply.items() if k != "pseudo"}}
    return {"request": size(request), "reply": size(back), "row": size(row), "patches": int(classes.numel())}


def new_messages(cfg: Config, index: np.ndarray, source: DataSource, reply: dict[str, np.ndarray],
                 round_: int) -> dict[str, int]:
    """The three messages of one step as ``cssl_ray.distributed.stream`` builds them now."""
    row = step_row(cfg, 0, index, reply, round_)
    patches = int((row["window"][0][:, 0] >= 0).sum())
    return {"request": size({"index": index, "source": source}), "reply": size(reply), "row": size(row),
            "patches": patches}


def measure(geometry: str, steps: int) -> dict[str, Any]:
    raw = {**GEOMETRIES[geometry], "model": TINY_MODEL, "train": {"seed": 0}}
    cfg = from_dict(raw)
    d, b = cfg.data, cfg.consistency.batch_size
    n = steps * b
    source = DataSource(d, None, Split([], list(range(n)), [], []), class_names(d.num_classes))
    model = create_model(cfg.model, d.in_channels, d.num_classes).eval()
    totals = {side: dict.fromkeys(("request", "reply", "row", "patches"), 0) for side in ("before", "now")}
    for k in range(steps):
        index = np.arange(k * b, (k + 1) * b, dtype=np.int64)
        images, masks = source.take("unlabelled", index)
        reply = label_reply(cfg, model, images, masks, version=1)
        reply["pseudo"] = masks.numpy().astype(reply["pseudo"].dtype)  # a converged labeller's labels
        for side, got in (("before", old_messages(cfg, index, images, masks, reply, 1)),
                          ("now", new_messages(cfg, index, source, reply, 1))):
            for key, v in got.items():
                totals[side][key] += v
    out: dict[str, Any] = {"geometry": geometry, "steps": steps, "images": n, "config": raw}
    for side, t in totals.items():
        out[side] = {**{f"{key}_bytes_per_image": t[key] / n for key in ("request", "reply", "row")},
                     "bytes_per_image": (t["request"] + t["reply"] + t["row"]) / n, "patches_per_image": t["patches"] / n}
    out["ratio"] = out["before"]["bytes_per_image"] / out["now"]["bytes_per_image"]
    out["patches_equal"] = totals["before"]["patches"] == totals["now"]["patches"]
    return out


def report(r: dict[str, Any]) -> None:
    c = r["config"]
    h, w = c["data"]["image_size"]
    print(f"stream bytes per D_U image per round, {r['geometry']}: {c['data']['in_channels']} x {h} x {w} images, "
          f"{c['data']['num_classes']} classes, {r['before']['patches_per_image']:.0f} windows of "
          f"{c['patches']['size']} px per image, {c['consistency']['batch_size']} images a step, {r['steps']} steps")
    print(f"{'':10}{'request':>14}{'reply':>14}{'row':>14}{'total':>14}")
    for side in ("before", "now"):
        s = r[side]
        print(f"{side:10}" + "".join(f"{s[k] / 1024:>11.1f} KiB" for k in
                                     ("request_bytes_per_image", "reply_bytes_per_image", "row_bytes_per_image",
                                      "bytes_per_image")))
    print(f"ratio {r['ratio']:.1f}x fewer bytes (target >= 10x: {'PASS' if r['ratio'] >= 10 else 'FAIL'}); "
          f"the same windows both ways: {r['patches_equal']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), nargs="+", default=["monuseg", "nuclei"])
    ap.add_argument("--steps", type=int, default=3, help="steps measured per geometry")
    ap.add_argument("--json", default="benchmarks/results/stream_bytes.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {"runs": []}
    for g in args.geometry:
        r = measure(g, args.steps)
        report(r)
        results["runs"].append(r)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
