import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from histo2expr import splits


@pytest.fixture
def cohort():
    slides = np.repeat(["A1", "A2", "B1", "C1", "C2", "C3"], 5)
    patients = np.array([s[0] for s in slides])
    obs = pd.DataFrame({"slide": slides, "patient": patients}, index=[f"spot{i}" for i in range(len(slides))])
    return AnnData(np.zeros((len(slides), 2)), obs=obs)


def _check_no_group_on_both_sides(folds, labels):
    for fold in folds:
        assert not set(labels[fold.train]) & set(labels[fold.test])
        assert len(fold.train) + len(fold.test) == len(labels)


def test_leave_one_slide_out(cohort):
    folds = splits.make_folds(cohort, "leave_one_slide_out")
    assert [f.name for f in folds] == ["A1", "A2", "B1", "C1", "C2", "C3"]
    _check_no_group_on_both_sides(folds, cohort.obs["slide"].to_numpy())


def test_leave_one_patient_out_keeps_serial_sections_together(cohort):
    folds = splits.make_folds(cohort, "leave_one_patient_out", patient_key="patient")
    assert [f.name for f in folds] == ["A", "B", "C"]
    _check_no_group_on_both_sides(folds, cohort.obs["patient"].to_numpy())
    _check_no_group_on_both_sides(folds, cohort.obs["slide"].to_numpy())


def test_leave_one_group_out_holds_groups_out_in_order_of_appearance():
    """scikit-learn's LeaveOneGroupOut, with the folds the hand-written splits gave: same order, same spots."""
    labels = np.array(["s9", "s2", "s9", "s10", "s2", "s2", "s1", "s10"])
    folds = splits.leave_one_slide_out(labels)
    expected = list(dict.fromkeys(labels))  # s9, s2, s10, s1: not sorted
    assert [f.name for f in folds] == expected
    for fold, group in zip(folds, expected, strict=True):
        np.testing.assert_array_equal(fold.test, np.flatnonzero(labels == group))
        np.testing.assert_array_equal(fold.train, np.flatnonzero(labels != group))


def test_grouped_kfold_is_sklearns_shuffled_group_kfold():
    labels = np.repeat([f"g{i}" for i in range(7)], 3)
    folds = splits.grouped_kfold(labels, 3, seed=4)
    held = [sorted(set(labels[f.test])) for f in folds]
    assert sorted(len(h) for h in held) == [2, 2, 3]  # whole groups, dealt as evenly as they go
    assert sorted(g for h in held for g in h) == sorted(set(labels))
    assert [f.name for f in folds] == ["+".join(h) for h in held]
    again = splits.grouped_kfold(labels, 3, seed=4)
    assert all(np.array_equal(f.test, g.test) for f, g in zip(folds, again, strict=True))
    assert any(
        not np.array_equal(f.test, g.test)
        for f, g in zip(folds, splits.grouped_kfold(labels, 3, seed=5), strict=True)
    )


@pytest.mark.parametrize("n_splits", [2, 3, 6])
def test_grouped_kfold_covers_every_spot_once(cohort, n_splits):
    folds = splits.make_folds(cohort, n_splits, seed=1)
    assert len(folds) == n_splits
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(cohort.n_obs))
    _check_no_group_on_both_sides(folds, cohort.obs["slide"].to_numpy())


def test_grouped_kfold_by_patient(cohort):
    folds = splits.make_folds(cohort, 2, patient_key="patient")
    _check_no_group_on_both_sides(folds, cohort.obs["patient"].to_numpy())


def test_single_slide_is_refused_with_the_fix():
    adata = AnnData(np.zeros((4, 1)), obs=pd.DataFrame({"slide": ["s"] * 4}, index=list("abcd")))
    with pytest.raises(ValueError, match=r"at least two slides.*cv=None"):
        splits.make_folds(adata, "leave_one_slide_out")


def test_bad_cv_arguments(cohort):
    with pytest.raises(KeyError, match="not a column"):
        splits.make_folds(cohort, "leave_one_slide_out", slide_key="section")
    with pytest.raises(ValueError, match="patient_key"):
        splits.make_folds(cohort, "leave_one_patient_out")
    with pytest.raises(ValueError, match="between 2"):
        splits.make_folds(cohort, 7)
    with pytest.raises(ValueError, match="must be"):
        splits.make_folds(cohort, "random")


def test_check_disjoint_catches_leaks():
    labels = np.array(["a", "a", "b"])
    with pytest.raises(ValueError, match="leak"):
        splits.check_disjoint(labels, splits.Fold("x", np.array([0, 2]), np.array([1])))


def test_inner_validation_split_by_slide_and_by_spot():
    groups = np.repeat(["a", "b", "c", "d", "e"], 4)
    fit, valid, how = splits.inner_validation_split(groups, seed=3)
    assert how == "by slide"
    assert len(set(groups[valid])) == 1 and not set(groups[fit]) & set(groups[valid])
    fit, valid, how = splits.inner_validation_split(np.repeat("a", 10), fraction=0.3)
    assert how == "by spot" and len(valid) == 3 and len(fit) == 7
    assert not set(fit) & set(valid)
    again = splits.inner_validation_split(groups, seed=3)
    assert np.array_equal(again[1], splits.inner_validation_split(groups, seed=3)[1])
