"""Inference on one device: which device, at which precision, and the batches of a fitted network.

Devices are named as torch names them (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or
``"auto"``; Lightning's accelerators check that the device exists here, and its precision
plugins give the autocast: bfloat16 on CUDA, full precision elsewhere (CPU runs stay
bit-reproducible).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from .batches import BatchOrder, batch_loader, ordered_batches

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from .base import SpotSet

_SUPPORTED = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def lightning_device(device: str | torch.device) -> tuple[str, int | list[int]]:
    """A torch device name (or ``"auto"``) as Lightning's ``(accelerator, devices)``.

    ``"cuda:1"`` is ``("cuda", [1])``, ``"cuda"`` ``("cuda", 1)``, ``"auto"`` ``("auto", 1)``.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        msg = f"`device` must be a string or a torch.device, got {type(device).__name__}. Pass one of {_SUPPORTED}."
        raise TypeError(msg)
    if device == "auto":
        return "auto", 1
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        msg = f"Unknown device {device!r}. Pass one of {_SUPPORTED}."
        raise ValueError(msg) from error
    if parsed.type not in ("cpu", "cuda", "mps"):
        msg = f"Device type {parsed.type!r} is not supported. Pass one of {_SUPPORTED}."
        raise ValueError(msg)
    if parsed.index is None or parsed.type == "cpu":
        return parsed.type, 1
    return parsed.type, [parsed.index]


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` runs on a CUDA GPU here (``"auto"`` does when one is available)."""
    return accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())


def default_precision(accelerator: str) -> str:
    """The Lightning precision of ``precision=None``: ``"bf16-mixed"`` on CUDA, ``"32-true"`` elsewhere.

    Mixed bfloat16 on a CPU, even one that computes bfloat16 natively, was not faster per epoch than
    float32 for the frozen methods (``benchmarks/results/bf16_training_speed.md``), and full precision
    keeps CPU runs bit-reproducible across machines of one instruction set.
    """
    return "bf16-mixed" if uses_cuda(accelerator) else "32-true"


def inference_fabric(device: str | torch.device = "auto") -> Fabric:
    """A Lightning ``lightning.fabric.Fabric`` on one device: bfloat16 autocast on CUDA, else full precision.

    Raises a clear error when the device does not exist on this machine.
    """
    accelerator, devices = lightning_device(device)
    try:
        return _fabric(accelerator, devices if isinstance(devices, int) else tuple(devices))
    except Exception as error:  # Lightning raises RuntimeError, ValueError or its MisconfigurationException
        msg = f"Device {str(device)!r} is not usable on this machine: {error} Pass `device='auto'` or `device='cpu'`."
        raise RuntimeError(msg) from error


@lru_cache(maxsize=16)
def _fabric(accelerator: str, devices: int | tuple[int, ...]) -> Fabric:
    """One Fabric per device and process: building one takes tens of milliseconds, and CHRep predicts every epoch."""
    from lightning.fabric import Fabric

    return Fabric(
        accelerator=accelerator,
        devices=list(devices) if isinstance(devices, tuple) else devices,
        precision=default_precision(accelerator),
    )


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The :class:`torch.device` named by ``device``, checked to exist on this machine.

    Parameters
    ----------
    device
        ``"auto"`` (a GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
        ``"mps"`` or a :class:`torch.device`; asking for one that this machine does not have is
        an error.

    Returns
    -------
    The resolved device.
    """
    return inference_fabric(device).device


def predict_batches(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    data: SpotSet,
    *,
    batch_size: int,
    device: str | torch.device,
    num_workers: int = 0,
) -> np.ndarray:
    """Apply ``forward`` to every batch of ``data`` in order on ``device``; one float32 output row per spot.

    Batches are :class:`~histo2expr.models.batches.SpotBatches` items (no augmentation); each spot's
    output depends on that spot alone when ``forward`` is in evaluation mode.
    """
    fabric = inference_fabric(device)
    order = BatchOrder(partial(ordered_batches, n=len(data), batch_size=batch_size))
    outputs = []
    with torch.no_grad(), fabric.autocast():
        for batch in batch_loader(data, order, augment=False, seed=0, num_workers=num_workers):
            batch = {key: value.to(fabric.device, non_blocking=True) for key, value in batch.items()}
            outputs.append(forward(batch).float().cpu().numpy())
    return np.concatenate(outputs, axis=0) if outputs else np.zeros((0, 0), dtype=np.float32)
