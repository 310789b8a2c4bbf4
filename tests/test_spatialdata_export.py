"""Predictions as a SpatialData for the ecosystem: the table as given, linked to images and circles, written as zarr."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import histo2expr as hx


@pytest.fixture(scope="module")
def predicted():
    """Spots of two synthetic slides with 'predicted' values in X and a record in uns, as any tool may store them."""
    adata = hx.datasets.synthetic(n_slides=2, spots_per_side=5, n_genes=6, seed=3)
    adata.X = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=np.float32) / 2
    adata.layers["some_prediction"] = adata.X * 3
    adata.uns["my_prediction"] = {"method": "ridge", "genes": list(adata.var_names)}
    return adata


def test_table_is_the_given_anndata_annotating_the_circles(predicted):
    before = predicted.copy()
    sdata = hx.io.to_spatialdata(predicted)
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.X, predicted.X)
    np.testing.assert_array_equal(table.layers["some_prediction"], predicted.layers["some_prediction"])
    assert table.uns["my_prediction"]["method"] == "ridge"
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region_key"], attrs["instance_key"]) == ("region", "spot_id")
    assert sorted(attrs["region"]) == ["S1_spots", "S2_spots"]
    provenance = table.uns["histo2expr_to_spatialdata"]
    assert provenance["histo2expr_version"] == hx.__version__
    assert provenance["regions"] == {"S1": "S1_spots", "S2": "S2_spots"}
    assert provenance["images"] == {"S1": "S1_image", "S2": "S2_image"}
    s2 = table.obs["region"] == "S2_spots"
    assert (table.obs.loc[s2, "spot_id"] == np.arange(int(s2.sum()))).all()
    # the caller's AnnData is untouched
    assert list(predicted.obs.columns) == list(before.obs.columns) and set(predicted.uns) == set(before.uns)
    # a table taken from a SpatialData converts again (its old annotation is replaced)
    again = hx.io.to_spatialdata(table)
    assert again.tables["table"].uns["spatialdata_attrs"]["region"] == attrs["region"]


def test_written_zarr_reads_back_with_its_links(predicted, tmp_path):
    import spatialdata

    sdata = hx.io.to_spatialdata(predicted)
    sdata.write(tmp_path / "predictions.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # spatialdata validates the table while elements load
        back = spatialdata.read_zarr(tmp_path / "predictions.zarr")
    assert set(back.images) == {"S1_image", "S2_image"} and set(back.shapes) == {"S1_spots", "S2_spots"}
    table = back.tables["table"]
    assert table.uns["histo2expr_to_spatialdata"]["slide_key"] == "slide"
    np.testing.assert_allclose(table.X, predicted.X)
    circles = back.shapes["S1_spots"]
    s1 = (table.obs["region"] == "S1_spots").to_numpy()
    np.testing.assert_allclose(
        np.column_stack([circles.geometry.x, circles.geometry.y])[table.obs["spot_id"].to_numpy()[s1]],
        predicted.obsm["spatial"][s1],
    )


def test_spatialdata_plot_colours_the_spots_by_a_predicted_gene(predicted):
    pytest.importorskip("spatialdata_plot", reason="spatialdata-plot draws SpatialData objects")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sdata = hx.io.to_spatialdata(predicted)
    gene = predicted.var_names[0]
    fig, ax = plt.subplots()
    sdata.pl.render_images("S1_image").pl.render_shapes("S1_spots", color=gene, table_name="table").pl.show(
        coordinate_systems="S1", ax=ax
    )
    assert ax.collections, "the spots were not drawn"
    plt.close(fig)
