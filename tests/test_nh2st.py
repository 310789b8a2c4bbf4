import math

import numpy as np
import pytest
import torch
from torch import nn

import histo2expr as hx
from histo2expr.metrics import pcc_acg
from histo2expr.models import nh2st as nh2st_module
from histo2expr.models.base import SpotSet, TrainConfig, concat_spots, get_method
from histo2expr.models.graphs import (
    GraphConvolutions,
    hypergraph_propagation,
    similarity_graph_propagation,
    similarity_hypergraph,
    spatial_knn,
)
from histo2expr.models.nh2st import CrossAttention

SMALL = {"embedding_dim": 16, "hidden": 16, "attention_tokens": 4, "n_neighbours": 4}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(**changes) -> TrainConfig:
    values = {"epochs": 6, "batch_size": 16, "lr": 3e-3, "patience": 5, "progress": False}
    return TrainConfig(**{**values, **changes})


def nh2st(**params):
    return get_method("nh2st")(**{**SMALL, **params})


def make_cohort():
    """Four slides on a square grid; smooth programmes drive features (with a slide shift) and expression.

    Returns fit spots (two slides), validation spots (a third) and test spots (the fourth).
    """
    rng = np.random.default_rng(0)
    d, g, side = 12, 6, 8
    loadings, profiles = rng.normal(size=(3, d)) * 2, rng.normal(size=(3, g))
    xx, yy = np.meshgrid(np.arange(side), np.arange(side))
    grid = np.c_[xx.ravel(), yy.ravel()].astype(float)
    slides = []
    for s in range(4):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        programmes = np.c_[
            np.sin(grid[:, 0] / 2 + phase[0]),
            np.cos(grid[:, 1] / 2 + phase[1]),
            np.sin(grid.sum(1) / 3 + phase[2]),
        ]
        features = programmes @ loadings + 0.3 * rng.normal(size=(len(grid), d)) + rng.normal(size=d) * 0.2
        targets = programmes @ profiles + 0.2 * rng.normal(size=(len(grid), g))
        slides.append(
            SpotSet(
                coords=grid * 150.0,  # the same pixel grid on every slide: only the slide keeps them apart
                groups=np.full(len(grid), f"s{s}"),
                features=features.astype(np.float32),
                targets=targets.astype(np.float32),
            )
        )
    train = concat_spots(slides[:2])
    mean, std = train.targets.mean(0), train.targets.std(0)
    for spots in slides:
        spots.targets = ((spots.targets - mean) / std).astype(np.float32)
    return concat_spots(slides[:2]), slides[2], slides[3]


@pytest.fixture(scope="module")
def cohort():
    return make_cohort()


@pytest.fixture(scope="module")
def fitted(cohort):
    train, validation, _ = cohort
    method = nh2st()
    method.fit(train, validation, config())
    return method


# --- graphs ----------------------------------------------------------------------------------------------


def test_hypergraph_convolution_against_a_hand_computation():
    # cos(0, 1) = 0.8, cos(1, 2) = 0.6, cos(0, 2) = 0: hyperedges {0, 1}, {1, 0}, {2, 1}
    x = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]])
    incidence = similarity_hypergraph(x, 2)
    np.testing.assert_array_equal(incidence[0].numpy(), [[1, 1, 0], [1, 1, 1], [0, 0, 1]])
    # Dv = (2, 3, 1), De = (2, 2, 2): P = Dv^-1/2 H De^-1 H^T Dv^-1/2
    expected = np.array(
        [
            [1 / 2, 1 / math.sqrt(6), 0],
            [1 / math.sqrt(6), 1 / 2, 0.5 / math.sqrt(3)],
            [0, 0.5 / math.sqrt(3), 1 / 2],
        ]
    )
    np.testing.assert_allclose(hypergraph_propagation(incidence)[0].numpy(), expected, atol=1e-6)
    layer = GraphConvolutions(2, n_layers=1, size=2)
    with torch.no_grad():
        layer.layers[0].weight.copy_(torch.tensor([[2.0, 0.0], [1.0, -1.0]]))
        layer.layers[0].bias.copy_(torch.tensor([0.5, 0.0]))
    theta_x = x[0].numpy() @ np.array([[2.0, 1.0], [0.0, -1.0]]) + [0.5, 0.0]
    np.testing.assert_allclose(layer(x)[0].detach().numpy(), expected @ theta_x, atol=1e-6)
    # two layers: ReLU in between, the same operator (built from the input features)
    two = GraphConvolutions(2, n_layers=2, size=2).eval()
    (w1, b1), (w2, b2) = ((lin.weight.detach().numpy(), lin.bias.detach().numpy()) for lin in two.layers)
    hidden = np.maximum(expected @ (x[0].numpy() @ w1.T + b1), 0)
    np.testing.assert_allclose(two(x)[0].detach().numpy(), expected @ (hidden @ w2.T + b2), atol=1e-5)


