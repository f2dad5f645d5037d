"""The distillation loop: one image per step per rank, ``prompts_per_image`` prompts on it.

Per step: the student encodes the image; the teacher's embedding comes from the cache (or, for
small teachers, its encoder runs online); ground-truth objects are drawn; hard prompt sampling
makes a point prompt per object (some become box prompts at ``box_rate``); the student's and the
teacher's decoders answer the same prompts; ``losses.distillation_loss`` compares them. Plain
PyTorch: AdamW (or Adam), linear warmup then cosine decay, gradient clipping and accumulation,
DDP under ``torchrun`` (gloo on CPU, nccl on GPU), bf16 autocast on GPU.

Every random choice draws from one ``torch.Generator`` whose state is checkpointed with the
model, optimiser, scheduler and data position, so ``resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write
from ..modeling import Sam
from .data import SA1BDataset, Sample, ShardedSampler
from .losses import (
    LossWeights,
    ModelOutputs,
    chosen_masks,
    distillation_loss,
    mask_candidates,
)
from .prompts import HardPromptOptions, hard_prompts
from .teacher_cache import CacheError, TeacherEmbeddings

TRAINABLE = ("all", "encoder")
OPTIMIZERS = ("adamw", "adam")
STUDENT_FILE = "student.pt"  # the trained student's plain state dict, for every tinysam tool


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
        if not 0 <= self.box_rate <= 1:
            raise ValueError(f"box_rate must be between 0 and 1, got {self.box_rate}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr must be positive, warmup_steps and grad_clip not negative")


class StudentForward(nn.Module):
    """The student's whole forward pass as one module, so DDP sees (and syncs) every gradient:
    the image encoder once, then each group of prompts (points or boxes) against it."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor, groups: list[tuple]) -> list[ModelOutputs]:
        embedding = self.sam.image_encoder(image)
        return [decode(self.sam, embedding, *group) for group in groups]


