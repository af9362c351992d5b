"""Augmented copies of labeled slices for decoder fine-tuning (ragseg.augment)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragseg.augment import (
    augmented_copies,
    border_background,
    frame_is_background,
    random_affine_intensity,
    with_augmented_copies,
)


def _pairs():
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((40, 56), (64, 48)):  # patients scanned at different sizes
        x = np.zeros((h, w), np.float32)  # a dark frame around the "body", as in MRI / CT
        x[4:-4, 4:-4] = 0.1 + rng.random((h - 8, w - 8)).astype(np.float32) * 0.4
        y = np.zeros((h, w), np.uint8)
        y[10:25, 12:30] = 1
        y[12:20, 32:44] = 3
        x[y == 1] = 0.9
        out.append((x, y))
    return [p[0] for p in out], [p[1] for p in out]


def test_copies_stay_on_each_slice_grid_keep_labels_and_repeat_with_the_seed():
    xs, ys = _pairs()
    ax, ay, src = augmented_copies(xs, ys, copies=2, seed=5)
    assert len(ax) == len(ay) == 4 and src == [0, 1, 0, 1]
    for i, (x, y) in enumerate(zip(ax, ay)):
        src_x, src_y = xs[i % 2], ys[i % 2]  # copy 1 of every pair, then copy 2
        assert x.shape == src_x.shape and y.shape == src_y.shape and y.dtype == src_y.dtype
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert set(np.unique(y)) <= {0, 1, 3} and (y == 1).any()
        assert not np.array_equal(y, src_y) or not np.allclose(x, src_x)  # actually transformed
        # the label moved with the image: the bright structure is where label 1 is
        assert x[y == 1].mean() > x[y == 0].mean() + 0.2
    bx, by, _ = augmented_copies(xs, ys, copies=2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(ax + ay, bx + by))
    cx, _, _ = augmented_copies(xs, ys, copies=2, seed=6)
    assert not all(np.array_equal(a, b) for a, b in zip(ax, cx))
    assert augmented_copies(xs, ys, copies=0) == ([], [], [])


def test_only_slices_framed_by_background_are_copied():
    """A copy leaves part of its frame, which gets 0. A slice framed by background (air around the
    body) loses nothing by that; a crop that is tissue to its edge would get a dark wedge no real
    image of its kind has, so it is not copied."""
    tissue = np.random.default_rng(0).uniform(0.45, 0.55, (48, 48)).astype(np.float32)  # tissue to the edge
    tissue[20:28, 20:28] = 0.8
    dark = np.zeros((48, 48), np.float32)
    dark[12:36, 12:36] = 0.6  # an object on a dark field
    y = np.zeros((48, 48), np.uint8)
    assert border_background(tissue) == pytest.approx(0.5, abs=0.02) and border_background(dark) == 0.0
    assert not frame_is_background(tissue) and frame_is_background(dark)
    # the zero fill on a tissue crop does leave wedges: why it is not copied
    zx, _ = random_affine_intensity(torch.from_numpy(np.stack([tissue] * 6))[:, None],
                                    torch.from_numpy(np.stack([y] * 6).astype(np.int64))[:, None],
                                    np.random.default_rng(1))
    assert min(float(x.min()) for x in zx) < 0.1
    ax, _, src = augmented_copies([tissue, dark, tissue, dark], [y] * 4, copies=2, seed=1)
    assert src == [1, 3, 1, 3]
    assert all(float(np.median(np.concatenate([x[0], x[-1]]))) < 0.06 for x in ax)  # dark stays dark
    sl, _, groups = with_augmented_copies([tissue, dark], [y, y], ["p1", "p2"], copies=1)
    assert len(sl) == 3 and groups == ["p1", "p2", "p2"]


def test_copies_keep_their_patient():
    xs, ys = _pairs()
    sl, lb, groups = with_augmented_copies(xs, ys, ["p1", "p2"], copies=2, seed=0)
    assert len(sl) == len(lb) == len(groups) == 6
    assert groups == ["p1", "p2"] * 3
    assert sl[0] is xs[0] and lb[1] is ys[1]  # originals first, untouched
    sl, lb, groups = with_augmented_copies(xs, ys, ["p1", "p2"], copies=0)
    assert len(sl) == 2 and groups == ["p1", "p2"]


def test_cli_rejects_a_negative_copy_count():
    from ragseg.cli import main

    with pytest.raises(SystemExit):
        main(["finetune", "imgs", "--out", "x", "--augment-copies", "-1"])