def test_hyperedge_weights_and_weighted_degrees():
    incidence = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])  # node 0 in both hyperedges, node 1 in the first
    weights = torch.tensor([2.0, 1.0])
    h, w = incidence[0].numpy(), np.diag([2.0, 1.0])
    dv = np.diag((h @ w).sum(1) ** -0.5)  # weighted node degrees (3, 2)
    de = np.diag(1 / h.sum(0))
    expected = dv @ h @ w @ de @ h.T @ dv
    np.testing.assert_allclose(hypergraph_propagation(incidence, weights)[0].numpy(), expected, atol=1e-6)


def test_plain_graph_is_the_symmetric_similarity_graph_with_gcn_normalisation():
    x = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]])
    adjacency = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=float)  # links 0-1 and 2-1, self-loops
    degree = adjacency.sum(1)
    np.testing.assert_allclose(
        similarity_graph_propagation(x, 2)[0].numpy(),
        adjacency / np.sqrt(np.outer(degree, degree)),
        atol=1e-6,
    )


def test_hyperedges_of_a_batch_are_built_per_graph(rng):
    x = torch.from_numpy(rng.normal(size=(5, 9, 4)).astype(np.float32))
    incidence = similarity_hypergraph(x, 3)
    assert incidence.shape == (5, 9, 9)
    np.testing.assert_array_equal(incidence.sum(1).numpy(), 3)  # every hyperedge has 3 nodes
    assert bool((torch.diagonal(incidence, dim1=1, dim2=2) == 1).all())  # hyperedge j holds node j
    alone = similarity_hypergraph(x[2:3], 3)
    np.testing.assert_array_equal(alone[0].numpy(), incidence[2].numpy())
    with pytest.raises(ValueError, match="1 to 9 nodes"):
        similarity_hypergraph(x, 10)


@pytest.mark.parametrize(("kind", "n_layers"), [("hypergraph", 2), ("graph", 1), ("hypergraph", 3)])
def test_node_mean_is_the_mean_of_the_convolved_nodes_with_its_gradients(rng, kind, n_layers):
    table = torch.from_numpy(rng.normal(size=(12, 6)).astype(np.float32)).requires_grad_()
    nodes = torch.from_numpy(rng.integers(0, 12, size=(5, 9)))  # rows shared by several graphs
    layers = GraphConvolutions(6, n_layers=n_layers, size=3, kind=kind, dropout=0.3)
    results = []
    for pool in (lambda: layers(table[nodes]).mean(dim=1), lambda: layers.node_mean(table, nodes)):
        torch.manual_seed(0)  # the same dropout masks
        pooled = pool()
        layers.zero_grad()
        table.grad = None
        pooled.square().sum().backward()
        results.append([pooled.detach(), table.grad.clone(), *(p.grad.clone() for p in layers.parameters())])
    for reference, folded in zip(*results, strict=True):
        np.testing.assert_allclose(folded.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)


