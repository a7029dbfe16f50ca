from __future__ import annotations

import json

import pytest

from cssl_ray.data.splits import Split, labelled_size, make_split, read_split, split_dataset, write_split


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


# ---------------------------------------------------------------------------------------------
# split_dataset: real datasets (fixed subsets, groups kept whole).


def chaos_like(patients: int = 20, slices: int = 5):
    groups = [f"p{p:02d}" for p in range(patients) for _ in range(slices)]
    return [None] * len(groups), groups, [True] * len(groups)


def test_groups_never_span_parts_and_fractions_carve_whole_patients():
    subsets, groups, has_mask = chaos_like()
    s, r = split_dataset(subsets, groups, has_mask, labelled_fraction=0.5, val_fraction=0.15, test_fraction=0.15,
                         labelled_by="group", seed=3)
    part_groups = {k: {groups[i] for i in getattr(s, k)} for k in ("labelled", "unlabelled", "val", "test")}
    assert len(part_groups["test"]) == 3 and len(part_groups["val"]) == 3  # 15% of 20 patients
    assert len(part_groups["labelled"]) == 7 and len(part_groups["unlabelled"]) == 7  # 50% of the 14 left
    names = list(part_groups)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not part_groups[names[a]] & part_groups[names[b]], (names[a], names[b])
    assert sorted(s.labelled + s.unlabelled + s.val + s.test) == list(range(100))
    assert sorted(r.carved_test_groups) == sorted(part_groups["test"]) and r.labelled_units == 14


def test_fixed_subsets_win_and_held_out_images_without_masks_are_excluded():
    subsets = ["train", "train", "train", "val", "test", "test", "test", None]
    groups = ["a", "a", "b", "a", "b", "c", "d", "e"]
    has_mask = [True, True, True, True, True, True, False, False]
    s, r = split_dataset(subsets, groups, has_mask, labelled_fraction=1.0, val_fraction=0.3, test_fraction=0.3)
    assert s.val == [3] and s.test == [4, 5]  # no carving: the distribution has val and test
    assert s.labelled == [0, 1, 2] and s.unlabelled == [7]  # an unmasked training image is D_U
    assert r.excluded == [6] and not r.carved_val_groups


def test_val_test_do_not_change_with_the_labelled_fraction_and_d_l_grows_as_a_prefix():
    subsets, groups, has_mask = chaos_like(patients=30, slices=2)
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=7)
    small, _ = split_dataset(subsets, groups, has_mask, labelled_fraction=0.1, **kw)
    large, _ = split_dataset(subsets, groups, has_mask, labelled_fraction=0.5, **kw)
    assert small.val == large.val and small.test == large.test
    assert set(small.labelled) < set(large.labelled)
    again, _ = split_dataset(subsets, groups, has_mask, labelled_fraction=0.1, **kw)
    other, _ = split_dataset(subsets, groups, has_mask, labelled_fraction=0.1, **{**kw, "seed": 8})
    assert again == small and other != small


def test_labelled_count_by_image_and_by_group():
    subsets, groups, has_mask = chaos_like(patients=10, slices=3)
    s, _ = split_dataset(subsets, groups, has_mask, labelled_fraction=0.5, labelled_count=4)
    assert len(s.labelled) == 4 and len(s.unlabelled) == 26
    g, _ = split_dataset(subsets, groups, has_mask, labelled_fraction=0.5, labelled_count=2, labelled_by="group")
    assert len(g.labelled) == 6 and len({groups[i] for i in g.labelled}) == 2


def test_duplicates_of_training_images_leave_val_and_test():
    subsets = ["train", "train", "test", "test", "val"]
    digests = ["x", "y", "x", "z", "y"]
    s, r = split_dataset(subsets, ["a", "b", "c", "d", "e"], [True] * 5, labelled_fraction=1.0, digests=digests)
    assert s.test == [3] and s.val == [] and r.duplicates_dropped == [2, 4]


def test_val_count_moves_training_images_to_a_fixed_val_before_d_l_is_drawn():
    """nuclei-like: 3 fixed val images, 30 training; val_count 8 moves 5 training images, seeded, and
    the same whatever the labelled count (its own stream)."""
    subsets = ["train"] * 30 + ["val"] * 3 + ["test"] * 5
    groups = [f"i{k}" for k in range(38)]
    few, r = split_dataset(subsets, groups, [True] * 38, labelled_fraction=1.0, labelled_count=3, val_count=8, seed=4)
    assert len(few.val) == 8 and set(range(30, 33)) < set(few.val) and len(few.labelled) == 3
    assert len(few.unlabelled) == 22 and few.test == list(range(33, 38)) and len(r.carved_val_groups) == 5
    every, _ = split_dataset(subsets, groups, [True] * 38, labelled_fraction=1.0, val_count=8, seed=4)
    assert every.val == few.val and len(every.labelled) == 25
    assert split_dataset(subsets, groups, [True] * 38, labelled_fraction=1.0, val_count=8, seed=5)[0].val != few.val
    assert split_dataset(subsets, groups, [True] * 38, labelled_fraction=1.0, val_count=2)[0].val == [30, 31, 32]
    tiny, _ = split_dataset(["train"] * 4, list("abcd"), [True] * 4, labelled_fraction=1.0, val_count=9)
    assert len(tiny.val) == 2 and len(tiny.labelled) == 2  # two groups stay for training


def test_too_few_groups_are_not_carved():
    s, r = split_dataset([None] * 4, ["a", "a", "b", "b"], [True] * 4, labelled_fraction=1.0, val_fraction=0.1,
                         test_fraction=0.1)
    assert s.val == [] and s.test == [] and not r.carved_val_groups


@pytest.mark.parametrize("kwargs, word", [
    ({"groups": ["a"]}, "one entry per row"),
    ({"labelled_count": 9}, "labelled_count \\(9\\) exceeds the 4 labelled images"),
    ({"labelled_fraction": 0.0}, "labelled_fraction"),
    ({"val_fraction": 0.7, "test_fraction": 0.4}, "val_fraction"),
    ({"labelled_by": "slice"}, "labelled_by"),
    ({"subsets": ["train", "holdout", None, None]}, "unknown names"),
    ({"has_mask": [False] * 4}, "no images with masks"),
])
def test_split_dataset_rejects_bad_arguments(kwargs, word):
    args = dict(subsets=[None] * 4, groups=["a", "b", "c", "d"], has_mask=[True] * 4, labelled_fraction=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        split_dataset(args.pop("subsets"), args.pop("groups"), args.pop("has_mask"), **args)
