"""Checkpoint files: reading them safely, telling which model they hold, loading them strictly,
and finding them (an explicit path, ``TINYSAM_CHECKPOINT``, the user cache, a download).

Below both ``build`` (which builds models and loads checkpoints into them) and ``quant`` (whose
quantized folders hold tensors read the same way), so neither imports the other.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .io import CACHE_ENV, DownloadError, cache_dir, download_file  # noqa: F401  (CACHE_ENV re-exported)

MODEL_TYPES = ("vit_t", "vit_b", "vit_l", "vit_h")
# The SAM ViT teachers' embedding widths, which tell their checkpoints apart.
VIT_WIDTHS = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}
# Published weights per model type: TinySAM for vit_t, Meta's SAM for the teachers.
WEIGHT_URLS = {
    "vit_t": "https://github.com/xinghaochen/TinySAM/releases/download/3.0/tinysam_42.3.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
CHECKPOINT_ENV = "TINYSAM_CHECKPOINT"
# A folder written by ``tinysam quantize`` (``tinysam.quant.store``): its description and weights.
QUANT_CONFIG_FILE = "quant.json"
QUANT_WEIGHTS_FILE = "quantized.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or made for another model."""


class HoldsObjectsError(CheckpointError):
    """A PyTorch file that holds pickled objects, not only tensors (``torch.save(model)``)."""


# --------------------------------------------------------------------------- checkpoints


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely (``weights_only``) and return its plain state dict.

    Accepts a PyTorch file or a safetensors file holding a bare state dict, or (PyTorch) one
    wrapped under ``model``/``state_dict`` (training
    checkpoints) or ``student`` (``tinysam distill`` runs), with an optional DDP ``module.``
    prefix.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    obj = _read_safetensors(path) if _is_safetensors(path) else _read_torch_file(path)
    for wrapper in ("model", "state_dict", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"checkpoint {path} is not a state_dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    for key, tensor in obj.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"checkpoint {path} has NaN or infinite values in {key}: it is damaged, or "
                "its training diverged; use another checkpoint"
            )
    return obj


def _read_torch_file(path: Path):
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about what we are about to refuse
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # weights_only refused a class or function
            raise HoldsObjectsError(
                f"checkpoint {path} holds objects other than tensors and will not be "
                "unpickled; re-save it as a plain state_dict"
            ) from err
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file; download it again"
        ) from err
    except Exception as err:  # the unpickler fails in many ways on damaged bytes
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(err).__name__}); "
            "download it again"
        ) from err


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or the format's header: a little-endian length, then JSON."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (how Hugging Face hosts weights): tensors only, by design."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise CheckpointError(
            f"checkpoint {path} is a safetensors file: pip install safetensors"
        ) from err
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is a damaged safetensors file ({str(err).splitlines()[0]}); "
            "download it again"
        ) from err


