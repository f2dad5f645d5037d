"""The teacher-embedding cache: exact fp16 values, resume after a kill, checksums."""

from __future__ import annotations

import json

import pytest
import torch

from tinysam.distill.data import SA1BDataset
from tinysam.distill.synthetic import write_synthetic_sa1b
from tinysam.distill.teacher_cache import CacheError, TeacherEmbeddings, cache_teacher


class _Teacher(torch.nn.Module):
    """A small stand-in encoder: 3 x 64 x 64 -> 8 x 4 x 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 16, stride=16)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = write_synthetic_sa1b(tmp_path_factory.mktemp("data"), 7, size=(48, 64), seed=1)
    return SA1BDataset(folder, image_size=64)


def test_cache_holds_the_teachers_embeddings(dataset, tmp_path):
    teacher = _Teacher()
    index = cache_teacher(teacher, dataset, tmp_path, "tiny", shard_size=3)
    assert [len(s["names"]) for s in index["shards"]] == [3, 3, 1]
    embeddings = TeacherEmbeddings(tmp_path)
    assert len(embeddings) == 7
    for sample in dataset:
        with torch.no_grad():
            expected = teacher(sample.image[None]).half().float()
        assert torch.equal(embeddings[sample.name], expected)
    with pytest.raises(KeyError, match="not in the teacher cache"):
        embeddings["nope"]


def test_a_killed_run_resumes_to_the_same_cache(dataset, tmp_path):
    teacher = _Teacher()
    cache_teacher(teacher, dataset, tmp_path / "whole", "tiny", shard_size=2)

    seen = []

    def die_after_five(n):
        seen.append(n)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_teacher(teacher, dataset, tmp_path / "killed", "tiny", 2, progress=die_after_five)
    index = json.loads((tmp_path / "killed" / "index.json").read_text())
    assert [len(s["names"]) for s in index["shards"]] == [2, 2]  # the 5th image was lost

    computed = []
    names = [e.name for e in dataset.entries]
    cache_teacher(
        teacher, dataset, tmp_path / "killed", "tiny", 2, names=names, progress=computed.append
    )
    assert len(computed) == 3  # only what was missing
    whole, resumed = TeacherEmbeddings(tmp_path / "whole"), TeacherEmbeddings(tmp_path / "killed")
    for name in names:
        assert torch.equal(whole[name], resumed[name])


def test_corrupt_and_foreign_caches(dataset, tmp_path):
    cache_teacher(_Teacher(), dataset, tmp_path, "tiny", shard_size=4)
    shard = tmp_path / "shard_00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="corrupt"):
        TeacherEmbeddings(tmp_path)[dataset.entries[0].name]
    with pytest.raises(CacheError, match="holds embeddings of tiny, not vit_h"):
        cache_teacher(_Teacher(), dataset, tmp_path, "vit_h")
    with pytest.raises(CacheError, match="no teacher cache"):
        TeacherEmbeddings(tmp_path / "empty")
