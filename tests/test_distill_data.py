"""SA-1B data: folder and tar shards read alike, exact masks, and the rank-aware sampler."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tinysam.distill.data import SA1BDataset, ShardedSampler
from tinysam.distill.synthetic import synthetic_image, write_synthetic_sa1b


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sa1b")
    plain = write_synthetic_sa1b(root / "plain", 5, size=(96, 128), seed=7)
    shards = write_synthetic_sa1b(root / "shards", 5, size=(96, 128), seed=7, shard_size=2)
    return plain, shards


def test_folder_and_shards_read_the_same(folders):
    plain, shards = (SA1BDataset(f, image_size=128) for f in folders)
    assert sorted(p.name for p in folders[1].iterdir()) == [
        "shard_00000.tar",
        "shard_00001.tar",
        "shard_00002.tar",
    ]
    assert len(plain) == len(shards) == 5
    for a, b in zip(plain, shards):
        assert a.name == b.name
        assert torch.equal(a.image, b.image)
        assert a.annotations == b.annotations


def test_masks_and_boxes_are_exact_in_the_input_frame(folders):
    dataset = SA1BDataset(folders[1], image_size=128)
    _, expected = synthetic_image(np.random.default_rng(7), (96, 128), 5)
    sample = dataset[0]
    assert sample.image.shape == (3, 128, 128)
    assert sample.original_size == sample.input_size == (96, 128)
    assert torch.equal(sample.image[:, 96:], torch.zeros(3, 32, 128))  # zero padding below
    masks = sample.masks()
    assert masks.shape == (len(expected), 128, 128)
    assert torch.equal(masks[:, :96], torch.from_numpy(expected))
    assert not masks[:, 96:].any()
    for mask, box in zip(masks, sample.boxes()):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_resizing_keeps_masks_aligned_with_the_image(folders):
    dataset = SA1BDataset(folders[0], image_size=256)  # 96x128 -> 192x256
    sample = dataset[1]
    assert sample.input_size == (192, 256)
    masks = sample.masks([0])
    assert masks.shape == (1, 256, 256) and not masks[:, 192:].any()
    original = sample.annotations[0]["area"]
    assert abs(int(masks.sum()) - 4 * original) < 0.05 * 4 * original
    box = sample.boxes([0])[0]
    x, y, w, h = sample.annotations[0]["bbox"]
    assert box.tolist() == [2 * x, 2 * y, 2 * (x + w), 2 * (y + h)]


def test_bad_data_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="SA-1B data not found"):
        SA1BDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no SA-1B images"):
        SA1BDataset(tmp_path)
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ValueError, match="not an uncompressed tar shard"):
        SA1BDataset(tmp_path)


def test_sampler_ranks_are_disjoint_and_reshuffle_each_epoch():
    ranks = [ShardedSampler(103, rank=r, world_size=4, seed=5) for r in range(4)]
    epoch0 = [list(s) for s in ranks]
    assert all(len(part) == 25 for part in epoch0)
    assert len(set().union(*map(set, epoch0))) == 100  # disjoint
    for s in ranks:
        s.set_epoch(1)
    epoch1 = [list(s) for s in ranks]
    assert epoch1 != epoch0 and len(set().union(*map(set, epoch1))) == 100
    again = ShardedSampler(103, rank=2, world_size=4, seed=5)
    assert list(again) == epoch0[2]  # the seed decides
    again.set_epoch(1, start=10)
    assert list(again) == epoch1[2][10:] and len(again) == 15
    with pytest.raises(ValueError, match="rank 4 is not in 0..3"):
        ShardedSampler(10, rank=4, world_size=4)


@pytest.mark.parametrize(
    "document, field",
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"annotations": {"a": 1}}', "must be a JSON object"),
        ('{"annotations": ["x"]}', "annotations[0] must be an object"),
        ('{"annotations": [{"segmentation": "abc", "bbox": [0, 0, 1, 1]}]}', "segmentation"),
        (
            '{"annotations": [{"segmentation": {"size": [4, 4], "counts": "0"}, '
            '"bbox": [0, NaN, 1, 1]}]}',
            "annotations[0].bbox must be 4 finite numbers",
        ),
        (
            '{"annotations": [{"segmentation": {"size": [4, 4], "counts": "0"}, '
            '"bbox": [0, 0, -1, 1]}]}',
            "bbox",
        ),
        (
            '{"annotations": [{"segmentation": {"size": [4, 4], "counts": "0"}, '
            '"bbox": [0, 0, 1, 1], "area": Infinity}]}',
            "area must be a finite number",
        ),
        ("{not json", "are not JSON"),
    ],
)
def test_malformed_annotations_name_the_file_and_field(tmp_path, document, field):
    import shutil

    root = write_synthetic_sa1b(tmp_path / "d", 2, size=(32, 48), seed=1)
    broken = sorted(root.glob("*.json"))[1]
    broken.write_text(document)
    dataset = SA1BDataset(root, image_size=64)
    dataset[0]  # the good one still reads
    with pytest.raises(ValueError, match=re.escape(field)) as err:
        dataset[1]
    assert broken.stem in str(err.value)
    shutil.rmtree(root)


def test_rich_images_have_visible_disjoint_masks_at_many_scales():
    """The demo's harder data: every annotation is the visible part of one object (no pixel
    belongs to two), big enough to count, drawn in the image; thin parts and a wide range of
    sizes occur; and a folder written with ``style="rich"`` holds the same masks."""
    from tinysam.distill.synthetic import rich_image

    rng = np.random.default_rng(3)
    areas, thin = [], 0
    for _ in range(12):
        image, masks = rich_image(rng, (96, 128), 8)
        assert image.shape == (96, 128, 3) and image.dtype == np.uint8
        assert masks.dtype == bool and len(masks) >= 1
        assert masks.sum(0).max() == 1  # occlusion: each pixel shows one object
        sizes = masks.reshape(len(masks), -1).sum(1)
        assert (sizes >= 0.002 * 96 * 128).all() and (np.diff(sizes) <= 0).all()
        areas += sizes.tolist()
        for mask in masks:  # thin: a part no wider than 3 pixels across
            eroded = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
            eroded &= mask[1:-1, :-2] & mask[1:-1, 2:]
            thin += eroded.sum() < 0.5 * mask.sum()
    assert max(areas) > 20 * min(areas)  # objects a decade apart in size, or more
    assert thin >= 3
    with pytest.raises(ValueError, match="style must be one of"):
        write_synthetic_sa1b("unused", 1, style="fancy")


def test_a_rich_folder_holds_the_generators_masks(tmp_path):
    from tinysam.distill.synthetic import rich_image

    folder = write_synthetic_sa1b(tmp_path / "rich", 2, size=(48, 64), seed=5, style="rich")
    _, expected = rich_image(np.random.default_rng(5), (48, 64), 5)
    masks = SA1BDataset(folder, image_size=64)[0].masks()
    assert torch.equal(masks[:, :48], torch.from_numpy(expected))
