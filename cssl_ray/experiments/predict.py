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
weights) and a Ray Train checkpoint folder holding ``state.pt`` (``cssl_ray.distributed.train_checkpoints``; its
``best_model``, the best-validation weights that ``best.pt`` would hold, e.g. copied down from the
run's ``storage_path`` on S3 after a cluster run). Each also carries the run's ``config``. And an
MLflow model that ``cssl_ray.experiments.train``, ``tune`` or ``ablate`` logged (``models:/<name>/<version>`` of
a registered model, ``models:/<model id>``, ``runs:/<run id>/model``), read from ``--tracking-uri``
(``cssl_ray.tracking.mlflow_model``). ``--checkpoint`` is the old name of ``--model``.

Reading the images, the ``Segmenter`` and writing the PNGs are Ray-free: ``cssl_ray.evaluation.inference``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cssl_ray.config import Config, ConfigError, to_dict
from cssl_ray.distributed.ray_init import init_ray, shutdown_ray
from cssl_ray.evaluation.inference import (
    PredictError,
    Prepared,
    Segmenter,
    list_images,
    prepare_images,
    segment_local,
    write_outputs,
)


def load_checkpoint(path: str | Path, tracking_uri: str | None = None) -> tuple[Config, dict[str, Any]]:
    """The run's Config and model state dict from ``path``: a file, a Ray Train checkpoint folder or
    an MLflow model URI (read from ``tracking_uri``, default ``tracking.tracking_uri()``)."""
    import torch

    from cssl_ray.tracking.mlflow_model import is_model_uri
    if is_model_uri(str(path)):
        from cssl_ray.tracking.mlflow_model import load_model
        from cssl_ray.tracking.uri import tracking_uri as default_uri
        try:
            return load_model(str(path), default_uri(tracking_uri))
        except ValueError as e:
            raise PredictError(str(e)) from None

    from cssl_ray.config import from_dict
    from cssl_ray.distributed.train_checkpoints import STATE_FILE

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
        raise PredictError(f"{checkpoint}: data.num_classes {cfg.data.num_classes} does not fit uint8 mask PNGs "
                           "(<= 256)")
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
        print(f"cssl_ray.predict: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
