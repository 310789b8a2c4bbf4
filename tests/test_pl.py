"""Plots read what `hx.tl` wrote: their artists carry the stored metrics, and their images match references.

Reference images live in tests/baseline_images/ (text hidden, low resolution, so fonts do not matter).
Regenerate them after an intended change of a plot with

    HISTO2EXPR_REGENERATE_BASELINES=1 python -m pytest tests/test_pl.py -k baseline

which writes the new references and skips the comparisons; look at them before committing.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PatchCollection
from matplotlib.testing.compare import compare_images
from matplotlib.text import Text

import histo2expr as hx
from histo2expr import metrics

BASELINES = Path(__file__).resolve().parent / "baseline_images"
REGENERATE = os.environ.get("HISTO2EXPR_REGENERATE_BASELINES") == "1"
KEYS = ["histo2expr", "pca"]


@pytest.fixture(scope="module")
def fitted():
    """Three tiny synthetic slides, colour-texture features, ridge cross-validated under two keys."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=6, n_genes=24)
        hx.pp.normalize(adata)
        # single-view features without neighbours: the reference images were drawn from them
        hx.tl.embed_patches(
            adata, encoder="colour_texture", patch_size=32, tta=1, neighbours=None, progress=False
        )
        model = hx.tl.fit_histo2expr(
            adata, method="ridge", genes=10, cv="leave_one_slide_out", progress=False
        )
        hx.tl.fit_histo2expr(
            adata,
            method="ridge",
            genes=10,
            cv="leave_one_slide_out",
            progress=False,
            key_added="pca",
            n_components=3,
        )
    finally:
        torch.set_num_threads(threads)
    return adata, model


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def slide_arrays(adata, key, slide):
    """Measured and predicted expression of the genes the fold of ``slide`` predicted."""
    spots = (adata.obs["slide"] == slide).to_numpy()
    predicted = hx.get.predictions(adata, key)[spots].dropna(axis=1)
    return adata[spots, predicted.columns].X.toarray(), predicted.to_numpy(), predicted.columns


def spot_panels(fig):
    """The axes with spots (not the colour bars)."""
    return [ax for ax in fig.axes if any(isinstance(c, PatchCollection) for c in ax.collections)]


def spot_centres(collection):
    """Centres of the discs squidpy drew, in data coordinates."""
    return np.array([path.get_extents().get_points().mean(axis=0) for path in collection.get_paths()])


def box_stats(ax):
    """(centre, q1, median, q3) of every box, left to right."""
    stats = []
    for box in ax.patches:
        x, y = box.get_path().vertices.T
        left, right = x.min(), x.max()
        medians = [
            line.get_ydata()[0]
            for line in ax.lines
            if len(line.get_xdata()) == 2
            and np.allclose(line.get_xdata(), [left, right])
            and np.ptp(line.get_ydata()) == 0
        ]
        stats.append(((left + right) / 2, y.min(), medians[0], y.max()))
    return sorted(stats)


def test_matplotlib_is_imported_inside_functions_only():
    """`import histo2expr` imports hx.pl; it must not pull in matplotlib."""
    for module in (Path(hx.pl.__file__).parent).glob("*.py"):
        top_level = ast.parse(module.read_text(encoding="utf-8")).body
        imported = [
            name
            for node in top_level
            if isinstance(node, ast.Import | ast.ImportFrom)
            for name in (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            )
        ]
        assert not [name for name in imported if name.startswith("matplotlib")], module.name


def test_boxplot_boxes_are_the_stored_gene_pccs(fitted):
    adata, _ = fitted
    ax = hx.pl.gene_pcc_boxplot(adata, show=False)
    table = adata.uns["histo2expr"]["gene_pcc"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["S1", "S2", "S3"]
    for (_, q1, median, q3), slide in zip(box_stats(ax), table.columns, strict=True):
        values = table[slide].dropna()
        np.testing.assert_allclose([q1, median, q3], np.percentile(values, [25, 50, 75]))
    genes = list(table.index[:4])
    ax = hx.pl.gene_pcc_boxplot(adata, genes=genes, slides=["S2"], show=False)
    ((_, q1, median, q3),) = box_stats(ax)
    np.testing.assert_allclose([q1, median, q3], np.percentile(table.loc[genes, "S2"], [25, 50, 75]))


def test_boxplot_puts_methods_side_by_side(fitted):
    adata, _ = fitted
    ax = hx.pl.gene_pcc_boxplot(adata, key=KEYS, show=False)
    stats = box_stats(ax)
    assert len(stats) == 6
    np.testing.assert_allclose([s[0] for s in stats], [-0.2, 0.2, 0.8, 1.2, 1.8, 2.2])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == KEYS
    colours = {tuple(p.get_facecolor()) for p in ax.patches}
    assert len(colours) == 2
    pca = adata.uns["pca"]["gene_pcc"]["S3"].dropna()
    assert stats[5][2] == pytest.approx(np.median(pca))


def test_heg_curve_lines_are_pcc_heg_at_k(fitted):
    adata, _ = fitted
    ks = (2, 5, 10)
    ax = hx.pl.heg_curve(adata, key=KEYS, ks=ks, show=False)
    assert [line.get_label() for line in ax.lines] == KEYS
    for line, key in zip(ax.lines, KEYS, strict=True):
        expected = [
            np.mean([metrics.pcc_top(*slide_arrays(adata, key, s)[:2], k) for s in ("S1", "S2", "S3")])
            for k in ks
        ]
        np.testing.assert_array_equal(line.get_xdata(), ks)
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-5)
        # K = all 10 genes: the stored PCC(HEG@50), which uses all genes when there are fewer than 50
        assert line.get_ydata()[-1] == pytest.approx(adata.uns[key]["folds"]["pcc_heg50"].mean())


