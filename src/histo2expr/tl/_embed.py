"""Frozen image features of every spot, cached in ``obsm`` for the frozen regime."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .. import _logging as logg
from .._keys import EMBEDDING_KEY, Key, write_fields
from .._progress import progress_bar
from .._settings import cpu_threads
from .._validation import get_table, positive_int, positive_int_or_none, spatial_coordinates

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..models import InferenceEncoder
    from ..patches import PatchSource

#: Test-time augmentation: the dihedral views (see :func:`histo2expr.patches.dihedral`) averaged.
TTA_VIEWS = {1: (0,), 4: (0, 1, 2, 3), 8: tuple(range(8))}


def check_feature_options(*, tta: Any, context: Any, neighbours: Any, stain_normalization: Any) -> None:
    """Raise the error :func:`embed_patches` would raise for these feature options, before any work."""
    from ..patches import PatchSource

    if isinstance(tta, bool) or tta not in TTA_VIEWS:
        msg = f"`tta` must be the number of views averaged, one of {sorted(TTA_VIEWS)}, got {tta!r}."
        raise ValueError(msg)
    positive_int_or_none(neighbours, "neighbours", what="the number of nearest spots, e.g. 6")
    PatchSource.check_view(1.0 if context is None else context, stain_normalization)


def embed_patches(
    data: AnnData | SpatialData,
    *,
    encoder: str | torch.nn.Module = "efficientnet_lite0",
    weights: Any = "default",
    patch_size: int = 224,
    mpp: float | None = None,
    tta: int = 4,
    context: float | None = None,
    neighbours: int | None = 6,
    stain_normalization: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    backend: str = "auto",
    num_workers: int = 0,
    slide_key: str = "slide",
    table_key: str = "table",
    image_key: str | Mapping[str, str] | None = None,
    key_added: str = EMBEDDING_KEY,
    tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Embed the H&E patch around every spot with a frozen image encoder.

    Patches are cut lazily at one physical scale (:class:`~histo2expr.patches.PatchSource`),
    slide after slide, and pushed through the encoder in evaluation mode; only one
    batch of pixels is in memory at a time. The features can be made richer at the price of
    more forward passes: averaged over rotated views (``tta``), and followed by the features of
    a wider field around the spot (``context``) and by the mean features of the spot's nearest
    spots on its slide (``neighbours``). All of them use the slide's own image only, so they are
    as legitimate for a held-out slide as the spot's patch itself.

    The defaults (4 quarter turns and the mean of the 6 nearest spots, no context view) are the
    best setting measured on her2st that keeps a CPU benchmark short: every method gained over a
    single view without neighbours (``benchmarks/results/her2st_features.md``), for 4 forward
    passes per spot. ``tta=1, neighbours=None`` is the fastest embedding (one pass per spot).

    Parameters
    ----------
    data
        AnnData following the histo2expr data model, or a SpatialData (its table is written).
    encoder
        ``"efficientnet_lite0"`` (built in, as are ``"efficientnet_lite1"`` / ``"efficientnet_lite2"``;
        ImageNet weights offline with the ``weights`` extra), a pathology foundation model
        (``"uni2-h"``, ``"virchow2"``, ... of :data:`~histo2expr.models.ENCODER_PRESETS`; embed them
        at their training scale, e.g. ``patch_size=224, mpp=0.5``), any timm model name, or a
        :class:`torch.nn.Module` returning ``(B, D)`` features.
    weights
        ``"default"`` (ImageNet for names, the module's own for a module), ``"imagenet"``,
        ``None`` (random, drawn from ``seed``), a checkpoint path or a state dict — see
        :func:`histo2expr.models.build_encoder`.
    patch_size
        Patch side in pixels.
    mpp
        Micrometres per pixel of the patches; ``None`` uses the slides' native resolution
        (resampling to the median when slides differ).
    tta
        Test-time augmentation: the features (and tokens) are averaged over this many views of
        every patch — 1 (the patch as it is), 4 (its four quarter turns) or 8 (the quarter turns
        and their mirror images, :func:`~histo2expr.patches.dihedral_views`). Each view costs one
        forward pass; 8 views measured no better than 4.
    context
        Also embed a *context view*, a square ``context`` times wider than the patch around the
        spot shrunk to ``patch_size`` pixels (``PatchSource(field=context)``), with the same
        ``tta``; its features follow the spot's. It doubles the forward passes; ``context=3``
        helped some methods on her2st, not all. ``None``: no context view.
    neighbours
        Also append the mean spot-view features of the spot's ``neighbours`` nearest spots on
        its own slide (``histo2expr.models.graphs.spatial_knn``, and every spot tied with the
        ``neighbours``-th nearest; all other spots of a slide with fewer, the spot itself on a slide
        of one spot); no extra forward pass. ``None``: no neighbour block.
    stain_normalization
        ``None`` or ``"macenko"``: every slide's patches re-stained to reference stain vectors
        from that slide's own Macenko estimate (see :class:`~histo2expr.patches.PatchSource`).
    batch_size
        Patches per forward pass.
    device
        ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"`` or ``"mps"``.
    backend
        What runs the encoder (:class:`~histo2expr.models.InferenceEncoder`). ``"auto"``: ONNX Runtime
        for the EfficientNet-Lite encoders on the CPU when it is installed (``pip install
        "histo2expr[onnx]"``; about 3x faster end to end, the same features; the export, once per
        encoder and patch size, is cached), else PyTorch; the first patches are checked against PyTorch and it falls
        back to PyTorch with a warning if any cosine similarity is below 0.999. ``"torch"``: eager
        PyTorch (float32 on the CPU, bfloat16 autocast on CUDA). ``"onnx"``: ONNX Runtime, CPU only,
        unchecked. ``"bf16"``: PyTorch under bfloat16 autocast, also on CPUs with native bfloat16
        (AVX512-BF16 / AMX): 1.8x faster for a vision transformer, but **not** the float32 features
        (cosine down to 0.997 for EfficientNet-Lite0); see :doc:`/performance`.
    num_workers
        DataLoader processes cutting patches while the encoder runs.
    slide_key
        Column of ``obs`` with the slide of each spot.
    table_key, image_key
        SpatialData only: the table, and the image element of each slide.
    key_added
        Key of the embeddings in ``obsm`` (and of their description in ``uns``).
    tokens
        Also keep image *tokens* for methods that take them (e.g. ``"cmrcnet"``): the side of a
        square token grid — the encoder's last feature map (a CNN's, or a ViT's patch tokens)
        average-pooled to ``tokens x tokens`` (``histo2expr.models.layers.pool_token_grid``),
        at most the map's own side (7 for ``efficientnet_lite0`` at 224 px). The backbone runs
        once per patch and view for both outputs; with ``tta`` each view's grid is turned back
        before averaging, and the context and neighbour features are appended to every token.
        ``None`` keeps the pooled features only (and removes tokens a previous call left under
        this key).
    seed
        Seed of a random initialisation (``weights=None``): the same seed gives the same weights,
        so slides embedded in separate calls share one encoder.
    progress
        Show a progress bar.

    Returns
    -------
    Nothing; sets the following fields of the AnnData (the SpatialData's table):

    ``.obsm[key_added]``
        ``(n_spots, feature_dim * n_blocks)`` float32 embeddings: the spot view, then the context
        view and the neighbours' mean when asked for.
    ``.obsm[f"{key_added}_tokens"]``
        With ``tokens``: ``(n_spots, tokens * tokens, token_dim + feature_dim * (n_blocks - 1))``
        float32 tokens (row-major grid).
    ``.uns[key_added]``
        ``{"encoder": description incl. a hash of its weights (and the ``seed`` of random weights),
        "patches": patch geometry with "tta", "context" and "neighbours", "blocks": {block: [first,
        last) columns}, "backend": the inference backend that ran the encoder ("auto" resolved)}``,
        and with ``tokens``
        ``"tokens": {"key": f"{key_added}_tokens", "grid": tokens, "n_tokens": tokens**2}``.
    """
    import torch

    from ..models import InferenceEncoder, build_encoder, resolve_device
    from ..patches import PatchSource

    positive_int(batch_size, "batch_size")
    positive_int_or_none(tokens, "tokens", what="the side of the token grid, e.g. 3")
    check_feature_options(
        tta=tta, context=context, neighbours=neighbours, stain_normalization=stain_normalization
    )
    table = get_table(data, table_key)
    geometry: dict[str, Any] = {
        "patch_size": patch_size,
        "mpp": mpp,
        "stain_normalization": stain_normalization,
        "slide_key": slide_key,
        "table_key": table_key,
        "image_key": image_key,
    }
    source = PatchSource(data, **geometry)
    context_source = None if context is None else PatchSource(data, field=context, **geometry)
    coords = spatial_coordinates(table)
    model = build_encoder(encoder, weights=weights, seed=seed)
    model.to(resolve_device(device)).eval()
    # channels-last convolutions are 1.4-1.7x faster on CPUs; only for encoders built here, so that
    # a module the user passed in is not converted under their feet
    memory_format = torch.channels_last if isinstance(encoder, str) else torch.contiguous_format
    model.to(memory_format=memory_format)
    if tokens is not None and (model.token_dim is None or not hasattr(model.backbone, "forward_features")):
        msg = (
            f"Encoder {model.name!r} has no token map (its backbone lacks `forward_features` / "
            "`num_features`); embed without `tokens`, or use a timm encoder."
        )
        raise ValueError(msg)
    start = logg.info(
        f"embedding the patches of {logg.counted(len(source), 'spot')} with {model.name} ({logg.counted(tta, 'view')} each)"
    )
    runner = InferenceEncoder(
        model,
        backend=backend,
        device=device,
        channels_last=memory_format == torch.channels_last,
        tokens=tokens is not None,
    )
    run = {"runner": runner, "views": TTA_VIEWS[tta], "batch_size": batch_size, "num_workers": num_workers}
    run.update(progress=progress)
    features, token_array = _embed_views(source, tokens=tokens, desc="embedding", **run)
    blocks = {"spot": features}
    if context_source is not None:
        blocks["context"] = _embed_views(context_source, tokens=None, desc="context", **run)[0]
    if neighbours is not None:
        blocks["neighbours"] = _neighbour_mean(features, coords, table.obs[slide_key].to_numpy(), neighbours)
    widths = np.cumsum([0] + [block.shape[1] for block in blocks.values()])
    extra = [block for name, block in blocks.items() if name != "spot"]
    embedding = np.concatenate(list(blocks.values()), axis=1)
    patches = {**source.describe(), "tta": tta, "context": context, "neighbours": neighbours}
    description = model.describe()
    if description["weights"] == "random":
        description["seed"] = seed  # what re-creates these weights: `weights=None, seed=seed`
    record: dict[str, Any] = {
        "encoder": description,
        "patches": {k: v for k, v in patches.items() if v is not None},
        "blocks": {name: [int(widths[i]), int(widths[i + 1])] for i, name in enumerate(blocks)},
        "backend": runner.backend,
    }
    obsm, token_key = {Key.obsm.features(key_added): embedding}, Key.obsm.tokens(key_added)
    if token_array is not None:
        if extra:
            shared = np.concatenate(extra, axis=1)[:, None, :]
            token_array = np.concatenate(
                [token_array, np.broadcast_to(shared, (*token_array.shape[:2], shared.shape[2]))], axis=2
            )
        obsm[token_key] = token_array
        n_tokens = token_array.shape[1]  # tokens * tokens
        record["tokens"] = {"key": token_key, "grid": tokens, "n_tokens": n_tokens}
    write_fields(
        table, obsm=obsm, uns={Key.uns.record(key_added): record}, remove={"obsm": [token_key]}, start=start
    )