def detect_model_type(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The registry name a state dict was saved from, or None if it is none of ours."""
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:  # TinyViT's conv stem
        return "vit_t"
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    if proj is not None:
        by_width = {width: name for name, width in VIT_WIDTHS.items()}
        return by_width.get(proj.shape[0])
    return None


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """A short guess at what an unknown checkpoint is, for error messages."""
    keys = list(state_dict)
    if any(k.startswith("memory_attention.") for k in keys):
        return "a SAM 2 checkpoint"
    if keys and not any(k.startswith(("image_encoder.", "mask_decoder.")) for k in keys):
        if "patch_embed.proj.weight" in state_dict or "patch_embed.seq.0.c.weight" in state_dict:
            return "an image encoder alone (keys lack the 'image_encoder.' prefix)"
    sample = ", ".join(keys[:3]) if keys else "no keys"
    return f"an unknown model (keys: {sample}, ...)"


def check_model_type(
    state_dict: dict[str, torch.Tensor], model_type: str | None, source: str
) -> str:
    """The checkpoint's model type; one clear error if it is unknown or not ``model_type``."""
    found = detect_model_type(state_dict)
    if found is None:
        raise CheckpointError(
            f"checkpoint {source} is not a SAM/TinySAM model: it looks like "
            f"{describe_state_dict(state_dict)}"
        )
    if model_type is not None and found != model_type:
        raise CheckpointError(
            f"checkpoint {source} is a {found} model, not {model_type}; "
            f"use --model {found} (sam_model_registry['{found}'])"
        )
    return found


def load_strict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], architecture: str, source: str
) -> None:
    """Load strictly, turning a mismatch into one line naming the offending keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong_shape),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise CheckpointError(
            f"checkpoint {source} does not match {architecture}: {'; '.join(parts)}"
        )
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- resolution


def cached_checkpoint_path(model_type: str) -> Path:
    return cache_dir() / WEIGHT_URLS[model_type].rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ResolvedCheckpoint:
    path: Path
    source: str  # "argument", "environment", "cache" or "download"


@dataclass(frozen=True)
class CheckpointContents:
    """A checkpoint found and read once: a float file's checked state dict and model type, or
    a quantized folder (``state_dict`` None: ``tinysam.quant.store`` reads its own files). A
    pickled whole model (``torch.save(model)``, e.g. the authors' Q-TinySAM) gives its float
    tensors and, in ``published_layers``, its quantized layers (``tinysam.pickled_modules``)."""

    resolved: ResolvedCheckpoint
    model_type: str | None
    state_dict: dict[str, torch.Tensor] | None
    published_layers: dict = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.state_dict is None


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """A folder written by ``tinysam quantize``, or the ``quantized.pt`` inside one."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    return (directory / QUANT_CONFIG_FILE).is_file() and (
        path.is_dir() or path.name == QUANT_WEIGHTS_FILE
    )


def read_checkpoint(
    model_type: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> CheckpointContents:
    """Find the checkpoint (``resolve_checkpoint``; vit_t's when no type is given) and read
    it: a float file's state dict, checked to hold ``model_type`` (default: what it holds)."""
    resolved = resolve_checkpoint(
        model_type or "vit_t", checkpoint, download=download, progress=progress
    )
    if is_quantized_folder(resolved.path):
        return CheckpointContents(resolved, model_type, None)
    layers = {}
    try:
        state_dict = read_state_dict(resolved.path)
    except HoldsObjectsError:
        state_dict, layers = read_pickled_model(resolved.path)
    found = check_model_type(state_dict, model_type, str(resolved.path))
    return CheckpointContents(resolved, found, state_dict, layers)


def read_pickled_model(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A model saved whole with ``torch.save(model)``, read with the restricted unpickler of
    ``tinysam.pickled_modules`` (nothing in the file runs): its tensors and quantized layers."""
    from .pickled_modules import PickledModuleError, flatten, read_pickled_module

    try:
        flat = flatten(read_pickled_module(path), str(path))
    except PickledModuleError as err:
        raise CheckpointError(str(err)) from None
    return flat.state_dict, flat.quantized


def resolve_checkpoint(
    model_type: str = "vit_t",
    checkpoint: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> ResolvedCheckpoint:
    """Find the checkpoint to use: the argument, ``TINYSAM_CHECKPOINT`` (vit_t), the cache,
    or a download of the published file into the cache."""
    if model_type not in WEIGHT_URLS:
        raise ValueError(
            f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}"
        )
    if checkpoint is not None:
        return ResolvedCheckpoint(Path(checkpoint), "argument")
    if model_type == "vit_t" and os.environ.get(CHECKPOINT_ENV):
        return ResolvedCheckpoint(Path(os.environ[CHECKPOINT_ENV]).expanduser(), "environment")
    cached = cached_checkpoint_path(model_type)
    if cached.is_file():
        return ResolvedCheckpoint(cached, "cache")
    url = WEIGHT_URLS[model_type]
    others = "pass --checkpoint PATH" + (
        f", or set {CHECKPOINT_ENV}" if model_type == "vit_t" else ""
    )
    if not download:
        raise CheckpointError(
            f"no {model_type} checkpoint found; download {url} and save it as {cached}, or {others}"
        )
    try:
        download_file(url, cached, progress=progress)
    except DownloadError as err:
        raise CheckpointError(f"{err}; save that file as {cached} by hand, or {others}") from err
    return ResolvedCheckpoint(cached, "download")