def test_spatial_neighbours_never_cross_slides():
    grid = np.array([[x, y] for x in range(4) for y in range(4)], dtype=float)
    coords = np.concatenate([grid, grid + 0.1])  # slide b lies right on top of slide a
    groups = np.repeat(["a", "b"], 16)
    neighbours = spatial_knn(coords, groups, k=4)
    assert neighbours.shape == (32, 4)
    assert (groups[neighbours] == groups[:, None]).all()
    assert (neighbours != np.arange(32)[:, None]).all()
    distance = np.linalg.norm(coords[neighbours] - coords[:, None], axis=2)
    assert (np.diff(distance, axis=1) >= 0).all()  # nearest first
    np.testing.assert_allclose(distance[5], 1.0)  # an inner spot of the grid: its four direct neighbours
    same_place = spatial_knn(np.array([[0.0, 0.0]] * 4 + [[1.0, 0.0]]), np.zeros(5), k=3)  # duplicates
    assert (same_place != np.arange(5)[:, None]).all()  # still never itself
    with pytest.raises(ValueError, match="same coordinates"):  # no positions at all: refused, not arbitrary
        spatial_knn(np.zeros((5, 2)), np.zeros(5), k=3)
    with pytest.raises(ValueError, match=r"Slide 'b' has 3 spots.*lower the number of neighbours"):
        spatial_knn(coords[:19], groups[:19], k=3)


def test_cross_attention_attends_within_a_spot_and_is_literal_with_one_token(rng):
    x, guide = (torch.from_numpy(rng.normal(size=(6, 8)).astype(np.float32)) for _ in range(2))
    single = CrossAttention(8, 1)
    np.testing.assert_allclose(
        single(x, guide).detach().numpy(), single.value(guide).detach().numpy(), atol=1e-6
    )
    tokens = CrossAttention(8, 4)
    q, k, v = (
        layer(t).detach().view(6, 4, 2)
        for layer, t in ((tokens.query, x), (tokens.key, guide), (tokens.value, guide))
    )
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(2), dim=-1)
    np.testing.assert_allclose(
        tokens(x, guide).detach().numpy(), (weights @ v).reshape(6, 8).numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        tokens(x[:1], guide[:1]).detach().numpy(), tokens(x, guide)[:1].detach().numpy(), atol=1e-6
    )


# --- training ---------------------------------------------------------------------------------------------


def test_beats_the_mean_predictor(cohort, fitted):
    _, _, test = cohort
    assert set(fitted.report.train_terms) == {"mse", "query", "neighbour"}
    pred = fitted.predict(test)
    assert pred.shape == test.targets.shape and pred.dtype == np.float32
    mean_mse = float(((test.targets - test.targets.mean(0)) ** 2).mean())  # even the test slide's own mean
    assert float(((pred - test.targets) ** 2).mean()) < 0.6 * mean_mse
    assert pcc_acg(test.targets, pred) > 0.6
    assert fitted.embed(test).shape == (len(test), SMALL["embedding_dim"])


def test_the_epoch_kept_has_the_best_validation_pcc_or_mse(cohort, fitted):
    train, validation, _ = cohort
    by_pcc = nh2st(early_stopping="pcc")
    by_pcc.fit(train, validation, config())
    report = by_pcc.report
    assert report.best_epoch == int(np.argmin(report.validation_loss))
    # the epoch is chosen by the gene-wise PCC of the translator on the validation spots
    assert 1 - min(report.validation_loss) == pytest.approx(
        pcc_acg(validation.targets, by_pcc.predict(validation)), abs=1e-5
    )
    assert fitted.settings.early_stopping == "mse"  # the default: by its MSE
    mse = float(((fitted.predict(validation) - validation.targets) ** 2).mean())
    assert min(fitted.report.validation_loss) == pytest.approx(mse, rel=1e-5)


