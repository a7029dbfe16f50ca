"""Batch inference: class masks and colour overlays for a folder of images, from a trained checkpoint.

    python -m cssl_ray.predict --model runs/x/best.pt --images <folder> --out <folder>
                               [--address auto] [--workers N] [--batch-size B]
    python -m cssl_ray.predict --model models:/nuclei/3 ...   # a registered model (--tracking-uri)
    python -m cssl_ray.predict ... --local       # no Ray: the same functions in this process
    python -m cssl_ray.predict ... --dry-run     # every input check (check_inputs); writes nothing

    driver   checkpoint -> Config (``from_dict(ckpt["config"])``) -> every image of the folder read
             and preprocessed exactly as the training store does (the dataset card's normalisation,
             ``data.in_channels``, resize to ``data.image_size``); any bad input stops here, before
             anything is written
    Ray      rows {name, image (C, H, W) float32} -> map_batches(Segmenter) over an actor pool of
             ``--workers`` (``--gpus-per-worker`` each; default 0: CPU) -> rows {name, mask (H, W) uint8}
    driver   each mask back to the image's own size (nearest neighbour) -> <out>/<name>_mask.png
             (uint8 class ids) and <out>/<name>_overlay.png (PALETTE blended over the image), each
             written to a temporary name and renamed

Images are read and outputs written by the driver only, so on a multi-node cluster neither folder
has to be shared: rows travel to the actors through the object store. The driver holds every
preprocessed image at the training size (e.g. 1000 images of 256x256 grey: 256 MB) and every mask
before writing the first file; that keeps "bad input -> nothing written" simple.

Accepted checkpoints: ``best.pt`` and ``round_NNN.pt`` (``cssl_ray.run.local``; their ``model``
weights) and a Ray Train checkpoint folder holding ``state.pt`` (``cssl_ray.distributed.ray_train``; its
``best_model``, the best-validation weights that ``best.pt`` would hold, e.g. copied down from the
run's ``storage_path`` on S3 after a cluster run). Each also carries the run's ``config``. And an
MLflow model that ``cssl_ray.experiments.train``, ``tune`` or ``ablate`` logged (``models:/<name>/<version>`` of
a registered model, ``models:/<model id>``, ``runs:/<run id>/model``), read from ``--tracking-uri``
(``cssl_ray.tracking.mlflow_model``). ``--checkpoint`` is the old name of ``--model``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cssl_ray.config import Config, ConfigError, to_dict
from cssl_ray.distributed.ray_init import init_ray, shutdown_ray

Batch = dict[str, np.ndarray]

# Class id -> RGB; background (0) stays the image. Ids past the list wrap around (1 + (c - 1) % 9).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # background: not drawn
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
)
OVERLAY_ALPHA = 0.5  # weight of a class colour over the image


class PredictError(ValueError):
    """Bad input to ``cssl_ray.experiments.predict``; the message is one line naming the file."""


@dataclass
class Prepared:
    """One input image: its name, the network input and what the outputs are drawn on."""

    name: str  # file stem: outputs are <name>_mask.png, <name>_overlay.png
    image: np.ndarray  # (C, H, W) float32 at data.image_size, as the network saw in training
    display: np.ndarray  # (H0, W0, 3) uint8 at the file's own size, for the overlay


# ---------------------------------------------------------------------------------------------
# Inputs


def load_checkpoint(path: str | Path, tracking_uri: str | None = None) -> tuple[Config, dict[str, Any]]:
    """The run's Config and model state dict from ``path``: a file, a Ray Train checkpoint folder or
    an MLflow model URI (read from ``tracking_uri``, default ``tracking.tracking_uri()``)."""
    import torch

    from cssl_ray.tracking.mlflow_model import is_model_uri
    if is_model_uri(str(path)):
        from cssl_ray.tracking.mlflow_model import load_model
        from cssl_ray.tracking.store import tracking_uri as default_uri
        try:
            return load_model(str(path), default_uri(tracking_uri))
        except ValueError as e:
            raise PredictError(str(e)) from None

    from cssl_ray.config import from_dict
    from cssl_ray.distributed.ray_train import STATE_FILE

    path = Path(path)
    train_folder = path.is_dir()
    if train_folder:
        if not (path / STATE_FILE).is_file():
            raise PredictError(f"{path}: a folder without {STATE_FILE}; expected best.pt or a Ray Train checkpoint")
        path = path / STATE_FILE
    if not path.is_file():
        raise PredictError(f"{path}: no such checkpoint")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises anything
        raise PredictError(f"{path}: not a cssl_ray checkpoint (unreadable: {type(e).__name__})") from None
    if not isinstance(saved, Mapping) or not isinstance(saved.get("config"), Mapping) \
            or not isinstance(saved.get("model"), Mapping) or not saved["model"]:
        raise PredictError(f"{path}: not a cssl_ray checkpoint (needs 'model' and 'config' entries, "
                           "as best.pt from python -m cssl_ray.train writes)")
    try:
        cfg = from_dict(dict(saved["config"]))
    except ConfigError as e:
        raise PredictError(f"{path}: not a cssl_ray checkpoint of this version ({e})") from None
    if train_folder and saved.get("best_model"):
        return cfg, dict(saved["best_model"])  # the best-validation weights, as best.pt would hold
    return cfg, dict(saved["model"])


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a flat folder (png, tif, tiff, jpg, jpeg), natural order; errors name the file."""
    from cssl_ray.data.formats import folder as folder_format
    from cssl_ray.data.sample import DatasetError

    root = Path(folder)
    if not root.is_dir():
        raise PredictError(f"{root}: no such folder of images")
    try:
        # The folder format's rules: other extensions and a name used twice are errors, hidden files skipped.
        found = folder_format._listing(root, folder_format.IMAGE_SUFFIXES)
    except DatasetError as e:
        raise PredictError(str(e)) from None
    if not found:
        raise PredictError(f"{root}: no images found (*.{{png,tif,tiff,jpg,jpeg}})")
    return list(found.values())


