"""Inference backends of an image :class:`~histo2expr.models.Encoder`: eager PyTorch, ONNX Runtime or bfloat16.

:class:`InferenceEncoder` wraps an encoder for :func:`histo2expr.tl.embed_patches`: it takes
uint8 patch batches on the CPU and returns their features (and tokens), whichever backend runs
the network on the device and at the precision of the inference Fabric (``models.inference``).
The ONNX Runtime backend exports the encoder once per patch shape with :func:`torch.onnx.export`
(normalisation included, dynamic batch) and keeps the export of a named encoder in the histo2expr
cache, keyed by its architecture, weights and patch shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._cache import cache_dir
from .._validation import one_of
from .encoders import BUILTIN_ENCODERS, Encoder
from .inference import inference_fabric

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

#: The inference backends of :func:`histo2expr.tl.embed_patches`.
INFERENCE_BACKENDS = ("auto", "torch", "onnx", "bf16")

#: timm architectures that ``backend="auto"`` runs with ONNX Runtime on the CPU: EfficientNet-Lite0's
#: ONNX Runtime forward was measured 4x faster than eager PyTorch with the same features (cosine
#: 1.0; Lite1 and Lite2 are the same operators, scaled), a ViT-S/16's 0.76x, see
#: ``benchmarks/results/encoder_inference.md``.
ONNX_BY_DEFAULT = frozenset(BUILTIN_ENCODERS[f"efficientnet_lite{n}"] for n in (0, 1, 2))

#: ``backend="auto"`` checks the ONNX Runtime features of the first patches of each patch shape
#: against PyTorch's float32 features, and falls back to PyTorch when any cosine is below MIN_COSINE.
CHECKED_PATCHES = 4
MIN_COSINE = 0.999

# What the ONNX backend imports: the runtime, and the packages of torch's ONNX exporter.
_ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")
# Bumped when the exported graph changes for the same encoder (e.g. other inputs or outputs).
_EXPORT_FORMAT = 1


def onnx_available() -> bool:
    """Whether ONNX Runtime and torch's ONNX exporter (packages ``onnx``, ``onnxscript``) are installed."""
    return all(find_spec(package) is not None for package in _ONNX_PACKAGES)


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), so that bf16 autocast is fast.

    oneDNN also runs bfloat16 on a CPU with AVX-512 alone, emulated and slower than float32: that is
    not native.
    """
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch build without the checks
        return False


def check_backend_name(backend: str) -> None:
    """Raise a clear error when ``backend`` is not one of :data:`INFERENCE_BACKENDS` (before any work)."""
    one_of(backend, INFERENCE_BACKENDS, "backend", fix="See `hx.tl.embed_patches` for what each does.")


def check_backend(backend: str, device: torch.device) -> None:
    """Raise a clear error when ``backend`` is unknown, or cannot run on ``device`` here.

    ``"onnx"`` needs the CPU and :func:`onnx_available` (else ImportError); ``"bf16"`` needs CUDA or
    a CPU with :func:`cpu_supports_bf16`; ``"auto"`` and ``"torch"`` run anywhere.
    """
    check_backend_name(backend)
    if backend == "onnx":
        if device.type != "cpu":
            msg = f"backend='onnx' runs on the CPU, but the device is {str(device)!r}. Pass `device='cpu'` or `backend='torch'`."
            raise ValueError(msg)
        if not onnx_available():
            missing = [package for package in _ONNX_PACKAGES if find_spec(package) is None]
            msg = (
                f"backend='onnx' needs the packages {', '.join(missing)}, which are not installed. Install them "
                "with `pip install \"histo2expr[onnx]\"`, or pass `backend='torch'`."
            )
            raise ImportError(msg)
    if backend == "bf16" and (device.type == "mps" or (device.type == "cpu" and not cpu_supports_bf16())):
        where = "Apple MPS" if device.type == "mps" else "this CPU (no AVX512-BF16 or AMX)"
        msg = f"backend='bf16' needs native bfloat16, which {where} lacks. Pass `backend='torch'`."
        raise ValueError(msg)


def resolve_backend(backend: str, encoder: Encoder, device: torch.device) -> str:
    """Return the backend that runs ``encoder`` on ``device``: ``backend`` (checked), or what ``"auto"`` picks.

    ``"auto"`` picks ``"onnx"`` on the CPU for the encoders of ``ONNX_BY_DEFAULT`` when
    :func:`onnx_available`, and ``"torch"`` otherwise.
    """
    check_backend(backend, device)
    if backend == "auto":
        use_onnx = device.type == "cpu" and encoder.timm_name in ONNX_BY_DEFAULT and onnx_available()
        return "onnx" if use_onnx else "torch"
    return backend


class InferenceEncoder:
    """An :class:`~histo2expr.models.Encoder` run for inference on one backend.

    Parameters
    ----------
    encoder
        The encoder, in evaluation mode, on ``device``.
    backend
        ``"auto"``: ``"onnx"`` for the encoders of ``ONNX_BY_DEFAULT`` on the CPU when ONNX
        Runtime is installed (``pip install "histo2expr[onnx]"``), else ``"torch"``. It keeps the
        float32 features: the ONNX Runtime features of the first ``CHECKED_PATCHES`` patches
        of each patch shape are compared with PyTorch's, and if any cosine similarity is below
        ``MIN_COSINE``, or the export fails, a warning says so and ``"torch"`` runs.
        ``"torch"``: the eager PyTorch forward (float32; bfloat16 autocast on CUDA).
        ``"onnx"``: ONNX Runtime on the CPU, float32, unchecked.
        ``"bf16"``: PyTorch under bfloat16 autocast, also on the CPU where it has native bfloat16
        (AVX512-BF16 or AMX). **Not float32 features**: on real H&E patches their cosine similarity
        to float32 went down to 0.997 for EfficientNet-Lite0, below the 0.999 the other backends
        keep (0.99997 for a ViT-S/16, 1.8x faster there), see
        ``benchmarks/results/encoder_inference.md``. Never chosen by ``"auto"``.
    device
        Where ``encoder`` is: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"`` or a
        :class:`torch.device` (checked to exist here, :func:`~histo2expr.models.resolve_device`).
    channels_last
        Feed ``"torch"`` / ``"bf16"`` the images in the channels-last memory format (faster
        convolutions on CPUs; the encoder should be in that format too).
    tokens
        Also return the tokens of the last feature map (:meth:`Encoder.features_and_tokens`).

    Attributes
    ----------
    backend
        The backend that runs, with ``"auto"`` resolved.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        tokens: bool = False,
    ) -> None:
        self.encoder = encoder
        self.fabric = inference_fabric(device)  # bfloat16 autocast on CUDA, full precision elsewhere
        self.device = self.fabric.device
        self.backend = resolve_backend(backend, encoder, self.device)
        self._fall_back = backend == "auto"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.tokens = tokens
        self._sessions: dict[tuple[int, int], Any] = {}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of a batch of patches, and their tokens when asked for.

        Parameters
        ----------
        images
            ``(B, 3, H, W)`` uint8 patches on the CPU.

        Returns
        -------
        ``(B, feature_dim)`` features and ``(B, N, token_dim)`` tokens (`None` without ``tokens``),
        float32 for ``"onnx"`` and ``"torch"`` on the CPU (on the device and possibly in bfloat16
        otherwise).
        """
        if self.backend != "onnx":
            return self._run_torch(images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            msg = f"backend='onnx' takes (batch, 3, H, W) uint8 patches, got {images.dtype} of shape {tuple(images.shape)}."
            raise TypeError(msg)
        shape = (int(images.shape[2]), int(images.shape[3]))
        if shape in self._sessions:
            return self._run_onnx(images, shape)
        try:
            self._sessions[shape] = onnx_session(self.encoder, shape, tokens=self.tokens)
            outputs = self._run_onnx(images, shape)
        except (RuntimeError, ImportError) as err:
            if not self._fall_back:
                raise
            return self._torch_instead(
                images, f"ONNX Runtime could not run encoder {self.encoder.name!r} ({err})"
            )
        similarity = self._similarity_to_torch(images[:CHECKED_PATCHES], outputs) if self._fall_back else 1.0
        if similarity < MIN_COSINE:  # "auto" promises the float32 features: checked on the first patches
            del self._sessions[shape]
            return self._torch_instead(
                images,
                f"the ONNX Runtime features of encoder {self.encoder.name!r} differ from PyTorch's "
                f"(cosine {similarity:.4f} < {MIN_COSINE})",
            )
        return outputs

    def _similarity_to_torch(
        self, images: torch.Tensor, outputs: tuple[torch.Tensor, torch.Tensor | None]
    ) -> float:
        """The lowest cosine similarity of ``outputs`` (of a batch starting with ``images``) to PyTorch's, per patch."""
        n = len(images)
        pairs = zip(self._run_torch(images), outputs, strict=True)
        return min(float(_cosine(ours, theirs[:n]).min()) for ours, theirs in pairs if ours is not None)

    def _torch_instead(self, images: torch.Tensor, reason: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Warn that ``backend="auto"`` falls back to PyTorch, and run it from now on."""
        warnings.warn(
            f"{reason}; running it with PyTorch instead. Pass `backend='torch'` to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        self.backend = "torch"
        return self._run_torch(images)

    def _run_torch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.inference_mode(), self._autocast():
            batch = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            if self.tokens:
                return self.encoder.features_and_tokens(batch)
            return self.encoder(batch), None

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.backend == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return self.fabric.autocast()

    def _run_onnx(
        self, images: torch.Tensor, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = self._sessions[shape].run(None, {"images": np.ascontiguousarray(images.numpy())})
        tokens = torch.from_numpy(outputs[1]) if self.tokens else None
        return torch.from_numpy(outputs[0]), tokens


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each patch's outputs (features, or all its tokens flattened)."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


class _ExportedForward(nn.Module):
    """The forward an ONNX export records: features, or features and tokens."""

    def __init__(self, encoder: Encoder, tokens: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokens = tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.features_and_tokens(images) if self.tokens else self.encoder(images)


def export_onnx(
    encoder: Encoder, path: str | os.PathLike[str], shape: tuple[int, int], *, tokens: bool
) -> None:
    """Export ``encoder`` to an ONNX file taking ``(batch, 3, *shape)`` uint8 patches, any batch size.

    The graph includes the encoder's normalisation; its outputs are ``features`` (and ``tokens``).
    Weights beyond 2 GB go to a data file next to ``path``.
    """
    import torch.export

    was_training = encoder.training
    example = torch.zeros((2, 3, *shape), dtype=torch.uint8, device=next(encoder.buffers()).device)
    output_names = ["features", "tokens"] if tokens else ["features"]
    try:
        encoder.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on graph breaks and deprecations
            program = torch.onnx.export(
                _ExportedForward(encoder, tokens),
                (example,),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                input_names=["images"],
                output_names=output_names,
                verbose=False,
            )
    except Exception as err:
        msg = (
            f"Encoder {encoder.name!r} could not be exported to ONNX ({type(err).__name__}: {err}). "
            "Pass `backend='torch'`."
        )
        raise RuntimeError(msg) from err
    finally:
        encoder.train(was_training)
    program.save(path)


def onnx_session(encoder: Encoder, shape: tuple[int, int], *, tokens: bool) -> Any:
    """An ONNX Runtime CPU session of ``encoder`` for patches of ``shape``, with torch's thread count.

    A named encoder (``timm_name`` set) is exported once into the cache folder ``onnx``, under a
    key of its description (architecture, weights hash, normalisation, pooling), the patch shape,
    the outputs and the torch version; a custom module, whose code no key covers, is exported to a
    temporary folder every time.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # threads that sleep between operators instead of spinning: faster on shared cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory(prefix="histo2expr-onnx-", ignore_cleanup_errors=True) as folder:
        if encoder.timm_name is None:
            path = Path(folder) / "model.onnx"
            export_onnx(encoder, path, shape, tokens=tokens)
        else:
            path = _cached_export(encoder, shape, tokens=tokens)
        try:
            return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's errors derive from Exception only
            msg = f"ONNX Runtime could not load the export of encoder {encoder.name!r} ({err}). Pass `backend='torch'`."
            raise RuntimeError(msg) from err


def _cached_export(encoder: Encoder, shape: tuple[int, int], *, tokens: bool) -> Path:
    """The cached ONNX file of ``encoder`` at ``shape``, exported first if absent."""
    key = {
        "encoder": encoder.describe(),
        "shape": list(shape),
        "tokens": tokens,
        "torch": torch.__version__,
        "format": _EXPORT_FORMAT,
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", encoder.name)
    folder = cache_dir("onnx") / f"{name}-{shape[0]}x{shape[1]}-{digest}"
    if not (folder / "model.onnx").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # what an emptied cache left
        # export into a folder of its own, then rename it: a concurrent or interrupted export leaves no half file
        partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=folder.parent))
        try:
            export_onnx(encoder, partial / "model.onnx", shape, tokens=tokens)
            partial.rename(folder)
        except OSError:
            if not (folder / "model.onnx").is_file():  # not a concurrent export that finished first
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder / "model.onnx"