def _float(outputs: ModelOutputs) -> ModelOutputs:
    return ModelOutputs(*(t.float() for t in vars(outputs).values()))


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode for the block, then back to the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def to_low_res(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Input-frame masks (K x S x S bool) in the decoder's low-res frame, where the losses
    compare masks: a pixel is in when most of the area it covers is."""
    return F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0] > 0.5


def decode(sam: Sam, embedding: torch.Tensor, points, labels, boxes) -> ModelOutputs:
    """Prompts (points B x N x 2 with labels B x N, or boxes B x 4) against one image
    embedding: every mask token's low-res logits, the IoU predictions and the tokens."""
    point_prompt = None if points is None else (points, labels)
    sparse, dense = sam.prompt_encoder(points=point_prompt, boxes=boxes, masks=None)
    masks, iou, tokens = sam.mask_decoder.predict_masks(
        embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, return_tokens=True
    )
    return ModelOutputs(embedding, tokens, masks, iou)


class Distiller:
    """Trains ``student`` on ``config``'s data. ``teacher=None`` trains on the ground truth
    alone (the distillation terms drop out): how the demo pre-trains its small teacher."""

    def __init__(
        self,
        student: Sam,
        teacher: Sam | None,
        config: TrainConfig,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.student = student.to(self.device).train()
        self.teacher = teacher
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        elif config.teacher_cache or config.prompt_predictor == "teacher":
            raise ValueError("teacher_cache and prompt_predictor: teacher need a teacher")
        if config.decoder_from_teacher:
            if teacher is None:
                raise ValueError("decoder_from_teacher needs a teacher")
            for part in ("prompt_encoder", "mask_decoder"):
                getattr(self.student, part).load_state_dict(getattr(teacher, part).state_dict())
        self._freeze_unused()
        model = StudentForward(self.student)
        if world_size > 1:
            # Which prompt embeddings a step uses depends on its prompts (labels, boxes).
            model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            # TinyViT's depthwise conv weights (C x 1 x 3 x 3) get gradients whose stride on
            # the size-1 dim differs from the bucket's: the same memory order, so DDP's
            # warning about it is noise.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        self.model = model
        self.dataset = SA1BDataset(config.data, config.image_size, config.min_area)
        self.sampler = ShardedSampler(len(self.dataset), rank, world_size, config.seed)
        self.cache = TeacherEmbeddings(config.teacher_cache) if config.teacher_cache else None
        if self.cache is not None:
            self._check_cache()
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config.optimizer]
        decay = config.weight_decay if config.optimizer == "adamw" else 0.0
        self.optimizer = optimizer_class(params, lr=config.lr, weight_decay=decay)
        self.total_steps = config.max_steps or config.epochs * len(self.sampler)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
        self.step = 0
        self.epoch = 0
        self.position = 0  # images of this epoch already used by this rank
        self.out = Path(config.out)
        self._tensorboard = None  # opened at the first log line (rank 0)
        self._tensorboard_missing = False

    # ------------------------------------------------------------------ setup

    def _freeze_unused(self) -> None:
        encoder = self.student.image_encoder
        for name in ("norm_head", "head"):  # TinyViT's classifier: not part of SAM
            if hasattr(encoder, name):
                getattr(encoder, name).requires_grad_(False)
        if self.config.train == "encoder":
            self.student.prompt_encoder.requires_grad_(False)
            self.student.mask_decoder.requires_grad_(False)

    def _check_cache(self) -> None:
        """Fail now, not hours in: the cache must be this teacher's, at this size, for all data."""
        index, where = self.cache.index, self.config.teacher_cache
        if index.get("teacher") != self.config.teacher:
            raise CacheError(
                f"teacher cache {where} holds {index.get('teacher')} embeddings, "
                f"but the teacher is {self.config.teacher}"
            )
        grid = self.config.image_size // 16
        if index.get("shape", [0, grid, grid])[-2:] != [grid, grid]:
            raise CacheError(
                f"teacher cache {where} holds {index['shape'][-2]}x{index['shape'][-1]} "
                f"embeddings; image_size {self.config.image_size} needs {grid}x{grid}"
            )
        missing = [e.name for e in self.dataset.entries if e.name not in self.cache]
        if missing:
            raise CacheError(
                f"{len(missing)} of {len(self.dataset)} images (e.g. {missing[0]}) have no "
                f"embedding in {where}; run `tinysam distill cache-teacher` on the same data"
            )

    def _autocast(self):
        """bf16 autocast on GPUs (the losses are then computed in float32); off on the CPU."""
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        )

    def _lr_factor(self, step: int) -> float:
        warmup = self.config.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ------------------------------------------------------------------ one step

    def prompts(self, sample: Sample, network: Sam, embedding: torch.Tensor):
        """Ground truths (K x S/4 x S/4, the low-res frame) and prompt groups for them:
        [(points, labels, None), (None, None, boxes)] with the ground-truth rows of each."""
        config = self.config
        objects = len(sample.annotations)
        order = torch.randperm(objects, generator=self.generator)[: config.prompts_per_image]
        # Images with fewer objects than prompts prompt some objects again (other points).
        repeats = math.ceil(config.prompts_per_image / objects)
        chosen = order.repeat(repeats)[: config.prompts_per_image]
        full = sample.masks(order.tolist()).repeat(repeats, 1, 1)[: len(chosen)]
        count = len(chosen)
        low = network.prompt_encoder.mask_input_size
        gt = to_low_res(full, low)
        use_box = torch.rand(count, generator=self.generator) < config.box_rate
        scale = full.shape[-1] / low[-1]  # points are sampled low-res, prompted full-res

        def predict(rows, points, labels):
            out = decode(network, embedding, points.to(self.device) * scale, labels, None)
            candidates = mask_candidates(points.shape[1])
            return chosen_masks(out.masks, out.iou, candidates).cpu()  # what a user would see

        options = config.prompt_options if config.hard_prompts else HardPromptOptions(0)
        point_rows = (~use_box).nonzero()[:, 0]
        points, labels, _ = hard_prompts(gt[point_rows], predict, options, self.generator)
        groups = []
        if len(point_rows):
            prompt = (points.to(self.device) * scale, labels.to(self.device), None)
            groups.append((prompt, point_rows))
        box_rows = use_box.nonzero()[:, 0]
        if len(box_rows):
            boxes = sample.boxes(chosen[box_rows].tolist()).to(self.device)
            groups.append(((None, None, boxes), box_rows))
        return gt.to(self.device), groups

    def train_step(self, sample: Sample) -> dict[str, float]:
        config = self.config
        image = sample.image[None].to(self.device)
        with torch.no_grad():
            if self.cache is not None:
                teacher_embedding = self.cache[sample.name].to(self.device)
            elif self.teacher is not None:
                teacher_embedding = self.teacher.image_encoder(image)
            if config.prompt_predictor == "teacher":
                network, embedding = self.teacher, teacher_embedding
                gt, groups = self.prompts(sample, network, embedding)
            else:
                # The student's own guesses: one extra encoder pass without gradients, in eval
                # mode so BatchNorm statistics are updated once per step, by the trained pass.
                with evaluating(self.student):
                    embedding = self.student.image_encoder(image)
                    gt, groups = self.prompts(sample, self.student, embedding)
            teacher_outputs: list[ModelOutputs | None] = [None] * len(groups)
            if self.teacher is not None:
                with self._autocast():
                    teacher_outputs = [
                        _float(decode(self.teacher, teacher_embedding, *g)) for g, _ in groups
                    ]
        with self._autocast():
            student_outputs = self.model(image, [g for g, _ in groups])
        student_outputs = [_float(o) for o in student_outputs]
        # Losses per prompt group, weighted by its share of the prompts.
        total_prompts = sum(len(rows) for _, rows in groups)
        terms: dict[str, torch.Tensor] = {}
        for (prompt, rows), student, teacher in zip(groups, student_outputs, teacher_outputs):
            candidates = mask_candidates(0 if prompt[0] is None else prompt[0].shape[1])
            group_terms = distillation_loss(student, teacher, gt[rows], config.losses, candidates)
            for name, value in group_terms.items():
                terms[name] = terms.get(name, 0) + value * len(rows) / total_prompts
        (terms["total"] / config.accumulate).backward()
        self.step += 1
        if self.step % config.accumulate == 0:
            if config.grad_clip:
                nn.utils.clip_grad_norm_(self.student.parameters(), config.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    # ------------------------------------------------------------------ the loop

    def run(self, progress: bool = True) -> list[dict[str, float]]:
        """Train until ``max_steps`` or the last epoch; returns the logged rows."""
        from tqdm.auto import tqdm

        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        history = []
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not progress or self.rank != 0,
            unit="step",
        )
        while self.step < self.total_steps and self.epoch < config.epochs:
            self.sampler.set_epoch(self.epoch, self.position)
            for index in self.sampler:
                start = time.perf_counter()
                sample = self.dataset[index]
                self.position += 1
                if not sample.annotations:  # nothing to prompt (e.g. all under min_area)
                    continue
                row = self.train_step(sample)
                row.update(step=self.step, epoch=self.epoch, seconds=time.perf_counter() - start)
                row["lr"] = self.scheduler.get_last_lr()[0]
                history.append(row)
                bar.update()
                bar.set_postfix(loss=f"{row['total']:.4f}")
                if self.rank == 0 and self.step % config.log_every == 0:
                    self._log(row)
                if self.step % config.checkpoint_every == 0:
                    self.save()
                if self.step >= self.total_steps:
                    break
            else:
                self.epoch += 1
                self.position = 0
        bar.close()
        self.save()
        if self.rank == 0:
            with atomic_write(self.out / STUDENT_FILE, "wb") as f:
                torch.save(self.student.state_dict(), f)
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        return history

    def _log(self, row: dict) -> None:
        path = self.out / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        writer = self._tensorboard_writer()
        if writer is not None:
            for name, value in row.items():
                if name not in ("step", "epoch"):
                    writer.add_scalar(f"train/{name}", value, row["step"])

    def _tensorboard_writer(self):
        """A SummaryWriter on OUT/tensorboard, or None (off, or tensorboard not installed:
        then one warning, and the CSV log goes on alone)."""
        if not self.config.tensorboard or self._tensorboard_missing:
            return None
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed, logging to log.csv only: "
                    "pip install 'tinysam[train]'",
                    stacklevel=2,
                )
                self._tensorboard_missing = True
                return None
            self._tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step)
        return self._tensorboard

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "config": asdict(self.config),  # plain dicts and scalars: weights_only loads it
        }

    def save(self) -> Path | None:
        """Write ``last.pt`` (rank 0 only; others have the same weights) atomically."""
        if self.rank != 0:
            return None
        path = self.out / "last.pt"
        with atomic_write(path, "wb") as f:
            torch.save(self.state(), f)
        return path

    def resume(self, path: str | os.PathLike) -> None:
        """Continue exactly where ``path`` (a ``last.pt``) left off."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]


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
