import numpy as np
import pandas as pd
import pytest
from scipy import stats

from histo2expr import metrics


def test_gene_pcc_equals_scipy(rng):
    y_true = rng.normal(size=(60, 15))
    y_pred = y_true * rng.normal(size=15) + rng.normal(size=(60, 15))
    expected = [stats.pearsonr(y_true[:, g], y_pred[:, g])[0] for g in range(15)]
    np.testing.assert_allclose(metrics.gene_pcc(y_true, y_pred), expected, atol=1e-6)


def test_constant_genes_are_nan_excluded_and_counted(rng):
    y_true = rng.normal(size=(30, 5))
    y_pred = y_true + rng.normal(scale=0.5, size=(30, 5))
    y_true[:, 1] = 3.0  # constant truth
    y_pred[:, 3] = -1.0  # constant prediction
    pcc = metrics.gene_pcc(y_true, y_pred)
    assert np.isnan(pcc[[1, 3]]).all() and np.isfinite(pcc[[0, 2, 4]]).all()
    assert metrics.pcc_acg(y_true, y_pred) == pytest.approx(np.mean(pcc[[0, 2, 4]]))
    result = metrics.evaluate_slide(y_true, y_pred, ks=(2,))
    assert result["n_nan_genes"] == 2


def test_all_constant_prediction_gives_nan_not_zero(rng):
    y_true = rng.normal(size=(20, 4))
    assert np.isnan(metrics.pcc_acg(y_true, np.zeros_like(y_true)))


def test_heg_and_hvg_choose_genes_by_truth_of_the_slide(rng):
    y_true = rng.normal(size=(50, 6))
    y_true[:, 4] += 10  # highest mean
    y_true[:, 2] *= 5  # highest variance
    assert metrics.top_genes(y_true, 1, by="mean").tolist() == [4]
    assert metrics.top_genes(y_true, 1, by="var").tolist() == [2]
    y_pred = rng.normal(size=(50, 6))
    expected = stats.pearsonr(y_true[:, 4], y_pred[:, 4])[0]
    assert metrics.pcc_top(y_true, y_pred, 1, by="mean") == pytest.approx(expected, abs=1e-6)
    assert metrics.pcc_top(y_true, y_pred, 100) == pytest.approx(metrics.pcc_acg(y_true, y_pred))


def test_mse_mae_and_standardised_space(rng):
    y_true = rng.normal(size=(10, 3))
    y_pred = y_true + 2.0
    assert metrics.mse(y_true, y_pred) == pytest.approx(4.0)
    assert metrics.mae(y_true, y_pred) == pytest.approx(2.0)
    result = metrics.evaluate_slide(y_true, y_pred, mean=np.zeros(3), std=np.full(3, 2.0), ks=(2,))
    assert result["mse"] == pytest.approx(1.0) and result["mse_log"] == pytest.approx(4.0)
    assert result["mae"] == pytest.approx(1.0) and result["mae_log"] == pytest.approx(2.0)
    assert {"pcc_heg2", "pcc_hvg2", "gene_corr_agreement", "n_spots"} <= set(result)


def test_gene_corr_agreement(rng):
    latent = rng.normal(size=(80, 2))
    y_true = latent @ rng.normal(size=(2, 8)) + 0.1 * rng.normal(size=(80, 8))
    assert metrics.gene_corr_agreement(y_true, 2 * y_true + 1) == pytest.approx(1.0)
    assert metrics.gene_corr_agreement(y_true, rng.normal(size=(80, 8))) < 0.6


def test_bad_input_is_refused(rng):
    with pytest.raises(ValueError, match="same shape"):
        metrics.gene_pcc(rng.normal(size=(5, 2)), rng.normal(size=(5, 3)))
    bad = rng.normal(size=(5, 2))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.pcc_acg(bad, bad)
    with pytest.raises(ValueError, match="'mean'"):
        metrics.top_genes(bad, 1, by="median")


def test_summarize_leaves_out_counts_and_nan_slides():
    folds = pd.DataFrame(
        {
            "slide": ["a", "b", "c"],
            "n_spots": [30, 40, 50],
            "pcc_acg": [0.2, np.nan, 0.4],
            "n_nan_genes": [0, 5, 1],
        }
    )
    summary = metrics.summarize(folds)
    assert list(summary.index) == ["pcc_acg"] and summary["pcc_acg"] == pytest.approx(0.3)


def test_summarize_leaves_out_small_slides_unless_all_are_small():
    folds = pd.DataFrame({"slide": ["a", "b", "c"], "n_spots": [2, 94, 19], "pcc_acg": [0.9, 0.3, -0.5]})
    assert list(metrics.counted_slides(folds)) == [False, True, False]
    assert metrics.summarize(folds)["pcc_acg"] == pytest.approx(0.3)  # the 2- and 19-spot slides do not count
    assert metrics.summarize(folds, min_spots=0)["pcc_acg"] == pytest.approx(np.mean([0.9, 0.3, -0.5]))
    tiny = folds.assign(n_spots=[2, 3, 4])
    assert metrics.summarize(tiny)["pcc_acg"] == pytest.approx(np.mean([0.9, 0.3, -0.5]))
    assert metrics.counted_slides(tiny).all()
    with pytest.raises(KeyError, match="n_spots"):
        metrics.counted_slides(folds.drop(columns="n_spots"))
