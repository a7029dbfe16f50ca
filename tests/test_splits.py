from __future__ import annotations

import json

import pytest

from cssl_ray.data.splits import Split, labelled_size, make_split, read_split, write_split


def test_counts_and_disjoint():
    s = make_split(40, 8, 16, labelled_fraction=0.1, seed=0)
    assert len(s.labelled) == 4 and len(s.unlabelled) == 36
    assert s.val == list(range(40, 48)) and s.test == list(range(48, 64))
    parts = [set(s.labelled), set(s.unlabelled), set(s.val), set(s.test)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 64
    assert set(s.labelled) | set(s.unlabelled) == set(range(40))


def test_labelled_count_overrides_fraction():
    s = make_split(30, 2, 2, labelled_fraction=0.5, labelled_count=7, seed=1)
    assert len(s.labelled) == 7 and len(s.unlabelled) == 23


def test_fraction_one_has_no_unlabelled():
    s = make_split(10, 1, 1, labelled_fraction=1.0)
    assert s.labelled == list(range(10)) and s.unlabelled == []


def test_at_least_one_labelled_and_half_rounds_up():
    assert labelled_size(5, 0.01) == 1
    assert labelled_size(5, 0.1) == 1  # 0.5 -> 1
    assert labelled_size(25, 0.1) == 3  # 2.5 -> 3
    assert labelled_size(40, 0.2) == 8
    assert labelled_size(40, 0.2, labelled_count=25) == 25


def test_deterministic_and_seed_dependent():
    assert make_split(50, 5, 5, 0.2, seed=3) == make_split(50, 5, 5, 0.2, seed=3)
    assert make_split(50, 5, 5, 0.2, seed=3).labelled != make_split(50, 5, 5, 0.2, seed=4).labelled


def test_smaller_labelled_set_is_a_subset_of_a_larger_one():
    small = make_split(50, 5, 5, 0.1, seed=9)
    large = make_split(50, 5, 5, 0.5, seed=9)
    assert set(small.labelled) < set(large.labelled)


def test_lists_are_sorted_plain_ints():
    s = make_split(20, 3, 3, 0.3, seed=2)
    for part in (s.labelled, s.unlabelled, s.val, s.test):
        assert part == sorted(part) and all(type(i) is int for i in part)


def test_json_round_trip(tmp_path):
    s = make_split(20, 3, 4, 0.25, seed=5)
    path = tmp_path / "split.json"
    write_split(s, path)
    assert read_split(path) == s
    assert json.loads(path.read_text()) == s.to_dict()
    assert Split.from_dict(s.to_dict()) == s


def test_zero_val_and_test():
    s = make_split(4, 0, 0, 0.5)
    assert s.val == [] and s.test == [] and len(s.labelled) == 2


@pytest.mark.parametrize(
    "args, word",
    [
        ((0, 1, 1, 0.5), "n_train"),
        ((10, -1, 1, 0.5), "n_val"),
        ((10, 1, -2, 0.5), "n_test"),
        ((10, 1, 1, 0.0), "labelled_fraction"),
        ((10, 1, 1, 1.5), "labelled_fraction"),
        ((10, 1, 1, float("nan")), "labelled_fraction"),
        ((10, 1, 1, 0.5, 11), "labelled_count"),
        ((10, 1, 1, 0.5, -1), "labelled_count"),
        ((10, 1, 1, 0.5, 0, -3), "seed"),
    ],
)
def test_impossible_arguments_raise(args, word):
    with pytest.raises(ValueError, match=word):
        make_split(*args)


@pytest.mark.parametrize(
    "data, word",
    [
        ({"labelled": [0], "unlabelled": [1], "val": [2]}, "missing"),
        ({"labelled": [0], "unlabelled": [1], "val": [2], "test": [3], "extra": []}, "unknown"),
        ({"labelled": [0, 1], "unlabelled": [1], "val": [], "test": []}, "both"),
        ({"labelled": [-1], "unlabelled": [], "val": [], "test": []}, "labelled"),
        ({"labelled": ["a"], "unlabelled": [], "val": [], "test": []}, "labelled"),
    ],
)
def test_from_dict_rejects_bad_data(data, word):
    with pytest.raises(ValueError, match=word):
        Split.from_dict(data)


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_split(bad)
    with pytest.raises(ValueError, match="missing.json"):
        read_split(tmp_path / "missing.json")
