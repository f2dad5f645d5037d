"""The distillation run's settings: ``TrainConfig`` (every key, its default and its range) and
the typed reading of a YAML mapping into it (``config_from_dict``)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from .losses import LossWeights
from .prompts import HardPromptOptions

TRAINABLE = ("all", "encoder")
OPTIMIZERS = ("adamw", "adam")
STUDENT_FILE = "student.pt"  # the trained student's plain state dict, for every tinysam tool
LAST_FILE = "last.pt"  # the whole training state, to resume from


@dataclass
class TrainConfig:
    """Everything a run depends on; ``tinysam distill train`` reads it from YAML + overrides."""

    data: str = ""
    out: str = "distill-run"
    student: str = "vit_t"  # or "small" (demo); see models.build_student
    student_checkpoint: str | None = None  # None: from scratch; e.g. MobileSAM's weights
    # Start the student's prompt encoder and mask decoder as copies of the teacher's (the
    # MobileSAM recipe; the paper does not say). Off: they start as the checkpoint has them.
    decoder_from_teacher: bool = False
    teacher: str = "vit_h"  # vit_b, vit_l, vit_h or "small" (demo)
    teacher_checkpoint: str | None = None  # None: the published SAM weights (downloaded)
    teacher_cache: str | None = None  # None: run the teacher's encoder online (small teachers)
    image_size: int = 1024
    prompts_per_image: int = 64
    box_rate: float = 0.25  # share of prompts given as the ground-truth box instead of points
    hard_prompts: bool = True
    prompt_options: HardPromptOptions = field(default_factory=HardPromptOptions)
    prompt_predictor: str = "student"  # which network predicts M_i in hard prompt sampling
    losses: LossWeights = field(default_factory=LossWeights)
    optimizer: str = "adamw"  # the paper: adam
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    epochs: int = 8
    max_steps: int | None = None
    grad_clip: float = 1.0
    accumulate: int = 1
    train: str = "all"  # or "encoder": prompt encoder and mask decoder frozen
    checkpoint_every: int = 500
    log_every: int = 10
    tensorboard: bool = True  # event files in OUT/tensorboard when tensorboard is installed
    seed: int = 0
    min_area: float = 0.0

    def __post_init__(self) -> None:
        from .models import STUDENTS, TEACHERS

        choices = {
            "student": STUDENTS,
            "teacher": TEACHERS,
            "optimizer": OPTIMIZERS,
            "train": TRAINABLE,
            "prompt_predictor": ("student", "teacher"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        positive = ("image_size", "prompts_per_image", "epochs", "accumulate")
        positive += ("checkpoint_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or null), got {self.max_steps}")
        if not 0 <= self.box_rate <= 1:  # NaN fails this too
            raise ValueError(f"box_rate must be between 0 and 1, got {self.box_rate}")
        for name in ("lr", "weight_decay", "grad_clip", "min_area"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr must be positive, warmup_steps and grad_clip not negative")
        if self.weight_decay < 0 or self.min_area < 0:
            raise ValueError(
                f"weight_decay and min_area must not be negative, got {self.weight_decay} "
                f"and {self.min_area}"
            )


_SECTIONS = {"prompt_options": HardPromptOptions, "losses": LossWeights}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _of_type(value, allowed: list[str]) -> bool:
    if value is None:
        return "None" in allowed
    if isinstance(value, bool):  # a bool is an int to Python, not to a config
        return "bool" in allowed
    return any(isinstance(value, _TYPES.get(t, ())) for t in allowed)


def _checked(cls, values: dict, prefix: str = "") -> dict:
    """``values`` with every key a field of ``cls`` and every value of the field's type."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config key {prefix}{unknown[0]}; known: {', '.join(sorted(known))}"
        )
    checked = {}
    for name, value in values.items():
        if name in _SECTIONS and prefix == "":
            checked[name] = _SECTIONS[name](**_checked(_SECTIONS[name], value, f"{name}."))
            continue
        allowed = [t.strip() for t in str(known[name].type).split("|")]
        if "float" in allowed and isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if not _of_type(value, allowed):
            raise ValueError(
                f"config key {prefix}{name} must be {' or '.join(allowed)}, got {value!r}"
            )
        checked[name] = float(value) if allowed == ["float"] else value
    return checked


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a (YAML) mapping, nested sections included; unknown keys, values of
    the wrong type and values out of range are one-line errors."""
    return TrainConfig(**_checked(TrainConfig, values))


def read_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """A TrainConfig from a YAML file (or the defaults) with ``KEY=VALUE`` overrides applied,
    nested keys with a dot (``prompt_options.accumulate=true``), each VALUE read as YAML."""
    import yaml

    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            message = str(err).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML: {message}") from err
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of config keys")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"--set wants KEY=VALUE, got {override!r}")
        section = values
        *parents, leaf = key.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
            if not isinstance(section, dict):
                raise ValueError(f"--set {key}: {parent} is not a section")
        try:
            section[leaf] = yaml.safe_load(text)
        except yaml.YAMLError:
            section[leaf] = text
    return config_from_dict(values)
