"""Train one CSSL run.

    python -m cssl_ray.train --config configs/demo_synthetic.yaml [--workers N] [--gpus-per-worker G]
                             [--labellers N] [--gpus-per-labeller G] [--address auto]
                             [--placement-strategy SPREAD] [--out DIR] [--resume] [--set train.seed=1 ...]
                             [--select-metric val_iou_mean [--select-mode max]]
    python -m cssl_ray.train --smoke                  # Ray, tiny: ~30 s on a CPU (Ray's start-up)
    python -m cssl_ray.train --local --smoke          # one process, no Ray: seconds
    python -m cssl_ray.train ... --dry-run            # every check the run makes first; starts nothing

Without ``--local`` the run goes through Ray (``cssl_ray.distributed.ray_train``): Ray Train workers (data
parallel over gloo / NCCL) fed by a Ray Data stream of pseudo-labelled patches; checkpoints under
``--out`` (or ``--storage-path``, shared or cloud storage on a cluster). ``--local`` runs the whole
schedule in this process (``cssl_ray.run.local``). ``--dry-run`` runs the checks a run makes before it
starts (``ray_train.check_run``: config, model geometry, the dataset loaded and split, workers
against labelled images), prints what would run and exits: no Ray, no run folder, no checkpoint;
``--address`` and ``--storage-path`` are taken as given, nothing is contacted.

Pseudo-labellers (with L_CL or L_CR): ``--labellers`` actors of 0.5 CPU and ``--gpus-per-labeller``
GPUs each (default 0: on CPUs; a fraction such as 0.5 shares a GPU with a worker), reserved in a
placement group of their own before training starts: a GPU labeller waits for a GPU (on an
autoscaling cluster, for the node the autoscaler adds), and a run that a local Ray instance cannot
hold is a one-line error.

MLflow: every run is recorded like a Tune trial (``--no-track`` to opt out): the resolved config as
params, the ``cssl.*`` tags (kind ``train``), one metric set per validation, then the test metrics,
the data as dataset inputs, the run's files and the selected weights as an MLflow PyTorch model
(``run_record``), in experiment ``--experiment`` (default: the dataset's name) of
``--tracking-uri`` (default ``$MLFLOW_TRACKING_URI``, else ./mlflow.db). ``--resume`` reopens the
run of the same ``--out``. A failed run ends FAILED, an interrupted one KILLED.

The terminal shows the run's progress lines and its result; Ray's own output (raylet, core_worker,
Ray Train and Ray Data lines, deprecation warnings) stays in Ray's log files unless ``--verbose``
(``cssl_ray.distributed.ray_init``). A run that Ray ends with an error (a failed worker) is one line:
the error's summary; ``--verbose`` shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from cssl_ray.config import Config, ConfigError, from_dict, load_config, merge, parse_override
from cssl_ray.distributed.ray_init import set_verbose
from cssl_ray.experiments.tune import add_selection_flags, add_verbose_flag

SMOKE: dict[str, Any] = {
    "data": {"image_size": [32, 32], "n_train": 8, "n_val": 2, "n_test": 2, "labelled_fraction": 0.25},
    "model": {"base_channels": 4, "depth": 2, "embed_dim": 16, "proj_hidden": 16},
    "patches": {"size": 16, "min_pixels": 10, "per_image": 6, "batch_size": 24},
    "consistency": {"batch_size": 4},
    "train": {"batch_size": 4, "stage_a_steps": 2, "max_rounds": 2, "steps_per_round": 2},
}


def build_config(config: str | None, overrides: list[str], smoke: bool = False) -> Config:
    """Defaults <- YAML file <- smoke preset <- --set overrides (later wins)."""
    extra: dict[str, Any] = dict(SMOKE) if smoke else {}
    for text in overrides:
        extra = merge(extra, parse_override(text))
    if config:
        return load_config(config, extra)
    return from_dict(extra)


def selection_overrides(metric: str | None, mode: str | None) -> list[str]:
    """``--select-metric`` / ``--select-mode`` as ``--set`` overrides; a metric without a mode gets
    ``auto`` (min for val_loss), not the config's mode, which was chosen for its own metric."""
    out = [f"train.select_metric={metric}"] if metric else []
    if metric or mode:
        out.append(f"train.select_mode={mode or 'auto'}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cssl_ray.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file of overrides of cssl_ray.config.Config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set contrastive.tau=0.2 (repeatable)")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--smoke", action="store_true", help="tiny images and model: finishes in seconds")
    p.add_argument("--out", help="output folder (train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest round checkpoint in --out")
    add_selection_flags(p, default="the config's train.select_metric")
    ray = p.add_argument_group("Ray (without --local)")
    ray.add_argument("--workers", type=int, default=1, help="Ray Train workers (data-parallel ranks)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; 0 = CPU (gloo)")
    ray.add_argument("--cpus-per-worker", type=float, default=0.5,
                     help="CPUs per worker; fractional leaves CPUs to the Ray Data stages")
    ray.add_argument("--labellers", type=int, default=1, help="pseudo-labeller actors (with L_CL or L_CR)")
    ray.add_argument("--gpus-per-labeller", type=float, default=0.0,
                     help="GPUs per labeller, 0 to 1; 0 = CPU labellers, a fraction shares a GPU")
    ray.add_argument("--address", help="an existing Ray cluster, e.g. auto; default: start Ray here")
    ray.add_argument("--storage-path", help="where Ray Train keeps the run (absolute, s3://, gs://); default --out")
    ray.add_argument("--max-failures", type=int, default=2, help="worker failures survived (restart from checkpoint)")
    ray.add_argument("--placement-strategy", default="PACK", metavar="{PACK,SPREAD,STRICT_PACK,STRICT_SPREAD}",
                     help="placement of the Train workers: PACK fills nodes in turn, SPREAD one worker per node")
    track = p.add_argument_group("MLflow")
    track.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    track.add_argument("--experiment", help="MLflow experiment (default: the dataset's name, data.name)")
    track.add_argument("--no-track", action="store_true", help="record nothing in MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check the run makes before it starts, print what would run, start nothing")
    add_verbose_flag(p)
    return p


