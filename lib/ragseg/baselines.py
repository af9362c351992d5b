"""Supervised baselines trained on exactly the labeled slices the few-shot methods get.

Two networks, one training recipe made for few labels:

* ``unet``: a small MONAI 2D ``UNet`` (16-128 channels, residual units), Adam;
* ``dynunet``: MONAI ``DynUNet`` 2D with nnU-Net's defaults for a 2D configuration (3x3 kernels,
  a stride-2 stage until the bottleneck is 8 px, 32 filters doubling up to 512, instance norm,
  leaky ReLU, deep supervision), SGD with Nesterov momentum 0.99 and the poly learning-rate
  schedule. nnU-Net's 2D patch for images of this size is the whole slice, which is the default
  here too; ``patch`` trains on patches instead (a third centred on foreground, nnU-Net's
  oversampling) and still predicts whole slices. Measured on 64 px toy slices, 32 px patches
  learned far worse in the same iterations (Dice 0.84/0.03 vs 0.96/0.96), so it is off.

The recipe (both): every slice resized on its own to ``size`` x ``size`` (pool slices of
different patients differ in size); class-balanced batches (each item's class drawn uniformly
from background and the classes of the pool, then a slice that holds it); augmentation by random
rotation, scaling and translation plus intensity scale, shift and gamma (no flips: left/right
structures differ); Dice + cross-entropy; early stopping on a held-out part of the labeled pool
(whole patients when the pool has at least two, else slices), keeping the best validation
state among those that find every class (a state predicting background everywhere is never kept);
a wall-clock cap, overrun by at most ``defaults.BASELINE_OVERRUN_S`` while no state has found every
class yet. Everything is timed and returned.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import defaults
from .augment import random_affine_intensity
from .errors import RagsegError
from .volume import resize_slices

logger = logging.getLogger(__name__)

ARCHS = ("unet", "dynunet")


@dataclass
class BaselineConfig:
    """Training options of a supervised baseline (defaults in :mod:`ragseg.defaults`)."""

    arch: str = "unet"
    size: int | None = defaults.BASELINE_SIZE  # slices are resized to size x size (None: :func:`auto_size`)
    patch: int | None = None  # training patch side (None: whole slices)
    batch: int = defaults.BASELINE_BATCH
    max_iters: int = defaults.BASELINE_MAX_ITERS
    time_limit_s: float = defaults.BASELINE_TIME_LIMIT_S  # wall-clock cap on training
    val_every: int = defaults.BASELINE_VAL_EVERY  # iterations between validations
    patience: int = defaults.BASELINE_PATIENCE  # validations without improvement before stopping
    val_fraction: float = 0.2  # of the pool's patients (or slices) held out for early stopping
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise RagsegError(f"unknown baseline {self.arch!r}; choose from {', '.join(ARCHS)}")
        check_size(self.size)


def check_size(size: int | None) -> None:
    """RagsegError unless ``size`` is None (automatic) or a positive multiple of 32."""
    if size is not None and (size < 32 or size % 32):
        raise RagsegError(f"baseline size must be a positive multiple of 32 (or auto), got {size}")


def auto_size(shapes: Sequence[tuple[int, ...]], cap: int = defaults.BASELINE_MAX_SIZE) -> int:
    """The side a baseline trains at when none is given: the median long side of the labeled slices
    (``shapes`` [(H, W), ...]) rounded up to a multiple of 32, between 32 and ``cap``."""
    if not shapes:
        raise RagsegError("no labeled slice to size the baseline on")
    side = float(np.median([max(s[-2:]) for s in shapes]))
    return int(min(max(32, math.ceil(side / 32) * 32), max(32, cap // 32 * 32)))


@dataclass
class TrainedBaseline:
    net: torch.nn.Module
    labels: list[int]
    size: int
    info: dict  # arch, size, train_s, iters, best_val, best_iter, stopped (why), train/val slices


def _build(arch: str, n_out: int, size: int) -> torch.nn.Module:
    if arch == "unet":
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=1, out_channels=n_out, channels=(16, 32, 64, 128),
                    strides=(2, 2, 2), num_res_units=1)
    from monai.networks.nets import DynUNet

    # nnU-Net 2D plan: halve until the bottleneck is 8 px (at most 6 stages), filters 32 * 2^i up to 512
    n_down = min(5, int(math.log2(size // 8)))
    strides = [1] + [2] * n_down
    filters = [min(32 * 2 ** i, 512) for i in range(len(strides))]
    return DynUNet(spatial_dims=2, in_channels=1, out_channels=n_out, kernel_size=[3] * len(strides),
                   strides=strides, upsample_kernel_size=strides[1:], filters=filters, norm_name="instance",
                   act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                   deep_supervision=True, deep_supr_num=2, res_block=False)


def _split(groups: Sequence[str], fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices: whole groups (patients) when there are at least two, else items."""
    idx = np.arange(len(groups))
    names = sorted(set(groups))
    if len(names) >= 2:
        n_val = max(1, int(round(fraction * len(names))))
        val = set(rng.permutation(names)[:n_val].tolist())
        is_val = np.array([g in val for g in groups])
    else:
        n_val = max(1, int(round(fraction * len(groups)))) if len(groups) >= 2 else 0
        is_val = np.zeros(len(groups), bool)
        is_val[rng.permutation(len(groups))[:n_val]] = True
    return idx[~is_val], idx[is_val]


