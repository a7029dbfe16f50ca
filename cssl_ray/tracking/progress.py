"""What an experiment's driver shows in the terminal: one line per trial start and end, a bar over
the trials, and each warning the trials raised, once.

    [start 1/18] 3f2a1_00000 cell=supervised seed=0
    [start 2/18] 3f2a1_00001 cell=cl seed=0
    warning (3f2a1_00000): UserWarning: nuclei: dropped 2 val/test image(s) whose pixels repeat ...
    [done  1/18] 3f2a1_00000 finished round 4, best val_dice_mean 0.6120, test dice_mean 0.5981
    [done  2/18] 3f2a1_00001 FAILED: RuntimeError: out of memory
    trials:  11%|███                         | 2/18 [01:40<13:20, 50.0s/trial]

``start i/N``: the i-th trial to start; ``done k/N``: k trials have ended (finished, stopped early
or failed); N = the experiment's trials (num_samples x grid size). The bar (stdout, only when it is
a terminal) counts ended trials; lines go above it through ``tqdm.write``.

Warnings: trials run in Ray's worker processes, whose output stays in Ray's log files
(``ray_init.init_ray(log_to_driver=False)``). ``record_warnings`` runs around a trial (and around
each Train worker) and writes every distinct Python warning to a ``warnings*.json`` file in the run
folder as it is raised; the driver reads those files (``run_warnings``) and shows each distinct
text once per experiment (``TrialProgress.warn``).
"""
from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

WARNINGS_GLOB = "warnings*.json"  # warnings.json (the trial), warnings_rank<r>.json (Train workers)
ENDED = ("TERMINATED", "ERROR")  # Tune's statuses of a trial that will not run again
ERROR_LINE = re.compile(r"^[\w.]*(?:Error|Exception)\b[\w.()]*: \S")  # ValueError: ..., RayTaskError(X): ...


def say(line: str) -> None:
    """Where an experiment's lines go without a bar or a ``log`` (module level: tests replace it)."""
    print(line, flush=True)


def warning_text(message: Warning | str, category: type[Warning]) -> str:
    """``UserWarning: <message>``: one line (the message's first line)."""
    first = str(message).strip().splitlines()
    return f"{category.__name__}: {first[0] if first else ''}"[:1000]


def error_line(error: BaseException) -> str:
    """One line for an error that ended a run: the last ``SomeError: message`` line of its text (a Ray
    error carries its worker's traceback as text), else its type and first line. Ray Train's
    ``WorkerGroupError``: the first failed rank's."""
    failures = getattr(error, "worker_failures", None)  # {rank: the error raised there}
    if isinstance(failures, dict) and failures:
        rank, first = min(failures.items(), key=lambda kv: kv[0])
        return f"{type(error).__name__}: rank {rank}: {error_line(first)}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line for line in lines if ERROR_LINE.match(line)]
    text = found[-1] if found else f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text[:500]


@contextmanager
def record_warnings(path: Path) -> Iterator[list[str]]:
    """Every distinct Python warning raised in the block (any thread of this process) is appended to
    the yielded list and written to ``path`` (a JSON list, rewritten atomically on each new text, so
    a trial that is stopped mid-run has already written what it raised) and still shown as before
    (to a Ray log file inside Ray workers). The warning filters are left as they are: what is
    recorded is what Python would have shown (a warning raised in a loop: once per place)."""
    texts: list[str] = []
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = warning_text(message, category)
        if text not in texts:
            texts.append(text)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(texts, indent=1))
            os.replace(tmp, path)
        shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.showwarning = show
        yield texts


def run_warnings(out_dir: Path, result: dict[str, Any] | None = None) -> list[str]:
    """A run folder's warnings: its ``warnings*.json`` files, then result.json's ``warnings`` (the
    run's own, e.g. a class without pseudo-label coverage); each distinct text once, in order."""
    texts: list[str] = []
    for path in sorted(out_dir.glob(WARNINGS_GLOB)):
        try:
            texts += [str(t) for t in json.loads(path.read_text())]
        except (OSError, ValueError):  # being replaced, or cut off by a killed trial: read next time
            continue
    texts += [str(t) for t in (result or {}).get("warnings", [])]
    return list(dict.fromkeys(texts))


class TrialProgress:
    """The driver's terminal during an experiment of ``total`` trials (module docstring).

    Counts come from this object's own events, and at a session's first event from Tune's trial
    list, so that a resumed experiment counts the trials that ended before it. Picklable (Tune
    pickles its callbacks with the experiment's state, and a resume continues from that copy); the
    bar is not kept.
    """

    def __init__(self, total: int, log: Callable[[str], None] | None = None, bar: bool | None = None,
                 warned: Iterable[str] = ()) -> None:
        self.total = max(int(total), 1)
        self.log = log  # None: print (through tqdm.write while the bar is up)
        self.show_bar = (log is None and sys.stdout.isatty()) if bar is None else bar
        self.started: set[str] = set()
        self.ended: set[str] = set()
        self.warned: set[str] = set(warned)  # texts already shown (also the driver's own checks')
        self._bar = None
        self._synced = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None, "_synced": False}

    def _sync(self, trials: Iterable[Any]) -> None:
        if self._synced:
            return
        self._synced = True
        for t in trials:
            if t.status in ENDED:
                self.started.add(t.trial_id)
                self.ended.add(t.trial_id)

    def _width(self) -> int:
        return len(str(self.total))

    def start_line(self, trials: Iterable[Any], trial_id: str, name: str) -> str:
        """``[start i/N] <name>``; a trial restarted after a resume keeps a new number."""
        self._sync(trials)
        self.started.add(trial_id)
        return f"[start {len(self.started):>{self._width()}}/{self.total}] {name}"

    def end_line(self, trials: Iterable[Any], trial_id: str, what: str) -> str:
        """``[done  k/N] <trial id> <what>``: k counts this trial."""
        self._sync(trials)
        self.started.add(trial_id)
        self.ended.add(trial_id)
        self._update_bar()
        return f"[done  {len(self.ended):>{self._width()}}/{self.total}] {trial_id} {what}"

    def warn(self, trial_id: str, texts: Iterable[str]) -> list[str]:
        """Show the texts not shown before in this experiment (``warning (<trial>): <text>``)."""
        new = [t for t in dict.fromkeys(texts) if t not in self.warned]
        for t in new:
            self.warned.add(t)
            self.write(f"warning ({trial_id}): {t}")
        return new

    def write(self, line: str) -> None:
        if self.log is not None:
            self.log(line)
            return
        if self._bar is None and self.show_bar:
            self._open_bar()
        if self._bar is not None:
            from tqdm import tqdm
            tqdm.write(line, file=sys.stdout)
        else:
            say(line)

    def _open_bar(self) -> None:
        from tqdm import tqdm
        self._bar = tqdm(total=self.total, initial=len(self.ended), desc="trials", unit="trial",
                         file=sys.stdout, dynamic_ncols=True, leave=True)

    def _update_bar(self) -> None:
        if self.show_bar and self._bar is None:
            self._open_bar()
        if self._bar is not None:
            self._bar.n = len(self.ended)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
