from __future__ import annotations

import numpy as np

from tinysam.visualize import BOX_COLOR, MASK_COLOR, NEGATIVE_COLOR, POSITIVE_COLOR, draw_overlay


def test_overlay_tints_outlines_and_marks_prompts():
    image = np.full((200, 300, 3), 100, dtype=np.uint8)
    mask = np.zeros((200, 300), dtype=bool)
    mask[50:150, 100:200] = True
    out = draw_overlay(
        image,
        mask,
        np.array([[120.0, 60.0], [20.0, 180.0]]),
        np.array([1, 0]),
        box=np.array([90, 40, 210, 160]),
    )
    assert out.shape == image.shape and out.dtype == np.uint8
    expected_tint = np.round(0.5 * 100 + 0.5 * np.array(MASK_COLOR)).astype(np.uint8)
    assert np.array_equal(out[100, 150], expected_tint)  # inside: tinted
    assert np.array_equal(out[100, 99], MASK_COLOR)  # just outside: outline
    assert np.array_equal(out[5, 5], image[5, 5])  # far away: untouched
    assert tuple(out[60, 120]) == POSITIVE_COLOR
    assert tuple(out[180, 20]) == NEGATIVE_COLOR
    assert tuple(out[40, 150]) == BOX_COLOR
