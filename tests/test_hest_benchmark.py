"""The HEST-Benchmark protocol: gene rule, targets, the ridge probe, the fold-pooled score, `--protocol hest`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse

from histo2expr import cli
from histo2expr._hest_benchmark import hest_fold_pearson, hest_genes, hest_log_expression
from histo2expr.metrics import gene_pcc
from histo2expr.models import HESTProbeMethod, SpotSet, TrainConfig
from histo2expr.models.scaling import Standardizer


def _two_slides(rng: np.random.Generator) -> AnnData:
    """60 spots on two slides, 80 genes of varied mean and dispersion; the most variable ones are controls
    (BLANK_*, *Control*) or RARE (in 3 % of slide B's spots): HEST's rule must skip them."""
    n_genes, n = 80, 60
    means = rng.uniform(1, 30, n_genes)
    burst = rng.uniform(0, 1, n_genes)  # share of spots with a 10x burst: dispersion varies per gene
    counts = rng.poisson(means * np.where(rng.uniform(size=(n, n_genes)) < burst, 10, 1))
    names = [f"GENE{j:02d}" for j in range(n_genes)]
    for j, name in ((0, "BLANK_0001"), (1, "NegControlProbe_7"), (2, "RARE")):
        names[j] = name
        counts[:, j] = rng.poisson(np.where(rng.uniform(size=n) < 0.5, 300, 1))
    counts[30:, 2] = 0
    counts[30, 2] = 300  # RARE: 1 of the 30 spots of slide B (< 10 %)
    adata = AnnData(sparse.csr_matrix(counts.astype(np.float32)), var=pd.DataFrame(index=names))
    adata.obs["slide"] = pd.Categorical(["A"] * 30 + ["B"] * 30)
    return adata


def test_hest_gene_rule(rng):
    import scanpy as sc

    adata = _two_slides(rng)
    genes = hest_genes(adata, 10)
    assert len(genes) == 10 and genes == sorted(genes)
    assert not {"BLANK_0001", "NegControlProbe_7", "RARE"} & set(genes)
    # The definition: scanpy's Seurat-flavoured highly variable genes of log1p counts, over the eligible genes.
    eligible = sorted(g for g in adata.var_names if g.startswith("GENE"))
    stacked = adata[:, eligible].copy()
    sc.pp.log1p(stacked)
    sc.pp.highly_variable_genes(stacked, n_top_genes=10)
    assert genes == list(stacked.var_names[stacked.var["highly_variable"]])
    with pytest.raises(ValueError, match="Only 77 genes are detected"):
        hest_genes(adata, 78)


def test_hest_targets_are_log1p_counts_without_depth_normalisation(rng):
    adata = _two_slides(rng)
    counts = adata.X.toarray()
    hest_log_expression(adata)
    np.testing.assert_allclose(adata.X.toarray(), np.log1p(counts), rtol=1e-6)
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), counts)
    assert adata.uns["log1p"] == {"base": None}


def test_hest_probe_has_hest_pearson_on_standardised_targets(rng):
    """Fitting on fit_histo2expr's standardised targets gives HEST's per-gene Pearson (raw targets, no intercept)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    features = rng.normal(size=(300, 40))
    weights = rng.normal(size=(40, 6))
    raw = np.log1p(rng.poisson(np.exp(0.3 * features @ weights / 6 + 1.5)))
    train, test = np.arange(220), np.arange(220, 300)
    scaler = Standardizer(floor_ratio=0.01, clip=None).fit(raw[train])
    probe = HESTProbeMethod(n_components=20)

    def spots(index, targets=None):
        return SpotSet(
            coords=np.zeros((len(index), 2)),
            groups=np.array(["s"] * len(index)),
            features=features[index],
            targets=targets,
        )

    report = probe.fit(spots(train, scaler.transform(raw[train])), None, TrainConfig(seed=1))
    ours = scaler.inverse_transform(probe.predict(spots(test)))
    pipe = Pipeline([("scaler", StandardScaler()), ("pca", PCA(n_components=20, random_state=1))])
    projected_train = pipe.fit_transform(features[train])
    alpha = 100 / (projected_train.shape[1] * raw.shape[1])
    assert report.notes["alpha"] == pytest.approx(alpha)
    reference = Ridge(solver="lsqr", alpha=alpha, fit_intercept=False, max_iter=1000, random_state=1)
    hest = reference.fit(projected_train, raw[train]).predict(pipe.transform(features[test]))
    # equal but for lsqr stopping at its relative tolerance (1e-4) on differently scaled targets
    np.testing.assert_allclose(gene_pcc(raw[test], ours), gene_pcc(raw[test], hest), atol=1e-3)
    assert np.nanmean(gene_pcc(raw[test], ours)) > 0.2  # it learns
    rebuilt = HESTProbeMethod.from_state_dict(probe.state_dict())
    np.testing.assert_array_equal(rebuilt.predict(spots(test)), probe.predict(spots(test)))


def test_hest_fold_pearson_pools_the_spots_of_a_fold(rng):
    truth = rng.normal(size=(40, 3))
    predicted = truth + rng.normal(scale=1.0, size=truth.shape)
    adata = AnnData(truth.astype(np.float32), var=pd.DataFrame(index=["a", "b", "c"]))
    adata.obsm["m"] = pd.DataFrame(
        predicted.astype(np.float32), index=adata.obs_names, columns=["a", "b", "c"]
    )
    adata.uns["m"] = {"kind": "cross_validation", "params": {}, "genes": ["a", "b", "c"]}
    adata.obs["m_fold"] = pd.Categorical(["P1"] * 25 + ["P2"] * 15)
    scores = hest_fold_pearson(adata, "m", ["c", "a"])
    assert scores["fold"].tolist() == ["P1", "P2"] and scores["n_spots"].tolist() == [25, 15]
    expected = np.mean(gene_pcc(truth[:25][:, [2, 0]], predicted[:25][:, [2, 0]]))
    assert scores.loc[0, "pearson_mean"] == pytest.approx(expected, rel=1e-5)


def test_benchmark_hest_protocol_end_to_end(hest_folder, tmp_path, capsys):
    argv = ["benchmark", "--data", str(hest_folder), "--protocol", "hest", "--methods", "hest_ridge,ridge"]
    argv += [
        "--encoder",
        "colour_texture",
        "--patch-size",
        "16",
        "--genes",
        "2",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    settings = results["settings"]
    assert (settings["reader"], settings["protocol"], settings["cv"]) == (
        "auto",
        "hest",
        "leave_one_patient_out",
    )
    assert settings["patch_mpp"] == 0.5 and len(settings["genes"]) == 2
    assert settings["embedding"] == {  # each patch once, alone, as HEST embeds
        "tta": 1,
        "context": None,
        "neighbours": None,
        "stain_normalization": None,
    }
    assert set(results["hest_pearson"]) == {"hest_ridge", "ridge"}
    folds = [row["fold"] for row in results["hest_pearson"]["hest_ridge"]]
    assert sorted(folds) == ["Study A | P1", "Study B | patient unknown"]  # patients held out, not slides
    markdown = (tmp_path / "results.md").read_text()
    assert "## HEST-Benchmark score" in markdown and "HEST-Benchmark's 2 highly variable genes" in markdown


def test_benchmark_hest_protocol_refuses_slide_folds(hest_folder, tmp_path, capsys):
    argv = ["benchmark", "--data", str(hest_folder), "--protocol", "hest", "--cv", "leave_one_slide_out"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert "--protocol hest holds out one patient at a time" in capsys.readouterr().err