def test_heg_curve_caps_k_at_the_number_of_genes_predicted(fitted):
    adata, _ = fitted
    with pytest.warns(UserWarning, match=r"K = \[50, 100\] exceed the 10 genes"):
        ax = hx.pl.heg_curve(adata, ks=(5, 50, 100), show=False)
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [5])
    default = hx.pl.heg_curve(adata, show=False)  # 50, 100, 150, 200 all exceed 10 genes: K = 10 alone
    np.testing.assert_array_equal(default.lines[0].get_xdata(), [10])
    assert "leave-one-slide-out" in default.get_title()


def test_spatial_expression_shares_the_colour_scale_and_titles_the_pcc(fitted):
    adata, _ = fitted
    genes = list(adata.uns["histo2expr"]["gene_pcc"].index[:2])
    fig = hx.pl.spatial_expression(adata, genes, slide="S2", return_fig=True)
    panels = spot_panels(fig)
    assert len(panels) == 4
    truth, predicted, names = slide_arrays(adata, "histo2expr", "S2")
    scale = adata.uns["spatial"]["S2"]["scalefactors"]["tissue_hires_scalef"]
    spots = (adata.obs["slide"] == "S2").to_numpy()
    for row, gene in enumerate(genes):
        column = list(names).index(gene)
        measured, prediction = (panels[2 * row + i].collections[0] for i in (0, 1))
        assert isinstance(measured, PatchCollection)
        np.testing.assert_allclose(measured.get_array(), truth[:, column], rtol=1e-6)
        np.testing.assert_allclose(prediction.get_array(), predicted[:, column], rtol=1e-6)
        both = np.concatenate([truth[:, column], predicted[:, column]])
        assert (
            measured.get_clim() == prediction.get_clim() == pytest.approx(tuple(np.percentile(both, [1, 99])))
        )
        np.testing.assert_allclose(spot_centres(measured), adata.obsm["spatial"][spots] * scale, atol=1e-6)
        pcc = adata.uns["histo2expr"]["gene_pcc"].loc[gene, "S2"]
        assert f"PCC = {pcc:.3f}" in panels[2 * row + 1].get_title()
        assert gene in panels[2 * row].get_title()
    np.testing.assert_array_equal(
        panels[0].images[0].get_array(), adata.uns["spatial"]["S2"]["images"]["hires"]
    )


def test_spatial_expression_of_an_he_only_slide_shows_the_prediction(fitted):
    adata, model = fitted
    one_slide = adata[adata.obs["slide"] == "S1"]
    new = one_slide[:, :0].copy()
    del new.uns["log1p"]
    hx.tl.predict_expression(new, model)
    gene = model.genes[0]
    fig = hx.pl.spatial_expression(new, gene, key="histo2expr_pred", return_fig=True)
    (panel,) = spot_panels(fig)
    np.testing.assert_allclose(panel.collections[0].get_array(), new.obsm["histo2expr_pred"][gene])
    assert "predicted" in panel.get_title() and "PCC" not in panel.get_title()
    with pytest.raises(ValueError, match="measured expression"):
        hx.pl.gene_corr_heatmap(new, key="histo2expr_pred", show=False)


