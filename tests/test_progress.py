"""cssl_ray.tracking.progress: the experiment's terminal lines, counts over all trials, warnings once."""
from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass

from cssl_ray.tracking.progress import TrialProgress, record_warnings, run_warnings, warning_text


@dataclass
class T:
    trial_id: str
    status: str = "RUNNING"


def test_lines_count_against_every_trial_of_the_experiment():
    """A grid of 18 with 2 created so far reads 1/18, 2/18 - not 1/1, 2/2."""
    lines: list[str] = []
    p = TrialProgress(18, log=lines.append)
    a, b = T("a"), T("b")
    p.write(p.start_line([a], "a", "a tau=0.1"))
    p.write(p.start_line([a, b], "b", "b tau=0.2"))
    b.status = "ERROR"
    p.write(p.end_line([a, b], "b", "FAILED: RuntimeError: boom"))
    a.status = "TERMINATED"
    p.write(p.end_line([a, b], "a", "finished round 3"))
    assert lines == ["[start  1/18] a tau=0.1", "[start  2/18] b tau=0.2",
                     "[done   1/18] b FAILED: RuntimeError: boom", "[done   2/18] a finished round 3"]


def test_a_resumed_experiment_counts_the_trials_that_ended_before():
    p = TrialProgress(5, log=[].append)
    before = [T("a", "TERMINATED"), T("b", "ERROR"), T("c", "PENDING")]
    assert p.start_line(before, "c", "c") == "[start 3/5] c"
    assert p.end_line(before, "c", "finished round 1") == "[done  3/5] c finished round 1"
    p.end_line(before, "c", "again")  # a second event for one trial does not count twice
    assert len(p.ended) == 3
    resumed = pickle.loads(pickle.dumps(p))  # the next session syncs again, from Tune's trial list
    assert resumed.start_line([*before, T("d", "TERMINATED")], "e", "e") == "[start 5/5] e"


def test_each_warning_text_is_shown_once_per_experiment():
    lines: list[str] = []
    p = TrialProgress(3, log=lines.append, warned=["UserWarning: seen by the driver"])
    assert p.warn("a", ["UserWarning: x", "UserWarning: seen by the driver", "UserWarning: x"]) == ["UserWarning: x"]
    assert p.warn("b", ["UserWarning: x", "UserWarning: y"]) == ["UserWarning: y"]
    assert lines == ["warning (a): UserWarning: x", "warning (b): UserWarning: y"]
    restored = pickle.loads(pickle.dumps(p))  # Tune pickles its callbacks; the bar is not kept
    assert restored.warned == p.warned and restored._bar is None


def test_no_bar_off_a_terminal(capsys):
    p = TrialProgress(2)  # pytest's stdout is not a terminal
    assert not p.show_bar
    p.write(p.end_line([T("a", "TERMINATED")], "a", "finished round 1"))
    p.close()
    assert capsys.readouterr().out == "[done  1/2] a finished round 1\n"


def test_bar_counts_ended_trials_and_lines_go_above_it(capsys):
    p = TrialProgress(2, bar=True)
    p.write(p.start_line([T("a")], "a", "a"))
    p.write(p.end_line([T("a", "TERMINATED")], "a", "finished round 1"))
    assert p._bar.n == 1 and p._bar.total == 2
    p.close()
    out = capsys.readouterr().out
    assert "[start 1/2] a\n" in out and "[done  1/2] a finished round 1\n" in out and "1/2" in out


def test_record_warnings_writes_each_text_once_as_raised_and_still_shows_it(tmp_path):
    path = tmp_path / "run" / "warnings.json"
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, c, *a, **k: shown.append(str(m))
        with record_warnings(path) as texts:
            for _ in range(3):
                warnings.warn("nuclei: dropped 2 val/test image(s)\nsecond line", UserWarning)
            assert json.loads(path.read_text()) == ["UserWarning: nuclei: dropped 2 val/test image(s)"]
            warnings.warn("old", DeprecationWarning)
        assert len(shown) == 4  # shown as before (Ray's log file in a worker)
        assert texts == json.loads(path.read_text()) == ["UserWarning: nuclei: dropped 2 val/test image(s)",
                                                         "DeprecationWarning: old"]
        warnings.warn("after")  # the hook is gone after the block
        assert len(json.loads(path.read_text())) == 2


def test_run_warnings_reads_every_sidecar_and_result_json(tmp_path):
    (tmp_path / "warnings.json").write_text(json.dumps(["UserWarning: a"]))
    (tmp_path / "warnings_rank0.json").write_text(json.dumps(["UserWarning: a", "UserWarning: b"]))
    (tmp_path / "warnings_rank1.json").write_text('["cut off')  # a trial killed mid-write: skipped
    result = {"warnings": ["round 1: class 'blob' has 0% pseudo-label coverage"]}
    assert run_warnings(tmp_path, result) == ["UserWarning: a", "UserWarning: b",
                                              "round 1: class 'blob' has 0% pseudo-label coverage"]
    assert run_warnings(tmp_path / "missing") == []
    assert warning_text(RuntimeWarning("x\ny"), RuntimeWarning) == "RuntimeWarning: x"
