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

import csv
import math
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write
from ..masks import chosen_masks, mask_candidates
from ..modeling import Sam
from .config import LAST_FILE, STUDENT_FILE, TrainConfig, config_from_dict  # noqa: F401  (re-exported for old imports)
from .data import SA1BDataset, Sample, ShardedSampler
from .decoding import StudentForward, as_float32, decode, evaluating, to_low_res
from .losses import (
    ModelOutputs,
    distillation_loss,
)
from .prompts import HardPromptOptions, hard_prompts
from .teacher_cache import CacheError, TeacherEmbeddings


class TrainingDiverged(ValueError):
    """The loss or the gradients stopped being finite numbers: the run stops, unsaved."""


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
                        as_float32(decode(self.teacher, teacher_embedding, *g)) for g, _ in groups
                    ]
        with self._autocast():
            student_outputs = self.model(image, [g for g, _ in groups])
        student_outputs = [as_float32(o) for o in student_outputs]
        # Losses per prompt group, weighted by its share of the prompts.
        total_prompts = sum(len(rows) for _, rows in groups)
        terms: dict[str, torch.Tensor] = {}
        for (prompt, rows), student, teacher in zip(groups, student_outputs, teacher_outputs):
            candidates = mask_candidates(0 if prompt[0] is None else prompt[0].shape[1])
            group_terms = distillation_loss(student, teacher, gt[rows], config.losses, candidates)
            for name, value in group_terms.items():
                terms[name] = terms.get(name, 0) + value * len(rows) / total_prompts
        if not bool(torch.isfinite(terms["total"])):
            values = ", ".join(f"{k} {float(v.detach()):g}" for k, v in terms.items())
            raise TrainingDiverged(
                f"the loss is not finite at step {self.step + 1} ({values}) on "
                f"{sample.name}; nothing was saved for this step: lower lr, check the data "
                "for bad annotations, or resume from the last checkpoint"
            )
        (terms["total"] / config.accumulate).backward()
        self.step += 1
        if self.step % config.accumulate == 0:
            if config.grad_clip:
                norm = nn.utils.clip_grad_norm_(self.student.parameters(), config.grad_clip)
                if not bool(torch.isfinite(norm)):
                    raise TrainingDiverged(
                        f"the gradients are not finite at step {self.step}; lower lr or "
                        "resume from the last checkpoint"
                    )
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
        path = self.out / LAST_FILE
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
