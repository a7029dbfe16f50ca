"""The driver-side record of a Tune experiment's trials: the Tune callback that opens one MLflow
child run per trial and logs its results, test metrics, files and status, the trial's tags and the
experiment's lines (one per trial start and end, warnings, the bar over trials).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cssl_ray.config import Config, to_dict
from cssl_ray.experiments.ablation_cells import cell_of
from cssl_ray.experiments.trainable import CELL_KEY, trial_config
from cssl_ray.tracking.progress import TrialProgress, run_warnings
from cssl_ray.tracking.run_record import read_result, record_result, selected_value


def make_callback(uri: str, experiment: str, parent_id: str, base: dict[str, Any], runs_root: Path,
                  base_tags: dict[str, str], metric: str, mode: str, log: Callable[[str], None] | None = None,
                  total: int = 1, warned: Iterable[str] = (), bar: bool | None = None):
    """The driver-side Tune callback that records trials in MLflow and prints the experiment's lines
    (built here: ray.tune is lazy). ``total``: the experiment's trials (num_samples x grid size);
    ``warned``: warning texts the driver has already shown; ``bar``: the bar over trials (None: when
    stdout is a terminal and ``log`` is None). ``log`` None: print."""
    from ray import tune

    class MLflowRecorder(tune.Callback):
        """Every trial -> one child run: params, metrics per result, test metrics, files, status.

        Runs in the driver (Tune's controller), so only the driver writes to MLflow. A trial that
        errors ends FAILED; one ASHA stopped ends FINISHED with tag cssl.early_stopped=true.
        Also prints one line per trial start and end, each new warning and the bar over trials
        (``cssl_ray.tracking.progress``; Tune's own output is off: verbose=0).
        """

        def __init__(self) -> None:
            self.runs: dict[str, str] = {}
            self._tracker = None
            self.progress = TrialProgress(total, log, bar=bar, warned=warned)

        @property
        def tracker(self):
            if self._tracker is None:
                from cssl_ray.tracking.tracker import Tracker
                self._tracker = Tracker(uri, experiment)
            return self._tracker

        def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its state
            return {"runs": self.runs, "_tracker": None, "progress": self.progress}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self._open(trial)
            self.progress.write(self.progress.start_line(trials, trial.trial_id,
                                                         trial_name(trial.trial_id, trial.config)))

        def on_experiment_end(self, trials, **info) -> None:
            self.progress.close()

        def _open(self, trial) -> str:
            if trial.trial_id in self.runs:
                return self.runs[trial.trial_id]
            from cssl_ray.tracking.tracker import flatten_config
            params = dict(trial.config)
            cfg = trial_config(base, params)
            # the labelled share of the experiment, also for a reference cell that labels everything
            nominal = trial_config(base, {k: v for k, v in params.items() if k != CELL_KEY})
            tags = {**base_tags, **run_tags(cfg, params.get(CELL_KEY), nominal), "cssl.trial_id": trial.trial_id,
                    **{f"param.{k}": str(v) for k, v in params.items()}}
            name = trial_name(trial.trial_id, params)
            run_id = self.tracker.start_child(parent_id, trial.trial_id, name, flatten_config(to_dict(cfg)), tags)
            self.runs[trial.trial_id] = run_id
            return run_id

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            run_id = self._open(trial)
            metrics = {k: v for k, v in result.items() if k not in _TUNE_KEYS and k != "step"}
            self.tracker.log_metrics(run_id, metrics, step=int(result.get("step", 0)))
            self.progress.warn(trial.trial_id, run_warnings(runs_root / trial.trial_id))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._close(trials, trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._close(trials, trial, "FAILED")

        def _close(self, trials, trial, status: str) -> None:
            run_id = self._open(trial)
            out_dir = runs_root / trial.trial_id
            step = int((trial.last_result or {}).get("step", 0))
            cfg = trial_config(base, dict(trial.config))
            saved = read_result(out_dir)
            raised = run_warnings(out_dir, saved)
            result = record_result(self.tracker, run_id, cfg, out_dir, step, log_model=status == "FINISHED",
                                   warnings=raised)
            self.progress.warn(trial.trial_id, raised)
            early = status == "FINISHED" and not result
            self.tracker.set_tags(run_id, {"cssl.early_stopped": str(early).lower()})
            if status == "FAILED" and trial.error_file:
                self.tracker.set_tags(run_id, {"cssl.error": _first_error_line(trial)})
            self.tracker.end(run_id, status)
            last = trial.last_result or {}
            if status == "FAILED":
                what = f"FAILED: {_first_error_line(trial)}"
            elif early:
                what = f"stopped early by the scheduler after round {int(last.get('round', 0))}"
            else:
                what = f"finished round {int(last.get('round', 0))}"
            best = selected_value(saved.get("best_val", {}), trial.metric_analysis or {}, metric, mode)
            shown = "" if math.isnan(best) else f", best {metric} {best:.4f}"  # of the weights it kept
            test = (f", test dice_mean {result['test']['dice_mean']:.4f}"
                    if result and "dice_mean" in result["test"] else "")
            self.progress.write(self.progress.end_line(trials, trial.trial_id, f"{what}{shown}{test}"))

    return MLflowRecorder()


_TUNE_KEYS = {"training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname",
              "pid", "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
              "iterations_since_restore", "config", "checkpoint_dir_name", "done", "trial_id", "experiment_tag",
              "should_checkpoint", "checkpoint_path"}


def _first_error_line(trial) -> str:
    try:
        text = Path(trial.error_file).read_text().strip().splitlines()
        return (text[-1] if text else "unknown error")[:500]
    except OSError:
        return "unknown error"


def run_tags(cfg: Config, cell: str | None = None, nominal: Config | None = None) -> dict[str, str]:
    """Tags of a trial: dataset, the experiment's labelled share (``nominal``'s, so a reference cell
    such as supervised_all sits in its experiment's table), cell (``cell``, else from the switches),
    the schedule (``train.protocol``: a report compares cells of one protocol only)."""
    d, n = cfg.data, (nominal or cfg).data
    return {"cssl.dataset": d.name, "cssl.labelled_fraction": str(n.labelled_fraction),
            "cssl.labelled_count": str(n.labelled_count), "cssl.cell": cell or cell_of(cfg),
            "cssl.seed": str(cfg.train.seed), "cssl.method": _method_tag(cfg), "cssl.protocol": cfg.train.protocol}


def _method_tag(cfg: Config) -> str:
    """What the rounds train on D_U: a baseline's name, ``cssl`` with L_CL and/or L_CR, or ``supervised``."""
    t = cfg.train
    if t.method != "cssl":
        return t.method
    return "cssl" if t.use_cl or t.use_cr else "supervised"


def trial_name(trial_id: str, params: dict[str, Any]) -> str:
    shown = []
    for k, v in params.items():
        short = k.rsplit(".", 1)[-1]
        shown.append(f"{short}={v:.3g}" if isinstance(v, float) else f"{short}={v}")
    return f"{trial_id} " + " ".join(shown)