def test_spatial_expression_takes_colour_limits_and_axes(fitted):
    adata, _ = fitted
    genes = list(adata.uns["histo2expr"]["gene_pcc"].index[:2])
    _, grid = plt.subplots(2, 2)
    returned = hx.pl.spatial_expression(adata, genes, slide="S1", vmin=0.5, vmax="p90", ax=grid)
    assert returned == list(grid.ravel())  # drawn into the given axes: returned, not shown
    truth, predicted, names = slide_arrays(adata, "histo2expr", "S1")
    column = list(names).index(genes[0])
    both = np.concatenate([truth[:, column], predicted[:, column]])
    assert grid[0, 0].collections[0].get_clim() == pytest.approx((0.5, np.percentile(both, 90)))
    with pytest.raises(ValueError, match="4 panels"):
        hx.pl.spatial_expression(adata, genes, slide="S1", ax=grid[0])
    with pytest.raises(ValueError, match="percentile such as 'p1'"):
        hx.pl.spatial_expression(adata, genes, slide="S1", vmax="q99", show=False)


def test_spatial_expression_needs_a_slide_and_a_predicted_gene(fitted):
    adata, _ = fitted
    gene = adata.uns["histo2expr"]["gene_pcc"].index[0]
    with pytest.raises(ValueError, match=r"pass `slide=`"):
        hx.pl.spatial_expression(adata, gene, show=False)
    with pytest.raises(KeyError, match="not a slide"):
        hx.pl.spatial_expression(adata, gene, slide="S9", show=False)
    unpredicted = next(g for g in adata.var_names if g not in adata.uns["histo2expr"]["gene_pcc"].index)
    with pytest.raises(KeyError, match="not among the genes of 'histo2expr'"):
        hx.pl.spatial_expression(adata, unpredicted, slide="S1", show=False)


def test_gene_corr_heatmap_orders_by_the_truth_and_titles_the_agreement(fitted):
    adata, _ = fitted
    fig = hx.pl.gene_corr_heatmap(adata, slide="S1", n_top=50, return_fig=True)
    left, right = (ax for ax in fig.axes if ax.images)
    truth, predicted, names = slide_arrays(adata, "histo2expr", "S1")
    order = [list(names).index(t.get_text()) for t in left.get_xticklabels()]
    assert sorted(order) == list(range(len(names)))
    np.testing.assert_allclose(
        left.images[0].get_array(), np.corrcoef(truth[:, order], rowvar=False), atol=1e-6
    )
    np.testing.assert_allclose(right.images[0].get_array(), np.corrcoef(predicted[:, order], rowvar=False))
    assert left.images[0].get_clim() == right.images[0].get_clim() == (-1.0, 1.0)
    stored = adata.uns["histo2expr"]["folds"].set_index("slide").loc["S1", "gene_corr_agreement"]
    assert f"agreement r = {stored:.3f}" in fig.get_suptitle()
    # clustering puts the most correlated pair of measured genes next to each other
    corr = np.corrcoef(truth[:, order], rowvar=False)
    i, j = np.unravel_index(np.argmax(corr - 2 * np.eye(len(order))), corr.shape)
    assert abs(i - j) == 1


def test_gene_corr_heatmap_takes_the_most_expressed_genes(fitted):
    adata, _ = fitted
    fig = hx.pl.gene_corr_heatmap(adata, n_top=4, return_fig=True)
    shown = {t.get_text() for t in fig.axes[0].get_xticklabels()}
    everywhere = hx.get.predictions(adata, "histo2expr").dropna(axis=1).columns
    expected = {everywhere[i] for i in metrics.top_genes(adata[:, everywhere].X.toarray(), 4)}
    assert shown == expected
    assert "all spots" in fig.get_suptitle()


