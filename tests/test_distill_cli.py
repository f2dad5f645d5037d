"""`tinysam distill`: cache-teacher, train (YAML + overrides, resume, torchrun), demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tinysam.build import read_state_dict
from tinysam.distill.models import small_teacher
from tinysam.distill.synthetic import write_synthetic_sa1b
from tinysam.distill.trainer import TrainConfig, config_from_dict
from tinysam.io import DONE, output_state

from conftest import one_error_line, run_cli

SIZE = 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_sa1b(tmp_path_factory.mktemp("sa1b"), 5, size=(96, 128), seed=4)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(small_teacher(SIZE).state_dict(), path)
    return path


def _train_config(tmp_path, data, **extra) -> dict:
    config = {
        "data": str(data),
        "out": str(tmp_path / "run"),
        "student": "small",
        "teacher": "small",
        "image_size": SIZE,
        "prompts_per_image": 4,
        "prompt_options": {"max_iterations": 1},
        "lr": "1e-3",  # YAML reads this as a string; the config takes it as a float
        "warmup_steps": 1,
        "max_steps": 4,
        "log_every": 1,
        "checkpoint_every": 2,
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return config


def test_print_config_round_trips(capsys):
    code, out, _ = run_cli(capsys, "distill", "train", "--print-config", "--set", "lr=2e-4",
                           "--set", "prompt_options.accumulate=true")  # fmt: skip
    assert code == 0
    config = config_from_dict(yaml.safe_load(out))
    assert config.lr == 2e-4 and config.prompt_options.accumulate is True
    assert config.teacher == TrainConfig().teacher and config.losses == TrainConfig().losses


@pytest.mark.parametrize(
    "override, words",
    [
        ("lr=fast", "lr must be float"),
        ("frobnicate=1", "unknown config key frobnicate"),
        ("losses.gamma=2", "unknown config key losses.gamma"),
        ("prompts_per_image=0", "prompts_per_image must be at least 1"),
        ("hard_prompts=3", "hard_prompts must be bool"),
        ("optimizer=sgd", "optimizer: 'sgd' is not one of adamw, adam"),
        ("student=vit_h", "student: 'vit_h' is not one of"),
        ("box_rate=1.5", "box_rate must be between 0 and 1"),
        ("lr", "--set wants KEY=VALUE"),
        ("lr=.inf", "lr must be a finite number"),
        ("grad_clip=.nan", "grad_clip must be a finite number"),
        ("weight_decay=.nan", "weight_decay must be a finite number"),
        ("weight_decay=-1", "weight_decay and min_area must not be negative"),
        ("min_area=-5", "weight_decay and min_area must not be negative"),
        ("box_rate=.nan", "box_rate must be between 0 and 1, got nan"),
        ("losses.focal=-20", "losses.focal must be a finite number >= 0"),
        ("losses.dice=.inf", "losses.dice must be a finite number >= 0"),
        ("prompt_options.max_iterations=-1", "max_iterations must be >= 0"),
    ],
)
def test_bad_config_is_one_line_exit_2(capsys, tmp_path, override, words):
    code, _, err = run_cli(capsys, "distill", "train", "--print-config", "--set", override)
    assert code == 2
    assert words in one_error_line(err, "distill")


def test_bad_yaml_and_missing_data(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    code, _, err = run_cli(capsys, "distill", "train", bad)
    assert code == 2 and "is not valid YAML" in one_error_line(err, "distill")
    code, _, err = run_cli(capsys, "distill", "train", "--set", "student=small")
    assert code == 2 and "no training data" in one_error_line(err, "distill")


def test_cache_teacher_then_train_from_the_cache_and_resume(
    capsys, tmp_path, data, teacher_checkpoint
):
    cache = tmp_path / "cache"
    cache_args = ["distill", "cache-teacher", "--teacher", "small", "--checkpoint",
                  teacher_checkpoint, "--data", data, "--out", cache, "--image-size", SIZE,
                  "--shard-size", 2]  # fmt: skip
    code, out, err = run_cli(capsys, *cache_args)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["cached_now"] == 5 and summary["shards"] == 3
    code, out, _ = run_cli(capsys, *cache_args)  # everything is there: nothing recomputed
    assert code == 0 and json.loads(out)["skipped"] == 5

    config = _train_config(
        tmp_path, data, teacher_cache=str(cache), teacher_checkpoint=str(teacher_checkpoint)
    )
    code, out, err = run_cli(capsys, "distill", "train", tmp_path / "run.yaml")
    assert code == 0, err
    run = tmp_path / "run"
    assert json.loads(out)["steps"] == 4
    assert (run / "log.csv").read_text().count("\n") == 5
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    student = read_state_dict(run / "student.pt")
    assert set(student) == set(read_state_dict(run / "last.pt"))  # last.pt reads as weights too

    code, out, err = run_cli(capsys, "distill", "train", tmp_path / "run.yaml", "--resume",
                             "--set", "max_steps=6")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["steps"] == 6
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 6 and state["config"]["teacher_cache"] == config["teacher_cache"]


def test_train_refuses_a_cache_of_another_size_or_missing_images(
    capsys, tmp_path, data, teacher_checkpoint
):
    cache = tmp_path / "cache"
    args = ["distill", "cache-teacher", "--teacher", "small", "--data", data, "--out", cache]
    code, _, err = run_cli(capsys, *args, "--checkpoint", teacher_checkpoint, "--image-size", 64)
    assert code == 2  # the checkpoint is for 128-pixel inputs
    assert "does not match the small teacher" in one_error_line(err, "distill")
    code, _, err = run_cli(capsys, *args, "--image-size", 64)  # a random one is fine here
    assert code == 0, err
    _train_config(tmp_path, data, teacher_cache=str(cache))
    code, _, err = run_cli(capsys, "distill", "train", tmp_path / "run.yaml")
    assert code == 2 and "holds 4x4 embeddings" in one_error_line(err, "distill")

    more = write_synthetic_sa1b(tmp_path / "more", 7, size=(96, 128), seed=4)
    cache = tmp_path / "cache128"
    code, _, err = run_cli(capsys, "distill", "cache-teacher", "--teacher", "small",
                           "--data", data, "--out", cache, "--image-size", SIZE)  # fmt: skip
    assert code == 0, err
    _train_config(tmp_path, more, teacher_cache=str(cache))
    code, _, err = run_cli(capsys, "distill", "train", tmp_path / "run.yaml")
    assert code == 2 and "2 of 7 images" in one_error_line(err, "distill")


def test_cache_teacher_errors(capsys, tmp_path, data):
    code, _, err = run_cli(capsys, "distill", "cache-teacher", "--teacher", "vit_h",
                           "--data", data, "--out", tmp_path, "--image-size", SIZE)  # fmt: skip
    assert code == 2 and "vit_h works on 1024-pixel inputs" in one_error_line(err, "distill")
    code, _, err = run_cli(capsys, "distill", "cache-teacher", "--teacher", "small",
                           "--data", tmp_path / "nowhere", "--out", tmp_path)  # fmt: skip
    assert code == 2 and "SA-1B data not found" in one_error_line(err, "distill")


def test_student_from_a_checkpoint_of_the_wrong_model(capsys, tmp_path, data, vit_t_checkpoint):
    _train_config(tmp_path, data, student_checkpoint=str(vit_t_checkpoint))
    code, _, err = run_cli(capsys, "distill", "train", tmp_path / "run.yaml")
    assert code == 2
    assert "does not match the small student" in one_error_line(err, "distill")


@pytest.mark.slow  # ~12 s end to end: CI's slow phase (the fast suite's budget)
def test_torchrun_two_ranks(tmp_path, data):
    """The command under torchrun: two gloo ranks, one checkpoint written by rank 0."""
    _train_config(tmp_path, data, max_steps=2, checkpoint_every=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "tinysam.cli", "distill", "train",
               str(tmp_path / "run.yaml"), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["steps"] == 2  # rank 0's
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 2


def test_demo_prints_before_and_after(capsys, tmp_path):
    code, out, err = run_cli(capsys, "distill", "demo", "--out", tmp_path, "--steps", 2,
                             "--teacher-steps", 2, "--train-images", 3, "--eval-images", 2,
                             "--prompts", 4, "--no-hard-mask-weighting")  # fmt: skip
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| + hard prompt sampling")]
    assert [row.split("|")[2].strip() for row in rows] == ["point", "box"]
    results = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(results) == 1
    result = results[0]
    assert result["hard_prompts"] is True and result["hard_mask_weighting"] is False
    for agreement in (result["before"]["point"], result["after"]["box"]):
        assert 0 <= agreement["student_teacher"] <= 1 and agreement["prompts"] > 0
    # The teacher and its cache are reused by a second run.
    stamp = (tmp_path / "teacher" / "student.pt").stat().st_mtime_ns
    code, _, err = run_cli(capsys, "distill", "demo", "--out", tmp_path, "--steps", 1,
                           "--teacher-steps", 2, "--train-images", 3, "--eval-images", 2,
                           "--prompts", 4)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "teacher" / "student.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow  # ~50 s: five tiny distillation runs and their evaluations
def test_demo_seeds_summarise_and_resume_only_what_matches(capsys, tmp_path):
    """--seeds: a student per seed, their spread in OUT (table, JSON, plot); a second run
    reuses each stage made with the same settings, redoes what changed, and never touches
    a folder it did not make."""
    tiny = ["--steps", 1, "--teacher-steps", 1, "--train-images", 2, "--eval-images", 1,
            "--prompts", 2, "--data", "rich"]  # fmt: skip
    out = tmp_path / "demo"
    code, printed, err = run_cli(capsys, "distill", "demo", "--out", out, "--seeds", 2, *tiny)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())["runs"]
    assert [r["seed"] for r in results] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    both = summary["variants"]["+ both (TinySAM)"]["box"]["student_gt"]
    assert len(both["values"]) == 2 and both["std"] >= 0
    assert (out / "ablation.md").read_text().strip() in printed
    assert output_state(out / "ablation.png") == DONE  # a whole PNG, marked as ours

    code, _, err = run_cli(capsys, "distill", "demo", "--out", out, "--seeds", 2, *tiny)
    assert code == 0 and err.count("reusing") == 2  # both students; data and teacher too
    assert "training the small teacher" not in err and "writing" not in err
    assert json.loads((out / "results.json").read_text())["runs"] == results

    record = out / "seed_1" / "student_hps1_hmw1" / "made_with.json"
    tampered = json.loads(record.read_text())
    tampered["result"]["after"]["box"]["student_gt"] = "NaN"
    record.write_text(json.dumps(tampered))
    code, _, err = run_cli(capsys, "distill", "demo", "--out", out, "--seeds", 2, *tiny)
    assert code == 0 and err.count("reusing") == 1  # the tampered record's student is redone
    assert json.loads((out / "results.json").read_text())["runs"] == results  # the same again

    record = out / "seed_0" / "student_hps1_hmw1" / "made_with.json"
    interrupted = json.loads(record.read_text())
    interrupted["finished"] = False  # as a run stopped mid-training leaves it
    record.write_text(json.dumps(interrupted))
    code, _, err = run_cli(capsys, "distill", "demo", "--out", out, "--seeds", 2, *tiny)
    assert code == 0 and err.count("reusing") == 1, err  # redone, not refused or trusted

    more = ["--steps", 2, *tiny[2:]]  # two student steps: the students again, not the teacher
    code, _, err = run_cli(capsys, "distill", "demo", "--out", out, "--seeds", 2, *more)
    assert code == 0 and "reusing" not in err and "training the small teacher" not in err

    foreign = tmp_path / "theirs"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "distill", "demo", "--out", foreign, *tiny)
    assert code == 2 and "was not made by this demo" in one_error_line(err, "distill")
    assert (foreign / "data" / "notes.txt").read_text() == "keep me"
    for name in ("results.json", "ablation.md", "summary.json"):  # refused before any work
        theirs = tmp_path / f"theirs_{name}"
        theirs.mkdir()
        (theirs / name).write_text("[1, 2]")
        code, _, err = run_cli(capsys, "distill", "demo", "--out", theirs, "--seeds", 2, *tiny)
        assert code == 2 and "not written by tinysam" in one_error_line(err, "distill"), name
        assert (theirs / name).read_text() == "[1, 2]" and not (theirs / "data").exists()


def test_students_start_from_checkpoints(tmp_path, vit_t_checkpoint):
    """A previous run's student.pt or last.pt for the small student; TinySAM/MobileSAM
    weights (vit_t layout, here the golden checkpoint) for vit_t."""
    from tinysam.distill.models import build_student, small_student

    trained = small_student(SIZE, seed=7)
    torch.save({"student": trained.state_dict(), "step": 3}, tmp_path / "last.pt")
    loaded = build_student("small", SIZE, tmp_path / "last.pt")
    for name, value in trained.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    vit_t = build_student("vit_t", 1024, vit_t_checkpoint)
    expected = read_state_dict(vit_t_checkpoint)
    assert all(torch.equal(v, expected[k]) for k, v in vit_t.state_dict().items())
