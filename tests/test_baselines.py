"""Supervised baselines (UNet, DynUNet) trained on few labeled slices: they learn, stop early, cap time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragseg.baselines import BaselineConfig, _Keeper, _split, auto_size, predict_baseline, train_baseline

from .integration import needs, shared_missing


def _slices(n: int, rng: np.random.Generator, size: tuple[int, int]):
    """Bright disks (label 1) and dim squares (label 2) at random places, noisy background."""
    out = []
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    for _ in range(n):
        img = rng.normal(0.2, 0.05, size).astype(np.float32)
        lab = np.zeros(size, np.int32)
        cy, cx = rng.integers(12, h - 12), rng.integers(12, w // 2 - 4)
        d = np.hypot(yy - cy, xx - cx) < 8
        img[d], lab[d] = 0.9, 1
        sy, sx = rng.integers(4, h - 14), rng.integers(w // 2 + 2, w - 14)
        img[sy:sy + 10, sx:sx + 10], lab[sy:sy + 10, sx:sx + 10] = 0.55, 2
        out.append((np.clip(img, 0, 1), lab))
    return out


@pytest.mark.parametrize("arch", ["unet", "dynunet"])
def test_baseline_learns_from_few_slices_of_mixed_sizes(arch):
    rng = np.random.default_rng(0)
    pool = _slices(6, rng, (64, 64)) + _slices(6, rng, (56, 72))
    cfg = BaselineConfig(arch=arch, size=64, batch=4, max_iters=160, val_every=20, patience=100, time_limit_s=300)
    m = train_baseline(pool, [1, 2], groups=["a"] * 6 + ["b"] * 6, cfg=cfg, seed=0)
    assert m.info["train_slices"] + m.info["val_slices"] == 12 and m.info["val_slices"] == 6  # one patient held out
    test = _slices(4, np.random.default_rng(1), (60, 68))
    pred = predict_baseline(m, np.stack([t[0] for t in test]))
    assert pred.shape == (4, 60, 68) and set(np.unique(pred)) <= {0, 1, 2}
    for v in (1, 2):
        p, g = pred == v, np.stack([t[1] for t in test]) == v
        dice = 2 * (p & g).sum() / (p.sum() + g.sum())
        # measured with data and training seeds 0, 1, 2 (this recipe, 160 iterations): per class
        # unet 0.88-0.96, dynunet 0.94-0.97; untrained nets score ~0
        assert dice > 0.7, (arch, v, dice)


def test_baseline_stops_early_and_respects_its_time_cap():
    rng = np.random.default_rng(0)
    pool = _slices(4, rng, (64, 64))
    m = train_baseline(pool, [1, 2], cfg=BaselineConfig(size=64, batch=2, max_iters=100000, val_every=5, patience=2,
                                                        time_limit_s=120), seed=0)
    assert m.info["stopped"] in ("early_stopping", "time_limit") and m.info["iters"] < 100000
    t = train_baseline(pool, [1, 2], cfg=BaselineConfig(size=64, batch=2, max_iters=100000, val_every=10 ** 6,
                                                        patience=10 ** 6, time_limit_s=3), seed=0)
    assert t.info["stopped"] == "time_limit" and t.info["train_s"] < 30 and t.info["best_val"] >= 0


def test_split_holds_out_whole_patients():
    rng = np.random.default_rng(0)
    groups = ["p1"] * 5 + ["p2"] * 4 + ["p3"] * 6 + ["p4"] * 5 + ["p5"] * 3
    tr, va = _split(groups, 0.2, rng)
    assert {groups[i] for i in tr}.isdisjoint({groups[i] for i in va}) and len({groups[i] for i in va}) == 1
    tr, va = _split(["p"] * 10, 0.2, rng)  # one patient: slices are held out instead
    assert len(va) == 2 and len(tr) == 8


def test_automatic_size_follows_the_labeled_slices():
    # hippocampus crops (35 x 51) train near their own resolution, not blown up to 256 px
    assert auto_size([(35, 51), (36, 48), (34, 50)]) == 64
    assert auto_size([(216, 256), (232, 256), (256, 216)]) == 256  # ACDC
    assert auto_size([(182, 218)] * 3) == 224  # MS FLAIR axial
    assert auto_size([(512, 512)]) == 256 and auto_size([(512, 512)], cap=100) == 96  # the cap, a multiple of 32
    assert auto_size([(10, 12)]) == 32
    rng = np.random.default_rng(0)
    m = train_baseline(_slices(4, rng, (40, 44)), [1, 2], cfg=BaselineConfig(max_iters=2, val_every=10 ** 6), seed=0)
    assert m.size == 64 and m.info["size"] == 64  # no size given: the pool's


def test_a_state_that_misses_a_class_is_never_kept():
    net = torch.nn.Linear(1, 1, bias=False)

    def offer(k: _Keeper, w: float, it: int, score: float, every_class: bool) -> None:
        with torch.no_grad():
            net.weight.fill_(w)
        k.offer(net, it, score, every_class)

    k = _Keeper(patience=2)
    for it in (50, 100, 150):  # an all-background phase: patience does not run out on it
        offer(k, 1.0, it, 0.5, False)
    assert k.state is None and k.bad == 0 and float(k.fallback["weight"]) == 1.0
    offer(k, 2.0, 200, 0.3, True)  # lower score, but finds every class: the one kept
    offer(k, 3.0, 250, 0.9, False)  # best score, misses a class: not kept, counts against patience
    assert float(k.state["weight"]) == 2.0 and (k.best, k.best_iter, k.bad) == (0.3, 200, 1)
    offer(k, 4.0, 300, 0.4, True)
    assert float(k.state["weight"]) == 4.0 and k.bad == 0
    offer(k, 5.0, 350, float("nan"), True)  # nothing to compare: ignored
    assert float(k.state["weight"]) == 4.0 and k.bad == 0


HIPPO = "msd-hippocampus"


@needs(shared_missing(f"{HIPPO}/hippocampus_003.nii.gz", f"{HIPPO}/labels/hippocampus_003.nii.gz",
                      f"{HIPPO}/hippocampus_001.nii.gz", f"{HIPPO}/labels/hippocampus_001.nii.gz"))
def test_dynunet_cut_short_by_its_cap_still_predicts_every_class():
    """One labeled hippocampus subject (the seed-1 pool of the learning curve, where DynUNet once
    predicted nothing): a cap that ends training in the net's all-background phase (its states at
    iterations 50-150 predict nothing there, seeds 0-3 measured) must not give an empty baseline."""
    from ragseg.pipeline import Preprocess
    from ragseg.volume import load_image, load_label

    from .integration import SHARED_DATA

    pre = Preprocess()

    def subject(name: str) -> tuple[np.ndarray, np.ndarray]:
        img = load_image(SHARED_DATA / HIPPO / f"{name}.nii.gz")
        lab = load_label(SHARED_DATA / HIPPO / "labels" / f"{name}.nii.gz", like=img)
        return pre.slices(img), pre.label_slices(lab)

    x, y = subject("hippocampus_003")
    pool = [(x[z], y[z]) for z in np.nonzero(y.any((1, 2)))[0]]
    m = train_baseline(pool, [1, 2], seed=1, cfg=BaselineConfig(arch="dynunet", time_limit_s=1.0))
    assert m.info["every_class_found"] and m.info["over_cap_s"] > 0, m.info  # trained on past the cap
    qx, qy = subject("hippocampus_001")
    pred = predict_baseline(m, qx)
    for v in (1, 2):
        p, g = pred == v, qy == v
        # each structure found on another subject: 0.16-0.67 per class measured over training seeds
        # 0-3 (this seed the lowest); a kept all-background state scores 0
        assert 2 * (p & g).sum() / (p.sum() + g.sum()) > 0.05, (v, m.info)
