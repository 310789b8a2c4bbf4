"""Frozen image features of every spot, cached in ``obsm`` for the frozen regime."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .._progress import progress_bar
from .._settings import cpu_threads
from .._validation import get_table

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData


def embed_patches(
    data: AnnData | SpatialData,
    *,
    encoder: str | torch.nn.Module = "efficientnet_lite0",
    weights: Any = "default",
    patch_size: int = 224,
    mpp: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    backend: str = "auto",
    num_workers: int = 0,
    slide_key: str = "slide",
    table_key: str = "table",
    image_key: str | Mapping[str, str] | None = None,
    key_added: str = "X_histo",
    tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Embed the H&E patch around every spot with a frozen image encoder.

    Patches are cut lazily at one physical scale (:class:`~histo2expr.patches.PatchSource`),
    slide after slide, and pushed through the encoder in evaluation mode; only one
    batch of pixels is in memory at a time.

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
        once per patch for both outputs. ``None`` keeps the pooled features only (and removes
        tokens a previous call left under this key).
    seed
        Seed of a random initialisation (``weights=None``): the same seed gives the same weights,
        so slides embedded in separate calls share one encoder.
    progress
        Show a progress bar.

    Returns
    -------
    Nothing; sets the following fields of the AnnData (the SpatialData's table):

    ``.obsm[key_added]``
        ``(n_spots, feature_dim)`` float32 embeddings.
    ``.obsm[f"{key_added}_tokens"]``
        With ``tokens``: ``(n_spots, tokens * tokens, token_dim)`` float32 tokens (row-major grid).
    ``.uns[key_added]``
        ``{"encoder": ..., "patches": ..., "backend": ...}``: the encoder's description incl. a hash
        of its weights (and the ``seed`` of random weights), the patch geometry, and the inference
        backend that ran the encoder (``"auto"`` resolved); with
        ``tokens`` ``"tokens": {"key": f"{key_added}_tokens", "grid": tokens, "n_tokens": tokens**2}``.
    """
    import torch

    from ..models import InferenceEncoder, build_encoder, resolve_device
    from ..models.layers import pool_token_grid
    from ..patches import PatchSource, patch_loader

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"`batch_size` must be a positive integer, got {batch_size!r}."
        raise ValueError(msg)
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        msg = f"`tokens` must be None or the side of the token grid, a positive integer (e.g. 3), got {tokens!r}."
        raise ValueError(msg)
    table = get_table(data, table_key)
    source = PatchSource(
        data, patch_size=patch_size, mpp=mpp, slide_key=slide_key, table_key=table_key, image_key=image_key
    )
    model = build_encoder(encoder, weights=weights, seed=seed)
    target = resolve_device(device)
    model.to(target).eval()
    # channels-last convolutions are 1.4-1.7x faster on CPUs; only for encoders built here, so that
    # a module the user passed in is not converted under their feet
    channels_last = isinstance(encoder, str)
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    features = np.empty((len(source), model.feature_dim), dtype=np.float32)
    if tokens is not None:
        if model.token_dim is None or not hasattr(model.backbone, "forward_features"):
            msg = (
                f"Encoder {model.name!r} has no token map (its backbone lacks `forward_features` / "
                "`num_features`); embed without `tokens`, or use a timm encoder."
            )
            raise ValueError(msg)
        token_array = np.empty((len(source), tokens * tokens, model.token_dim), dtype=np.float32)
    runner = InferenceEncoder(
        model, backend=backend, device=target, channels_last=channels_last, tokens=tokens is not None
    )
    loader = patch_loader(source, batch_size=batch_size, num_workers=num_workers)
    with (
        cpu_threads(num_workers),
        progress_bar(total=len(source), desc="embedding", disable=not progress) as bar,
    ):
        for batch in loader:
            rows = batch["index"].numpy()
            pooled, grid = runner(batch["image"])
            features[rows] = pooled.float().cpu().numpy()
            if tokens is not None:
                token_array[rows] = pool_token_grid(grid.float(), tokens).cpu().numpy()
            bar.update(len(rows))
    table.obsm[key_added] = features
    description = model.describe()
    if description["weights"] == "random":
        description["seed"] = seed  # what re-creates these weights: `weights=None, seed=seed`
    table.uns[key_added] = {"encoder": description, "patches": source.describe(), "backend": runner.backend}
    token_key = f"{key_added}_tokens"
    if tokens is None:
        if token_key in table.obsm:
            del table.obsm[token_key]
    else:
        table.obsm[token_key] = token_array
        table.uns[key_added]["tokens"] = {"key": token_key, "grid": tokens, "n_tokens": tokens * tokens}