def _embed_views(
    source: PatchSource,
    *,
    runner: InferenceEncoder,
    views: tuple[int, ...],
    tokens: int | None,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features ``(n, D)`` (and tokens ``(n, tokens**2, C)``) of every patch of ``source``, averaged over ``views``."""
    from ..models import pool_token_grid
    from ..patches import dihedral, patch_loader

    model = runner.encoder
    features = np.empty((len(source), model.feature_dim), dtype=np.float32)
    token_array = (
        None if tokens is None else np.empty((len(source), tokens * tokens, model.token_dim), np.float32)
    )
    loader = patch_loader(source, batch_size=batch_size, num_workers=num_workers)
    with (
        cpu_threads(num_workers),
        progress_bar(total=len(source), desc=desc, disable=not progress) as bar,
    ):
        for batch in loader:
            images = batch["image"]
            rows = batch["index"].numpy()
            pooled_sum: Any = 0.0
            grid_sum: Any = 0.0
            for k in views:
                pooled, grid = runner(cast("torch.Tensor", dihedral(images, k)))
                pooled_sum = pooled_sum + pooled.float()
                if tokens is not None:
                    grid_sum = grid_sum + _turned_back(pool_token_grid(grid.float(), tokens), k, tokens)
            features[rows] = (pooled_sum / len(views)).cpu().numpy()
            if token_array is not None:
                token_array[rows] = (grid_sum / len(views)).cpu().numpy()
            bar.update(len(images))
    return features, token_array


def _neighbour_mean(features: np.ndarray, coords: np.ndarray, slides: np.ndarray, k: int) -> np.ndarray:
    """Mean ``features`` of every spot's ``k`` nearest spots of its slide (fewer on a small slide; itself alone).

    Spots as near as the ``k``-th nearest count too (e.g. all 8 around a spot of a square grid for
    ``k=6``), so that the mean does not depend on the order of the spots.
    """
    from scipy.spatial import cKDTree

    from ..models.graphs import spatial_knn

    means = np.empty_like(features)
    for slide in dict.fromkeys(slides):
        rows = np.flatnonzero(slides == slide)
        if len(rows) == 1:
            means[rows] = features[rows]
            continue
        points = coords[rows]
        kth = spatial_knn(points, slides[rows], k=min(k, len(rows) - 1))[:, -1]
        radius = np.linalg.norm(points[kth] - points, axis=1) * (1 + 1e-6)
        for spot, near in enumerate(cKDTree(points).query_ball_point(points, radius)):
            means[rows[spot]] = features[rows[[j for j in near if j != spot]]].mean(axis=0)
    return means


def _turned_back(tokens: torch.Tensor, k: int, side: int) -> torch.Tensor:
    """``(B, side * side, C)`` row-major tokens of dihedral view ``k`` in the orientation of the patch itself."""
    from ..patches import dihedral

    grid = tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)
    inverse = (4 - k) % 4 if k < 4 else k  # a quarter turn is undone by the opposite turn; a mirror by itself
    return cast("torch.Tensor", dihedral(grid, inverse)).flatten(2).transpose(1, 2)