def dry_run_line(cfg: Config, args: argparse.Namespace, source: Any) -> str:
    """One line: what ``args`` would run, after ``check_run`` passed on ``cfg`` (its ``DataSource``)."""
    d, t = cfg.data, cfg.train
    data = f"data ok ({d.name}: {source.describe()})"
    if args.local:
        how = "would train in this process (--local)"
    else:
        gpus = f"{args.gpus_per_worker:g} GPU" if args.gpus_per_worker else "CPU only (gloo)"
        labellers = ""
        if t.use_cl or t.use_cr:
            on = f"{args.gpus_per_labeller:g} GPU" if args.gpus_per_labeller else "CPU only"
            labellers = f" and {args.labellers} pseudo-labeller(s) x {on}, 0.5 CPU each"
        how = (f"would train {args.workers} Ray Train worker(s) x {gpus}, {args.cpus_per_worker:g} CPU each "
               f"({args.placement_strategy}){labellers}, on Ray at {args.address or 'a local instance started here'}, "
               f"checkpoints in {args.storage_path or t.out_dir}")
    return (f"dry run: config ok ({d.name} {d.image_size[0]}x{d.image_size[1]}, {cfg.model.name}, "
            f"{t.last_round()} rounds{', joint protocol' if t.protocol == 'joint' else ''}); {data}; {how}, run files in {t.out_dir}"
            f"{' (resumed)' if args.resume else ''}; nothing started")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    set_verbose(args.verbose)
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    if args.quiet:
        overrides.append("train.progress=false")
    overrides += selection_overrides(args.select_metric, args.select_mode)
    try:
        cfg = build_config(args.config, overrides, smoke=args.smoke)
        if args.dry_run:
            from cssl_ray.distributed.ray_train import (
                check_run,  # the checks run_ray makes first (a superset of --local's)
            )
            source = check_run(cfg, workers=1 if args.local else args.workers, gpus_per_worker=args.gpus_per_worker,
                               cpus_per_worker=args.cpus_per_worker, placement_strategy=args.placement_strategy,
                               labellers=args.labellers, gpus_per_labeller=args.gpus_per_labeller,
                               **({} if args.local else {"address": args.address, "storage_path": args.storage_path,
                                                         "here": args.address is None, "resume": args.resume}))
            print(dry_run_line(cfg, args, source))
            return 0
        from cssl_ray.config import validate
        from cssl_ray.models import check_geometry
        validate(cfg)  # the checks every run starts with, before an MLflow run exists for it
        check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
        result = tracked(cfg, args, lambda log: _run(cfg, args, log))
    except (ConfigError, FileNotFoundError) as e:
        print(f"cssl_ray.train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Ray's (a failed worker, an actor that died): one line, the traceback with --verbose
        if args.verbose or not type(e).__module__.startswith("ray."):
            raise
        from cssl_ray.tracking.progress import error_line
        print(f"cssl_ray.train: error: {error_line(e)} (the traceback and Ray's output: --verbose)",
              file=sys.stderr)
        return 1
    summary = {k: round(v, 4) for k, v in result.test.items() if k.startswith(("dice", "iou", "auprc", "hd95", "asd"))}
    print(json.dumps({"out_dir": str(result.out_dir), "best_round": result.best_round,
                      "seconds": round(result.seconds, 1), "test": summary}, indent=2))
    return 0


def _run(cfg: Config, args: argparse.Namespace, log: Callable[[dict[str, Any]], None] | None) -> Any:
    """The run itself, in this process (--local) or on Ray; ``log`` gets every validation record."""
    if args.local:
        from cssl_ray.run.local import run_local  # torch and the models load only once args are valid
        return run_local(cfg, resume=args.resume, log=log)
    from cssl_ray.distributed.placement import StreamResources
    from cssl_ray.distributed.ray_train import run_ray  # ray loads only once args are valid
    return run_ray(cfg, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                   cpus_per_worker=args.cpus_per_worker, address=args.address,
                   storage_path=args.storage_path, resume=args.resume, max_failures=args.max_failures,
                   placement_strategy=args.placement_strategy,
                   resources=StreamResources(labellers=args.labellers, labeller_gpus=args.gpus_per_labeller),
                   callbacks=[_mlflow_forwarder(log)] if log else None)


def tracked(cfg: Config, args: argparse.Namespace, run: Callable[[Any], Any]) -> Any:
    """``run(log)`` recorded as one MLflow run (module docstring); ``run(None)`` with ``--no-track``."""
    if args.no_track:
        return run(None)
    from pathlib import Path

    from cssl_ray.config import to_dict
    from cssl_ray.experiments.trial_recorder import run_tags
    from cssl_ray.tracking.run_record import RecordLogger, record_result
    from cssl_ray.tracking.runs import find_runs
    from cssl_ray.tracking.tracker import Tracker, flatten_config, git_commit
    from cssl_ray.tracking.uri import tracking_uri

    out_dir = Path(cfg.train.out_dir).resolve()
    tracker = Tracker(tracking_uri(args.tracking_uri), args.experiment or cfg.data.name)
    tags = {**run_tags(cfg), "cssl.kind": "train", "cssl.out_dir": str(out_dir), "cssl.git_commit": git_commit(),
            "cssl.mode": "local" if args.local else f"ray:{args.workers}"}
    existing = find_runs(tracker.uri, tracker.experiment, tags={"cssl.kind": "train", "cssl.out_dir": str(out_dir)}) \
        if args.resume else []
    run_id = tracker.reopen(existing[0]["run_id"], tags) if existing else \
        tracker.start_run(f"train:{out_dir.name}", flatten_config(to_dict(cfg)), tags)
    status = "KILLED"  # Ctrl-C
    try:
        result = run(RecordLogger(tracker.uri, tracker.experiment, run_id))
        step = int(result.history[-1].get("step", 0)) if result.history else 0
        record_result(tracker, run_id, cfg, out_dir, step)
        status = "FINISHED"
        return result
    except (ConfigError, FileNotFoundError):  # a check the run makes first (the data's classes, the
        tracker.end(run_id, "FAILED")         # cluster's resources) failed: nothing ran, so a new run
        if not existing:                      # leaves no record and the error stays one line
            tracker.client.delete_run(run_id)
        status = ""
        raise
    except Exception:
        status = "FAILED"
        raise
    finally:
        if status:
            tracker.end(run_id, status)
            print(f"MLflow: run {run_id} in experiment {tracker.experiment!r} ({status})", file=sys.stderr)


def _mlflow_forwarder(log: Callable[[dict[str, Any]], None]) -> Any:
    """A Ray Train callback that hands rank 0's reports to ``log`` (run on Train's controller)."""
    from ray.train import UserCallback

    class Forward(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics:
                log(metrics[0])

    return Forward()


if __name__ == "__main__":
    sys.exit(main())
