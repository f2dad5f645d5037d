"""The ``tinysam distill`` steps as library calls, so that the command only parses: caching the
teacher's embeddings (here, or as a Ray job of shards), and a training run, alone or as one
rank of ``torchrun`` (process group set up from RANK / WORLD_SIZE / LOCAL_RANK: gloo on CPU,
nccl on GPU)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..devices import torch_device
from .config import LAST_FILE, STUDENT_FILE, TrainConfig


def cache_teacher_here(
    data: str | os.PathLike,
    out: str | os.PathLike,
    teacher: str,
    checkpoint: str | os.PathLike | None,
    image_size: int,
    shard_size: int,
    device,
    progress: bool = False,
) -> dict:
    """The teacher's embeddings of every image of ``data`` not yet in ``out`` (resumable);
    returns the summary (images, cached now, skipped, shards)."""
    import torch
    from tqdm.auto import tqdm

    from .data import SA1BDataset
    from .models import build_teacher
    from .teacher_cache import cache_teacher, read_index

    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    dataset = SA1BDataset(data, image_size)
    names = [entry.name for entry in dataset.entries]
    index = read_index(Path(out))
    done = {n for shard in index["shards"] for n in shard["names"]} if index else set()
    todo = sum(name not in done for name in names)
    model = build_teacher(teacher, image_size, checkpoint, progress=progress)
    encoder = model.image_encoder.to(device)

    def encode(image: torch.Tensor) -> torch.Tensor:
        return encoder(image.to(device))

    with tqdm(total=todo, unit="image", disable=not progress) as bar:
        index = cache_teacher(encode, dataset, out, teacher, shard_size, names, bar.update)
    return {
        "teacher": teacher,
        "images": len(names),
        "cached_now": todo,
        "skipped": len(names) - todo,
        "shards": len(index["shards"]),
        "out": str(out),
    }


def sharded_cache_job(
    data: Path,
    out: Path,
    teacher: str,
    checkpoint: Path | None,
    image_size: int,
    shard_size: int,
    device,
):
    """A ``TeacherCacheJob`` over ``out``'s shards and its items (shard numbers), for
    ``tinysam.batch``; a folder cached another way is refused first."""
    from .data import SA1BDataset
    from .teacher_cache import TeacherCacheJob, chunks, read_index

    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    index = read_index(out)
    if index is not None and index.get("shard_size") != shard_size:
        how = "without --ray" if "shard_size" not in index else "with another --shard-size"
        raise ValueError(f"{out} was cached {how}; use another --out")
    if index is not None and index.get("teacher") != teacher:
        raise ValueError(f"{out} holds embeddings of {index.get('teacher')}; use another --out")
    names = [entry.name for entry in SA1BDataset(data, image_size).entries]
    job = TeacherCacheJob(
        str(Path(data).resolve()),
        str(Path(out).resolve()),
        teacher,
        None if checkpoint is None else str(Path(checkpoint).resolve()),
        image_size,
        shard_size,
        names,
        "cuda" if device.type == "cuda" else "cpu",
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    return job, [str(k) for k in range(len(chunks(names, shard_size)))]


def finish_sharded_cache(job, batch) -> dict:
    """The index of the shards a Ray run finished, and its summary."""
    from .teacher_cache import chunks, write_sharded_index

    count = len(chunks(job.names, job.shard_size))
    index = write_sharded_index(job.out, job.teacher, job.shard_size, count)
    failed = {name: why for r in batch.results for name, why in r["failed"].items()}
    summary = {
        "teacher": job.teacher,
        "images": len(job.names),
        "shards": len(index["shards"]),
        "cached": sum(len(shard["names"]) for shard in index["shards"]),
        "seconds": round(batch.seconds, 3),
        "per_worker": batch.per_worker,
        "out": job.out,
    }
    if failed or batch.failed:
        summary["failed"] = sorted(failed) + [f"shard {k}" for k in batch.failed]
    if batch.stopped:
        summary["stopped"] = batch.stopped
    return summary


@contextlib.contextmanager
def distributed(device_name: str) -> Iterator[tuple[int, int, object]]:
    """This process's (rank, world size, device) under ``torchrun``, its process group set up
    for the run and taken down after; alone: (0, 1, the device)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, world_size, device
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train(
    config: TrainConfig,
    device_name: str = "auto",
    resume: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict | None:
    """A training run (this rank's share under ``torchrun``); ``resume``: a checkpoint to go
    on from exactly, or "" for ``OUT/last.pt``. Returns the summary on rank 0, else None."""
    from .models import build_student, build_teacher
    from .trainer import Distiller

    if not config.data:
        raise ValueError("no training data: set data: in the config or --set data=DIR")
    with distributed(device_name) as (rank, world_size, device):
        student = build_student(config.student, config.image_size, config.student_checkpoint)
        teacher = build_teacher(
            config.teacher,
            config.image_size,
            config.teacher_checkpoint,
            with_image_encoder=config.teacher_cache is None,
            progress=progress and rank == 0,
        )
        distiller = Distiller(student, teacher, config, rank, world_size, device)
        if resume is not None:
            checkpoint = Path(resume) if resume else Path(config.out) / LAST_FILE
            if not checkpoint.is_file():
                raise ValueError(f"nothing to resume: {checkpoint} does not exist")
            distiller.resume(checkpoint)
        history = distiller.run(progress=progress)
    if rank != 0:
        return None  # one summary per run, from rank 0
    last = history[-1] if history else {}
    return {
        "steps": distiller.step,
        "loss": last.get("total"),
        "out": config.out,
        "student": str(Path(config.out) / STUDENT_FILE),
    }
