"""``--device``: the torch device a name asks for, checked to exist here (one line if not).

Below the features and ``backends``, so the predictor spec and distillation read devices the
same way."""

from __future__ import annotations


class DeviceError(ValueError):
    """A device name torch does not know, or a GPU this machine does not have."""


def torch_device(name: str, local_rank: int = 0):
    """A torch device that exists here; ``auto`` is this rank's GPU if there is one, else the
    CPU."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"--device {name!r} is not a torch device") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda asked for, but this torch build sees no CUDA GPU")
    return device