def prepare_images(paths: list[Path], cfg: Config) -> list[Prepared]:
    """Read and preprocess every image as the training store did (``data.preprocess``)."""
    from cssl_ray.data.cards import CardError, load_card
    from cssl_ray.data.formats.folder import read_image
    from cssl_ray.data.preprocess import normalise, resize_image, to_channels_first
    from cssl_ray.data.sample import DatasetError

    d = cfg.data
    try:
        card = load_card(d.name)
    except CardError as e:
        raise PredictError(f"checkpoint data.name {d.name!r}: {e}") from None
    pre = card.preprocessing(tuple(d.image_size), d.in_channels, d.normalise)
    out = []
    for path in paths:
        try:
            raw = read_image(path)
        except DatasetError as e:
            raise PredictError(str(e)) from None
        if raw.ndim not in (2, 3) or min(raw.shape[:2]) < 1:
            raise PredictError(f"{path}: expected an (H, W) or (H, W, C) image, got shape {raw.shape}")
        try:
            x = to_channels_first(normalise(raw, pre), pre.channels)  # (C, H0, W0) float32
        except ValueError as e:
            raise PredictError(f"{path}: {e}") from None
        out.append(Prepared(path.stem, resize_image(x, pre.size), _display(x)))
    return out


def _display(x: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised float -> (H, W, 3) uint8, min-max stretched (``none`` leaves any range)."""
    lo, hi = float(x.min()), float(x.max())
    unit = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    rgb = unit if unit.shape[0] == 3 else np.repeat(unit[:1], 3, axis=0)
    return np.ascontiguousarray((rgb.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# The model step (a Ray Data actor, or called directly with --local)


class Segmenter:
    """``map_batches`` actor: ``{name, image (B, C, H, W)}`` -> ``{name, mask (B, H, W) uint8}`` (argmax)."""

    def __init__(self, config: Mapping[str, Any], state_dict: Mapping[str, Any], threads: int = 1,
                 device: str | None = None) -> None:
        import torch

        from cssl_ray.config import from_dict
        from cssl_ray.models import create_model

        # One intra-op thread per CPU held (as pipeline.PseudoLabeller): small convolutions lose more
        # to thread contention than they gain.
        torch.set_num_threads(threads)
        self.cfg = from_dict(dict(config))
        d = self.cfg.data
        self.device = torch.device(device or ("cuda" if _actor_gpus() else "cpu"))  # None: the actor's GPU
        self.model = create_model(self.cfg.model, d.in_channels, d.num_classes)
        self.model.load_state_dict(dict(state_dict))
        self.model.to(self.device).eval()

    def __call__(self, batch: Batch) -> Batch:
        import torch

        images = torch.from_numpy(np.array(batch["image"], dtype=np.float32)).to(self.device)  # (B, C, H, W)
        with torch.no_grad():
            logits = self.model(images)  # (B, K, H, W)
        masks = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()  # (B, H, W); class ids < 256 (checked)
        return {"name": np.asarray(batch["name"]), "mask": masks}


def _actor_gpus() -> bool:
    """True inside a Ray actor that holds a GPU (ray.get_gpu_ids); False without Ray."""
    ray = sys.modules.get("ray")  # --local never imports Ray (~1 s)
    return ray is not None and ray.is_initialized() and bool(ray.get_gpu_ids())


def segment_local(items: list[Prepared], cfg: Config, state: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """name -> mask (H, W) uint8 at the training size, in this process."""
    import torch

    seg = Segmenter(to_dict(cfg), state, threads=torch.get_num_threads(),
                    device="cuda" if torch.cuda.is_available() else "cpu")
    masks: dict[str, np.ndarray] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        out = seg({"name": np.array([p.name for p in chunk]), "image": np.stack([p.image for p in chunk])})
        masks.update(zip(out["name"].tolist(), out["mask"]))
    return masks


def segment_ray(items: list[Prepared], cfg: Config, state: dict[str, Any], batch_size: int, workers: int,
                cpus_per_worker: float, address: str | None, gpus_per_worker: float = 0.0) -> dict[str, np.ndarray]:
    """name -> mask (H, W) uint8 at the training size, from a Ray Data actor pool."""
    import ray
    import ray.data

    started = init_ray(address, workers * cpus_per_worker)
    try:
        ds = ray.data.from_items([{"name": p.name, "image": p.image} for p in items])
        out = ds.map_batches(
            Segmenter,
            fn_constructor_args=(to_dict(cfg), {k: v.cpu() for k, v in state.items()},
                                 max(1, int(cpus_per_worker))),
            batch_size=batch_size,  # an explicit int: needed with GPUs
            compute=ray.data.ActorPoolStrategy(size=workers),  # Ray 2.60: compute=, not concurrency=
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker,  # asked for, never taken from what the cluster happens to have
            udf_modifying_row_count=False,
        )
        masks: dict[str, np.ndarray] = {}
        # Blocks arrive in any order (several actors): rows carry their name.
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            masks.update(zip(batch["name"].tolist(), batch["mask"]))
        return masks
    finally:
        if started:
            shutdown_ray()


# ---------------------------------------------------------------------------------------------
# Outputs


def overlay(display: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8 image with each non-background class blended in its PALETTE colour."""
    if display.shape[:2] != mask.shape:
        raise ValueError(f"overlay: image {display.shape[:2]} and mask {mask.shape} differ in size")
    ids = mask.astype(np.int64)
    colours = np.asarray(PALETTE, dtype=np.float32)[np.where(ids > 0, 1 + (ids - 1) % (len(PALETTE) - 1), 0)]  # (H, W, 3)
    a = np.where(ids > 0, alpha, 0.0)[..., None].astype(np.float32)  # (H, W, 1)
    return (display.astype(np.float32) * (1 - a) + colours * a + 0.5).astype(np.uint8)


def write_png(array: np.ndarray, path: Path) -> None:
    """Save a uint8 (H, W) or (H, W, 3) PNG under a temporary name, then rename: never half a file."""
    from PIL import Image

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(items: list[Prepared], masks: dict[str, np.ndarray], out: Path) -> None:
    """<out>/<name>_mask.png (class ids at the image's own size) and <name>_overlay.png per image."""
    from cssl_ray.data.preprocess import resize_mask

    out.mkdir(parents=True, exist_ok=True)
    for p in items:
        mask = resize_mask(masks[p.name], p.display.shape[:2])  # nearest neighbour: ids stay ids
        write_png(mask, out / f"{p.name}_mask.png")
        write_png(overlay(p.display, mask), out / f"{p.name}_overlay.png")


# ---------------------------------------------------------------------------------------------
# CLI


def check_inputs(checkpoint: str | Path, images: str | Path, out: str | Path, *, workers: int = 1,
                 batch_size: int = 8, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 tracking_uri: str | None = None) -> tuple[Config, dict[str, Any], list[Prepared]]:
    """Every check ``predict`` makes before Ray starts or a file is written (``--dry-run`` runs only
    these): the options' ranges, ``out``, the checkpoint and its weights, every image read and
    preprocessed. Returns the run's config, the weights and the prepared images. Bad input: ``PredictError``."""
    if workers < 1:
        raise PredictError(f"--workers: {workers} is out of range; allowed: >= 1")
    if batch_size < 1:
        raise PredictError(f"--batch-size: {batch_size} is out of range; allowed: >= 1")
    if cpus_per_worker <= 0:
        raise PredictError(f"--cpus-per-worker: {cpus_per_worker} is out of range; allowed: > 0")
    if gpus_per_worker < 0:
        raise PredictError(f"--gpus-per-worker: {gpus_per_worker:g} is out of range; allowed: >= 0 (0 = CPU actors)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PredictError(f"{out}: --out exists and is not a folder")
    cfg, state = load_checkpoint(checkpoint, tracking_uri)
    if cfg.data.num_classes > 256:
        raise PredictError(f"{checkpoint}: data.num_classes {cfg.data.num_classes} does not fit uint8 mask PNGs (<= 256)")
    _check_weights(cfg, state, checkpoint)
    items = prepare_images(list_images(images), cfg)  # every input checked before anything is written
    return cfg, state, items


def predict(checkpoint: str | Path, images: str | Path, out: str | Path, *, local: bool = False,
            workers: int = 1, batch_size: int = 8, cpus_per_worker: float = 1.0,
            address: str | None = None, gpus_per_worker: float = 0.0,
            tracking_uri: str | None = None) -> dict[str, Any]:
    """Masks and overlays for every image in ``images``; returns a summary. Bad input: ``PredictError``."""
    start = time.perf_counter()
    cfg, state, items = check_inputs(checkpoint, images, out, workers=workers, batch_size=batch_size,
                                     cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                     tracking_uri=tracking_uri)
    out = Path(out)
    if local:
        masks = segment_local(items, cfg, state, batch_size)
    else:
        masks = segment_ray(items, cfg, state, batch_size, workers, cpus_per_worker, address, gpus_per_worker)
    write_outputs(items, masks, out)
    return {"images": len(items), "out": str(out), "mode": "local" if local else "ray",
            "seconds": round(time.perf_counter() - start, 2)}


def _check_weights(cfg: Config, state: dict[str, Any], checkpoint: str | Path) -> None:
    """The state dict must fit the model the config names (one line, not a wall of key names)."""
    from cssl_ray.models import create_model

    model = create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise PredictError(f"{checkpoint}: its weights do not fit model.name={cfg.model.name} ({first})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cssl_ray.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--checkpoint", dest="checkpoint", required=True,
                   help="best.pt, round_NNN.pt, a Ray Train checkpoint folder, or an MLflow model URI "
                        "(models:/<name>/<version>, runs:/<run id>/model)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of a models:/ URI (default $MLFLOW_TRACKING_URI, "
                                          "else ./mlflow.db)")
    p.add_argument("--images", required=True, help="folder of images (png, tif, tiff, jpg, jpeg)")
    p.add_argument("--out", required=True, help="folder for <name>_mask.png and <name>_overlay.png")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    ray = p.add_argument_group("Ray (without --local)")
    ray.add_argument("--workers", type=int, default=1, help="Segmenter actors")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each actor holds (0 = CPU actors)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each actor holds")
    ray.add_argument("--address", help="an existing Ray cluster, e.g. auto; default: start Ray here")
    p.add_argument("--dry-run", action="store_true",
                   help="check the checkpoint and every image, print what would run, start nothing, write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.dry_run:
            cfg, _, items = check_inputs(args.checkpoint, args.images, args.out, workers=args.workers,
                                         batch_size=args.batch_size, cpus_per_worker=args.cpus_per_worker,
                                         gpus_per_worker=args.gpus_per_worker, tracking_uri=args.tracking_uri)
            how = "in this process (--local)" if args.local else \
                (f"on {args.workers} Segmenter actor(s) x {args.gpus_per_worker:g} GPU on Ray at "
                 f"{args.address or 'a local instance started here'}")
            print(f"dry run: checkpoint ok ({cfg.data.name}, {cfg.model.name}, {cfg.data.num_classes} classes, "
                  f"{cfg.data.image_size[0]}x{cfg.data.image_size[1]}); {len(items)} image(s) ok; would segment them "
                  f"{how}, masks and overlays to {args.out}; nothing started")
            return 0
        summary = predict(args.checkpoint, args.images, args.out, local=args.local, workers=args.workers,
                          batch_size=args.batch_size, cpus_per_worker=args.cpus_per_worker, address=args.address,
                          gpus_per_worker=args.gpus_per_worker, tracking_uri=args.tracking_uri)
    except (PredictError, ConfigError) as e:
        print(f"cssl_ray.experiments.predict: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