def test_compare_methods_bars_are_the_fold_metrics(fitted):
    adata, _ = fitted
    ax = hx.pl.compare_methods(adata, key=KEYS, metric="pcc_hvg50", show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["S1", "S2", "S3", "mean"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == KEYS
    for container, key in zip(ax.containers, KEYS, strict=True):
        folds = adata.uns[key]["folds"]["pcc_hvg50"]
        heights = [bar.get_height() for bar in container]
        np.testing.assert_allclose(heights, [*folds, folds.mean()])
    with pytest.raises(KeyError, match="pcc_acg"):
        hx.pl.compare_methods(adata, key=KEYS, metric="pcc_heg999", show=False)


def test_unfitted_keys_and_fits_without_metrics_are_refused(fitted):
    adata, _ = fitted
    with pytest.raises(KeyError, match=r"never fitted.*'histo2expr', 'pca'.*fit_histo2expr"):
        hx.pl.gene_pcc_boxplot(adata, key="stnet", show=False)
    with pytest.raises(KeyError, match="not among the genes"):
        hx.pl.gene_pcc_boxplot(adata, genes=["NOTAGENE"], show=False)
    with pytest.raises(KeyError, match="not among the held-out slides"):
        hx.pl.heg_curve(adata, slides=["S7"], show=False)
    no_cv = adata.copy()
    hx.tl.fit_histo2expr(no_cv, method="ridge", genes=5, key_added="final", progress=False)
    for plot in (hx.pl.gene_pcc_boxplot, hx.pl.heg_curve):
        with pytest.raises(KeyError, match=r"cv="):
            plot(no_cv, key="final", show=False)
    with pytest.raises(KeyError, match=r"no 'folds'"):
        hx.pl.compare_methods(no_cv, key=["histo2expr", "final"], show=False)
    with pytest.raises(KeyError, match=r"no predictions"):
        hx.pl.spatial_expression(no_cv, no_cv.uns["final"]["genes"][0], key="final", slide="S1", show=False)


def test_show_and_ax_follow_scanpy(fitted):
    adata, _ = fitted
    _, (left, right) = plt.subplots(1, 2)
    assert hx.pl.heg_curve(adata, ks=(2, 4), ax=left) is left  # drawing into given axes: not shown
    assert hx.pl.compare_methods(adata, key=KEYS, ax=right, show=True) is None
    assert "leave-one-slide-out" in right.get_title()
    open_before = plt.get_fignums()
    assert hx.pl.gene_corr_heatmap(adata, n_top=5, show=True) is None
    assert plt.get_fignums() == open_before  # its own figure, shown, then closed
    _, pair = plt.subplots(1, 2)
    assert hx.pl.gene_corr_heatmap(adata, n_top=5, ax=pair) == list(pair)
    fig = hx.pl.heg_curve(adata, ks=(2, 4), return_fig=True)  # a Figure is returned, not shown
    assert fig is plt.gcf() and fig.axes[0].lines
    assert hx.pl.gene_pcc_boxplot(adata, show=False).figure in map(plt.figure, plt.get_fignums())


@pytest.fixture
def figdir(tmp_path):
    """scanpy's figure folder and format, set for one test."""
    import scanpy as sc

    before = sc.settings.figdir, sc.settings.file_format_figs
    sc.settings.figdir, sc.settings.file_format_figs = tmp_path / "figures", "png"
    yield tmp_path / "figures"
    sc.settings.figdir, sc.settings.file_format_figs = before


@pytest.mark.parametrize(
    ("save", "name"),
    [
        (True, "gene_pcc_boxplot.png"),
        ("_pca.pdf", "gene_pcc_boxplot_pca.pdf"),
        ("_two", "gene_pcc_boxplot_two.png"),
    ],
)
def test_save_follows_scanpy(fitted, figdir, tmp_path, save, name):
    adata, _ = fitted
    assert hx.pl.gene_pcc_boxplot(adata, key=KEYS, save=save) is None  # saved, then shown
    assert [p.name for p in figdir.iterdir()] == [name]
    assert (figdir / name).stat().st_size > 0
    with pytest.raises(TypeError, match="`save` must be True"):
        hx.pl.heg_curve(adata, save=tmp_path / "x.png", show=False)


def test_save_run_figures_writes_pngs_and_closes_them(fitted, tmp_path):
    adata, _ = fitted
    open_before = plt.get_fignums()
    paths = hx.pl.save_run_figures(adata, KEYS, tmp_path / "figures", ks=(2, 4), dpi=40)
    assert [p.name for p in paths] == ["gene_pcc_boxplot.png", "heg_curve.png", "compare_methods.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == open_before
    assert [p.name for p in hx.pl.save_run_figures(adata, "pca", tmp_path, ks=(2,), dpi=40)] == [
        "gene_pcc_boxplot.png",
        "heg_curve.png",
    ]


BASELINE_PLOTS = {
    "gene_pcc_boxplot": lambda adata: hx.pl.gene_pcc_boxplot(adata, key=KEYS, return_fig=True),
    "spatial_expression": lambda adata: hx.pl.spatial_expression(
        adata, list(adata.uns["histo2expr"]["gene_pcc"].index[:1]), slide="S3", return_fig=True
    ),
    "gene_corr_heatmap": lambda adata: hx.pl.gene_corr_heatmap(adata, slide="S2", return_fig=True),
}


@pytest.mark.parametrize("name", list(BASELINE_PLOTS))
def test_baseline_image(fitted, name, tmp_path):
    adata, _ = fitted
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "text.hinting": "none"}):
        fig = BASELINE_PLOTS[name](adata)
        for text in fig.findobj(Text):
            text.set_visible(False)
        actual = tmp_path / f"{name}.png"
        fig.savefig(actual, dpi=30)
    expected = BASELINES / f"{name}.png"
    if REGENERATE:
        shutil.copyfile(actual, expected)
        pytest.skip(f"regenerated {expected}")
    assert compare_images(str(expected), str(actual), tol=5) is None