def _dice_per_class(pred: torch.Tensor, y: torch.Tensor, n_cls: int) -> list[float]:
    """Dice of each foreground class the ground truth holds (the slices taken as one volume)."""
    ds = []
    for c in range(1, n_cls):
        p, g = pred == c, y == c
        if int(g.sum()) > 0:
            ds.append(2 * int((p & g).sum()) / int(p.sum() + g.sum()))
    return ds


def _forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    out = net(x)
    if out.dim() == 5:  # DynUNet deep supervision in training: [B, heads, C, H, W]
        return list(out.unbind(1))
    return out


def _sample(holders: list[np.ndarray], present: list[int], batch: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced batch: a class drawn uniformly per item, then a slice holding it.
    Returns (slice indices, each item's class)."""
    c = rng.integers(0, len(holders), batch)
    return np.array([int(rng.choice(holders[i])) for i in c]), np.array([present[i] for i in c])


def _crop(x: torch.Tensor, y: torch.Tensor, patch: int, cls: np.ndarray | None,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patch per item; items with a class in ``cls`` (>0) get a patch centred on one of its pixels."""
    n, _, S, _ = x.shape
    xs, ys = [], []
    for i in range(n):
        r0, c0 = (int(v) for v in rng.integers(0, S - patch + 1, 2))
        if cls is not None and cls[i] > 0:
            rr, cc = torch.nonzero(y[i, 0] == int(cls[i]), as_tuple=True)
            if len(rr):
                j = int(rng.integers(len(rr)))
                r0 = int(np.clip(int(rr[j]) - patch // 2, 0, S - patch))
                c0 = int(np.clip(int(cc[j]) - patch // 2, 0, S - patch))
        xs.append(x[i:i + 1, :, r0:r0 + patch, c0:c0 + patch])
        ys.append(y[i:i + 1, :, r0:r0 + patch, c0:c0 + patch])
    return torch.cat(xs), torch.cat(ys)


def train_baseline(pool: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[int], *,
                   groups: Sequence[str] | None = None, cfg: BaselineConfig | None = None, seed: int = 0,
                   progress: bool = False) -> TrainedBaseline:
    """Train the baseline on (slice in [0, 1], label map) pairs of any in-plane sizes.

    groups: the patient of each pair (early stopping holds out whole patients); default one patient.
    """
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    cfg = cfg or BaselineConfig()
    cfg.validate()
    if not pool:
        raise RagsegError("no labeled slice to train the baseline on")
    labels = list(labels)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    S = cfg.size or auto_size([p[0].shape for p in pool])
    x = torch.cat([resize_slices(p[0][None], S) for p in pool])  # [n, 1, S, S]
    ys = []
    for _, lab in pool:
        y = np.zeros(lab.shape, np.int64)
        for i, v in enumerate(labels):
            y[lab == v] = i + 1
        ys.append(F.interpolate(torch.from_numpy(y)[None, None].float(), size=(S, S), mode="nearest").long())
    y = torch.cat(ys)
    tr, va = _split(list(groups) if groups is not None else ["p"] * len(pool), cfg.val_fraction, rng)
    n_cls = len(labels) + 1
    if len(va) and not bool((y[va] > 0).any()):  # a validation part without any structure cannot stop early
        tr, va = np.arange(len(pool)), np.array([], int)
    present = [c for c in range(n_cls) if c == 0 or bool((y[tr] == c).any())]
    holders = [tr if c == 0 else tr[(y[tr] == c).flatten(1).any(1).numpy()] for c in present]
    net = _build(cfg.arch, n_cls, S)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    if cfg.arch == "dynunet":
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    patch = min(cfg.patch or S, S)
    base_lr = opt.param_groups[0]["lr"]
    keep = _Keeper(cfg.patience)
    stopped, skipped, capped, overran, it = "max_iters", 0, False, False, 0
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_iters, desc=f"training {cfg.arch}", unit="it", disable=not progress)
    vidx = va if len(va) else tr
    while it < cfg.max_iters:
        net.train()
        if cfg.arch == "dynunet":  # nnU-Net's poly schedule
            for g in opt.param_groups:
                g["lr"] = base_lr * (1 - it / cfg.max_iters) ** 0.9
        pick, cls = _sample(holders, present, cfg.batch, rng)
        xb, yb = random_affine_intensity(x[pick], y[pick], rng)
        if patch < S:
            # patches centred on the item's class for a third of the batch (nnU-Net's foreground
            # oversampling), anywhere for the rest
            cls = np.where(np.arange(cfg.batch) < max(1, cfg.batch // 3), cls, 0)
            xb, yb = _crop(xb, yb, patch, cls, rng)
        out = _forward(net, xb)
        if isinstance(out, list):  # deep supervision: heads at full size, weights halving
            w = np.array([0.5 ** i for i in range(len(out))])
            w = w / w.sum()
            loss = sum(float(w[i]) * loss_fn(o, yb) for i, o in enumerate(out))
        else:
            loss = loss_fn(out, yb)
        opt.zero_grad()
        if torch.isfinite(loss):  # a non-finite loss would poison every weight through the step
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            opt.step()
        else:
            skipped += 1
        it += 1
        bar.update(1)
        validated = it % cfg.val_every == 0 or it == cfg.max_iters
        if validated:
            keep.offer(net, it, *_validate(net, x, y, vidx, n_cls))
            bar.set_postfix(val=f"{keep.last:.3f}", best=f"{keep.best:.3f}")
            if keep.bad >= cfg.patience:
                stopped = "early_stopping"
                break
        elapsed = time.perf_counter() - t0
        if elapsed > cfg.time_limit_s:
            if not capped:
                if not validated:  # the state the cap falls on may be the best one
                    keep.offer(net, it, *_validate(net, x, y, vidx, n_cls))
                overran = keep.state is None
            capped = True
            # past the cap, go on (validating at the usual pace) only while no state has found
            # every class, and not for ever
            if keep.state is not None or elapsed > cfg.time_limit_s + defaults.BASELINE_OVERRUN_S:
                stopped = "time_limit"
                break
    bar.close()
    state = keep.state if keep.state is not None else keep.fallback
    if state is not None:
        net.load_state_dict(state)
    net.eval()
    train_s = time.perf_counter() - t0
    info = {"arch": cfg.arch, "size": S, "train_s": round(train_s, 1), "iters": it,
            "best_val": keep.best if keep.state is not None else keep.fallback_score,
            "best_iter": keep.best_iter if keep.state is not None else keep.fallback_iter, "stopped": stopped,
            "every_class_found": keep.state is not None, "over_cap_s": round(train_s - cfg.time_limit_s, 1) if overran else 0.0,
            "skipped_steps": skipped, "train_slices": len(tr), "val_slices": len(va)}
    if keep.state is None:
        logger.warning("%s baseline: no validated state found every class of the pool in %d iterations (%.0f s); "
                       "keeping the best-scoring one, which misses a class", cfg.arch, it, train_s)
    logger.info("%s baseline: %s", cfg.arch, info)
    return TrainedBaseline(net, labels, S, info)


@torch.no_grad()
def _validate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray,
              n_cls: int) -> tuple[float, bool]:
    """(mean Dice over the classes the slices hold, whether it finds each of them: Dice at least
    ``defaults.BASELINE_MIN_CLASS_DICE``, above an untrained net's chance overlap)."""
    net.eval()
    preds = torch.cat([net(x[idx[s:s + 16]]).argmax(1, keepdim=True) for s in range(0, len(idx), 16)])
    ds = _dice_per_class(preds, y[idx], n_cls)
    return (float(np.mean(ds)) if ds else float("nan")), bool(ds) and min(ds) >= defaults.BASELINE_MIN_CLASS_DICE


class _Keeper:
    """Which validated weights training keeps, and when patience runs out.

    Only a state that finds every class the validation slices hold may be kept: a net early in
    training predicts background everywhere (or one class only), and keeping such a state because
    the cap or patience ended training before a better one gives a baseline that predicts nothing.
    Patience counts only once such a state exists. The best-scoring state of all is remembered as
    a last resort when none ever does.
    """

    def __init__(self, patience: int):
        self.patience = patience  # validations without improvement before stopping
        self.state: dict | None = None  # best state that found every class
        self.best, self.best_iter, self.bad = -1.0, 0, 0
        self.fallback: dict | None = None  # best-scoring state of any kind
        self.fallback_score, self.fallback_iter = -1.0, 0
        self.last = float("nan")

    def offer(self, net: torch.nn.Module, it: int, score: float, every_class: bool) -> None:
        self.last = score
        if score != score:  # NaN: the validation slices hold no class; nothing to compare
            return
        if score > self.fallback_score:
            self.fallback_score, self.fallback_iter = score, it
            if self.state is None:
                self.fallback = _copy_state(net)
        if not every_class:
            if self.state is not None:
                self.bad += 1
            return
        if score > self.best:
            self.best, self.best_iter, self.bad = score, it, 0
            self.state = _copy_state(net)
        else:
            self.bad += 1


def _copy_state(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@torch.no_grad()
def predict_baseline(model: TrainedBaseline, queries: np.ndarray) -> np.ndarray:
    """Label maps [n, H, W] (the labels' own values) for slices [n, H, W] in [0, 1] on their own grid."""
    net = model.net.eval()
    n, H, W = queries.shape
    out = np.zeros((n, H, W), np.int64)
    lv = np.asarray([0] + list(model.labels))
    for s in range(0, n, 16):
        lg = net(resize_slices(queries[s:s + 16], model.size))
        lg = F.interpolate(lg, size=(H, W), mode="bilinear", align_corners=False)
        out[s:s + 16] = lv[lg.argmax(1).numpy()]
    return out