def test_batches_hold_spots_then_their_same_slide_neighbours(cohort, monkeypatch):
    train, validation, _ = cohort
    seen = {}

    def spy(self, network, fit, val, cfg, *, train_batches=None):
        seen["orders"] = [train_batches(epoch=epoch) for epoch in (0, 1)]
        seen["options"] = self.training_options()
        seen["fit"], seen["validation"] = len(fit), len(val)
        return nh2st_module.FitReport(train_loss=[0.0], best_epoch=0)

    monkeypatch.setattr(nh2st_module.NH2STMethod, "fit_network", spy)
    nh2st(n_neighbours=4, average_epochs=2).fit(train, validation, config(batch_size=16))
    assert seen["fit"] == len(train) and seen["validation"] == len(validation)
    # the weights kept are a moving average over about two epochs of steps
    assert seen["options"] == {"average_epochs": 2.0}
    first, second = seen["orders"]
    assert len(first) == len(train) // 16 and all(len(rows) == 16 * 5 for rows in first)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))  # reshuffled every epoch
    queries = np.concatenate([rows[:16] for rows in first])
    assert len(np.unique(queries)) == len(queries)
    expected = spatial_knn(train.coords, train.groups, k=4)
    for rows in first:
        spots, neighbours = rows[:16], rows[16:].reshape(16, 4)
        np.testing.assert_array_equal(neighbours, expected[spots])
        assert (train.groups[neighbours] == train.groups[spots][:, None]).all()  # rows of the fit spots only


def test_neighbour_branch_changes_training_but_not_inference_inputs(cohort, fitted):
    train, validation, test = cohort
    plain = nh2st(neighbour_branch=False)
    plain.fit(train, validation, config())
    assert not np.allclose(plain.predict(test), fitted.predict(test))
    assert not hasattr(plain.network, "image_graph") and hasattr(fitted.network, "image_graph")


@pytest.mark.parametrize(
    ("params", "present", "absent"),
    [
        ({}, ["gene_encoder", "query_attention", "image_graph", "gene_graph", "neighbour_attention"], []),
        (
            {"cross_attention": False},
            ["gene_encoder", "image_graph"],
            ["query_attention", "neighbour_attention"],
        ),
        ({"contrastive": False}, [], ["gene_encoder", "query_attention", "image_graph"]),
        ({"graph": "graph"}, ["image_graph"], []),
    ],
)
def test_ablation_switches_build_only_their_parts_and_train(cohort, params, present, absent):
    train, validation, test = cohort
    method = nh2st(**params)
    report = method.fit(train, validation, config(epochs=2))
    assert len(report.train_loss) == 2 and np.isfinite(report.train_loss).all()
    for name in present:
        assert hasattr(method.network, name), name
    for name in absent:
        assert not hasattr(method.network, name), name
    if "graph" in params:
        assert method.network.image_graph.kind == "graph"
    assert np.isfinite(method.predict(test)).all()


# --- end to end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patch_cohort(patch_spots):
    """Three tiny synthetic slides as patches: fit spots (two slides), validation and test spots (the third)."""
    spots, slides, _ = patch_spots(3, 12)
    last = np.flatnonzero(slides == slides[-1])
    return spots(np.flatnonzero(slides != slides[-1])), spots(last[::2]), spots(last[1::2])


@pytest.fixture(scope="module")
def map_encoder(tiny_encoder):
    """The tiny encoder with a feature map (``forward_features``, ``num_features``), as timm CNNs have."""

    class TinyMapEncoder(tiny_encoder):
        num_features = 6

        def forward_features(self, x):
            return self.layers[:3](x)

    return TinyMapEncoder


def test_end2end_one_epoch_flattens_the_feature_map_and_round_trips(patch_cohort, map_encoder, round_trip):
    train, validation, test = patch_cohort
    method = nh2st(encoder=map_encoder(), weights=None, token_grid=3)
    assert method.settings.token_grid == 3
    report = method.fit(train, validation, config(epochs=1, batch_size=8))
    assert len(report.train_loss) == 1 and np.isfinite(report.train_loss[0])
    assert method.network.pathology.linear.in_features == 6 * 3 * 3
    pred = method.predict(test)
    assert pred.shape == test.targets.shape and np.isfinite(pred).all()
    np.testing.assert_allclose(method.predict(test.subset(np.arange(3))), pred[:3], atol=1e-5)
    loaded = round_trip(method, encoder=map_encoder())
    np.testing.assert_array_equal(loaded.predict(test), pred)


