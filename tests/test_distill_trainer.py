"""The distillation loop on tiny models: it learns, it resumes exactly, DDP ranks split data."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tinysam.distill.models import small_student, small_teacher
from tinysam.distill.prompts import HardPromptOptions
from tinysam.distill.synthetic import write_synthetic_sa1b
from tinysam.distill.trainer import Distiller, TrainConfig

SIZE = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_sa1b(tmp_path_factory.mktemp("sa1b"), 6, size=(96, 128), seed=3)


def _config(data, out, **overrides) -> TrainConfig:
    base = TrainConfig(
        data=str(data),
        out=str(out),
        image_size=SIZE,
        prompts_per_image=6,
        prompt_options=HardPromptOptions(max_iterations=2),
        lr=1e-3,
        warmup_steps=2,
        epochs=100,
        max_steps=8,
        checkpoint_every=1000,
        log_every=1,
    )
    return replace(base, **overrides)


@pytest.mark.slow  # ~12 s end to end: CI's slow phase (the fast suite's budget)
def test_loss_falls(data, tmp_path):
    torch.manual_seed(0)
    config = _config(data, tmp_path, max_steps=36)
    history = Distiller(small_student(SIZE), small_teacher(SIZE), config).run(progress=False)
    losses = [row["total"] for row in history]
    assert len(losses) == 36
    assert sum(losses[-6:]) / 6 < 0.7 * sum(losses[:6]) / 6
    assert (tmp_path / "log.csv").read_text().count("\n") == 37  # header + one row per step
    assert (tmp_path / "last.pt").is_file()


def test_killed_and_resumed_run_reaches_the_same_weights(data, tmp_path):
    teacher = small_teacher(SIZE)
    whole = Distiller(small_student(SIZE), teacher, _config(data, tmp_path / "whole"))
    whole.run(progress=False)

    cut = _config(data, tmp_path / "cut", checkpoint_every=5)
    first = Distiller(small_student(SIZE), teacher, cut)
    step = first.train_step

    def killed_in_step_7(sample):
        if first.step == 6:
            raise KeyboardInterrupt
        return step(sample)

    first.train_step = killed_in_step_7
    with pytest.raises(KeyboardInterrupt):
        first.run(progress=False)  # last.pt from step 5 is all that survives
    resumed = Distiller(small_student(SIZE), teacher, cut)
    resumed.resume(tmp_path / "cut" / "last.pt")
    assert resumed.step == 5
    resumed.run(progress=False)
    for name, value in whole.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


def test_encoder_only_training_leaves_the_decoder(data, tmp_path):
    student = small_student(SIZE)
    decoder_before = {k: v.clone() for k, v in student.mask_decoder.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in student.image_encoder.state_dict().items()}
    config = _config(data, tmp_path, train="encoder", max_steps=3)
    Distiller(student, small_teacher(SIZE), config).run(progress=False)
    for k, v in student.mask_decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k])
    changed = [k for k, v in student.image_encoder.state_dict().items()
               if not torch.equal(v, encoder_before[k])]  # fmt: skip
    assert changed


def _ddp_rank(rank: int, world_size: int, data: str, out: str, init: str, seen: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        config = _config(data, out, max_steps=3)
        distiller = Distiller(small_student(SIZE), small_teacher(SIZE), config, rank, world_size)
        names = []
        step = distiller.train_step

        def recording(sample):
            names.append(sample.name)
            return step(sample)

        distiller.train_step = recording
        distiller.run(progress=False)
        # Parameters agree across ranks; BatchNorm statistics are rank 0's from the next
        # forward on (DDP broadcasts buffers then), so they are not compared.
        parameters = {k: v.detach().clone() for k, v in distiller.student.named_parameters()}
        seen[rank] = (names, parameters)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes, about 35 s: the fast suite keeps under its 15 minutes
def test_two_process_gloo_ddp(data, tmp_path):
    """Two ranks train together: disjoint images, identical parameters."""
    import torch.multiprocessing as mp

    manager = mp.Manager()
    seen = manager.dict()
    mp.spawn(
        _ddp_rank,
        args=(2, str(data), str(tmp_path / "out"), str(tmp_path / "init"), seen),
        nprocs=2,
        join=True,
    )
    (names0, weights0), (names1, weights1) = seen[0], seen[1]
    assert len(names0) == len(names1) == 3
    assert not set(names0) & set(names1)
    for name, value in weights0.items():
        assert torch.equal(value, weights1[name]), name
    assert (tmp_path / "out" / "last.pt").is_file()  # written by rank 0


def test_without_a_teacher_it_trains_on_the_ground_truth(data, tmp_path):
    """teacher=None: the distillation terms are zero and the ground-truth loss falls."""
    torch.manual_seed(0)
    config = _config(data, tmp_path, max_steps=30)
    history = Distiller(small_teacher(SIZE), None, config).run(progress=False)
    assert all(row["embedding"] == row["tokens"] == row["output"] == 0 for row in history)
    assert all(row["hard_mask_weight"] == 1 for row in history)
    losses = [row["total"] for row in history]
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(small_student(SIZE), None, replace(config, prompt_predictor="teacher"))


def test_objects_are_prompted_again_when_an_image_has_fewer(data, tmp_path):
    config = _config(data, tmp_path, prompts_per_image=13, box_rate=0.5)
    distiller = Distiller(small_student(SIZE), small_teacher(SIZE), config)
    sample = distiller.dataset[0]
    assert len(sample.annotations) < 13
    with torch.no_grad():
        embedding = distiller.student.image_encoder(sample.image[None])
    gt, groups = distiller.prompts(sample, distiller.student, embedding)
    rows = torch.cat([rows for _, rows in groups])
    assert len(gt) == 13 and sorted(rows.tolist()) == list(range(13))
    # Each object appears ceil or floor of 13 / objects times, as one ground truth.
    distinct = {tuple(m.flatten().nonzero()[:, 0].tolist()) for m in gt}
    assert len(distinct) == len(sample.annotations)


def test_agreement_of_a_model_with_itself_and_with_another(data):
    from tinysam.distill.data import SA1BDataset
    from tinysam.distill.evaluate import evaluate_agreement

    dataset = SA1BDataset(data, SIZE)
    teacher = small_teacher(SIZE)
    same = evaluate_agreement(teacher, teacher, dataset, objects_per_image=3)
    other = evaluate_agreement(small_student(SIZE), teacher, dataset, objects_per_image=3)
    for kind in ("point", "box"):
        assert same[kind].prompts == other[kind].prompts == 3 * len(dataset)
        assert same[kind].student_teacher == 1.0
        assert same[kind].student_gt == same[kind].teacher_gt == other[kind].teacher_gt
        assert other[kind].student_teacher < 1.0


def test_decoder_from_teacher_copies_prompt_encoder_and_decoder(data, tmp_path):
    teacher = small_teacher(SIZE)
    config = _config(data, tmp_path, decoder_from_teacher=True)
    student = Distiller(small_student(SIZE), teacher, config).student
    for part in ("prompt_encoder", "mask_decoder"):
        ours, theirs = getattr(student, part).state_dict(), getattr(teacher, part).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    with pytest.raises(ValueError, match="needs a teacher"):
        Distiller(small_student(SIZE), None, config)


def test_a_diverging_run_stops_and_saves_no_student(data, tmp_path):
    """A huge learning rate: the loss leaves the finite numbers, the run stops with one line
    naming the step, and no student.pt (or later checkpoint) pretends to be a result."""
    from tinysam.distill.trainer import TrainingDiverged

    config = _config(data, tmp_path / "run", lr=1e30, grad_clip=0.0, warmup_steps=0)
    with pytest.raises(TrainingDiverged, match="not finite at step"):
        Distiller(small_student(SIZE), small_teacher(SIZE), config).run(progress=False)
    assert not (tmp_path / "run" / "student.pt").exists()