def test_end2end_grid_beyond_the_feature_map_is_a_clear_error_before_training(patch_cohort, map_encoder):
    train, validation, _ = patch_cohort
    method = nh2st(encoder=map_encoder(), weights=None, token_grid=20)
    with pytest.raises(ValueError, match=r"32 px patches give a \d+ x \d+ map; pass `token_grid="):
        method.fit(train, validation, config(epochs=1, batch_size=8))
    assert method.report is None  # refused before any epoch


def test_end2end_encoder_without_a_feature_map(patch_cohort, tiny_encoder):
    train, validation, test = patch_cohort
    with pytest.raises(ValueError, match="token_grid=1"):
        nh2st(encoder=tiny_encoder(), weights=None).fit(train, validation, config(epochs=1, batch_size=8))
    method = nh2st(encoder=tiny_encoder(), weights=None, token_grid=1, neighbour_branch=False)
    method.fit(train, validation, config(epochs=1, batch_size=8))
    assert np.isfinite(method.predict(test)).all()


def test_fit_histo2expr_cross_validates_nh2st():
    adata = hx.datasets.synthetic(n_slides=3, seed=0, spots_per_side=6, n_genes=20)
    hx.pp.normalize(adata)
    rng = np.random.default_rng(0)
    expression = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    adata.obsm["X_histo"] = (
        expression @ rng.normal(size=(20, 8)) + rng.normal(size=(adata.n_obs, 8))
    ).astype(np.float32)
    hx.tl.fit_histo2expr(
        adata,
        method="nh2st",
        genes=10,
        cv="leave_one_slide_out",
        epochs=2,
        batch_size=16,
        progress=False,
        **SMALL,
    )
    folds = adata.uns["histo2expr"]["folds"]
    assert len(folds) == 3 and np.isfinite(folds["pcc_acg"]).all()


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"graph": "hyper"}, "`graph` must be one of"),
        ({"n_neighbours": 0}, "n_neighbours"),
        ({"n_layers": 0}, "n_layers"),
        ({"hyperedge_size": 1}, "between 2 and n_neighbours"),
        ({"hyperedge_size": 6, "n_neighbours": 4}, r"between 2 and n_neighbours \+ 1 = 5"),
        ({"attention_tokens": 3}, "must divide `embedding_dim=16`"),
        ({"temperature": 0}, "temperature"),
        ({"query_weight": -1.0}, "query_weight"),
        ({"neighbour_weight": float("nan")}, "neighbour_weight"),
        ({"neighbour_branch": "yes"}, "neighbour_branch"),
        ({"contrastive": 1}, "contrastive"),
        ({"token_grid": 0}, "token_grid"),
        ({"encoder": 3}, "encoder"),
        ({"early_stopping": "loss"}, "`early_stopping` must be one of"),
    ],
)
def test_bad_parameters_are_clear_errors(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nh2st(**params)


def test_bad_data_is_a_clear_error(cohort):
    train, validation, _ = cohort
    with pytest.raises(ValueError, match=r"has 64 spots, too few for 70 spatial neighbours"):
        nh2st(n_neighbours=70).fit(train, validation, config(epochs=1))
    nh2st(n_neighbours=70, neighbour_branch=False).fit(
        train, validation, config(epochs=1)
    )  # no neighbours then
    flat = SpotSet(
        coords=np.full_like(train.coords, np.nan),
        groups=train.groups,
        features=train.features,
        targets=train.targets,
    )
    with pytest.raises(ValueError, match=r"obsm\['spatial'\]"):
        nh2st().fit(flat, validation, config(epochs=1))


def test_wrong_features_at_prediction_are_a_clear_error(cohort, fitted):
    _, _, test = cohort
    wrong = SpotSet(coords=test.coords, groups=test.groups, features=test.features[:, :5])
    with pytest.raises(ValueError, match="12 features per spot"):
        fitted.predict(wrong)
    assert isinstance(fitted.network.translator, nn.Sequential)
