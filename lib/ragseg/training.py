"""Labeled volumes -> a fine-tuned prototype decoder folder (the CLI and the train task share it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import __version__, defaults
from .augment import with_augmented_copies
from .errors import RagsegError
from .fewshot import (
    DecoderAdapter,
    PrototypeDecoder,
    TrainingSet,
    TrainResult,
    build_training_set,
    data_checksum,
    finetune_members,
    resolve_image_branch,
)
from .pipeline import LabeledVolume, Preprocess, patient_of
from .volume import file_checksum, load_image, load_label

logger = logging.getLogger(__name__)


def labeled_slices(items: Sequence[LabeledVolume], pre: Preprocess, labels: Sequence[int] | None = None
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[str], list[str]]:
    """Every slice carrying a label: (slices, label slices, labels, identity parts, the image id
    of each slice).

    Slices are lists of [H, W] arrays: volumes of a data set may slice to different sizes, which
    :func:`ragseg.fewshot.build_training_set` takes as they are.
    """
    sl, lb, ident, owner = [], [], [], []
    for it in items:
        img = load_image(it.image_path)
        lab = load_label(it.label_path, like=img)
        s, ls = pre.slices(img), pre.label_slices(lab)
        keep = np.nonzero((ls > 0).any((1, 2)) if labels is None else np.isin(ls, list(labels)).any((1, 2)))[0]
        if len(keep) == 0:
            continue
        sl += list(s[keep])
        lb += list(ls[keep])
        owner += [it.image_id] * len(keep)
        ident.append(f"{file_checksum(it.image_path)}|{file_checksum(it.label_path)}|{pre.id}|"
                     f"{','.join(map(str, keep))}")
    if not sl:
        raise RagsegError("no labeled slice to fine-tune on")
    found = sorted({int(v) for x in lb for v in np.unique(x) if v > 0})
    return sl, lb, (sorted(labels) if labels is not None else found), ident, owner


def train_decoder(items: Sequence[LabeledVolume], adapter: DecoderAdapter, pre: Preprocess, out_dir: str | Path, *,
                  labels: Sequence[int] | None = None, names: dict[int, str] | None = None,
                  epochs: int = defaults.FINETUNE_EPOCHS, lr: float = defaults.FINETUNE_LR,
                  k: int = defaults.DEFAULT_K, use_box: bool = True, seed: int = 0,
                  max_episodes: int | None = defaults.FINETUNE_MAX_EPISODES, progress: bool = False,
                  location_prior: int | None = defaults.LOCATION_PRIOR,
                  area_cap: float | None = defaults.REGION_AREA_CAP,
                  retrieved: float = defaults.FINETUNE_RETRIEVED,
                  augment: int = defaults.FINETUNE_AUGMENT,
                  precision: str = defaults.FINETUNE_PRECISION,
                  image_branch: str | bool = defaults.FINETUNE_IMAGE_BRANCH,
                  members: int = defaults.FINETUNE_MEMBERS,
                  on_epoch: Callable[[int, dict], bool | None] | None = None) -> TrainResult:
    """Fine-tune a prototype decoder on the labeled slices of ``items`` and save it to ``out_dir``.

    ``augment``: augmented copies of every labeled slice framed by background encoded with them
    (:func:`ragseg.augment.augmented_copies`, drawn with ``seed``; crops that are tissue to their
    edge get none); 0: none.
    ``precision``: auto / bf16 / float32 (:func:`ragseg.fewshot.finetune`); the manifest records
    the one used.
    ``image_branch``: the decoder also reads the slice itself (:class:`ragseg.fewshot.ImageBranch`):
    True, False or "auto" (:func:`ragseg.fewshot.resolve_image_branch`, on pools of small slices);
    the manifest says which and the engine then passes each query slice.
    ``members``: fine-tunings of the pool averaged into one decoder
    (:class:`ragseg.fewshot.DecoderEnsemble`; member j with seed ``seed + j *
    defaults.FINETUNE_MEMBER_SEED_STEP``, copies included); the manifest records how many.
    ``on_epoch`` sees every member's epochs in turn.
    """
    t0 = time.perf_counter()
    slices, labs, labels, ident, images = labeled_slices(items, pre, labels)
    missing = [v for v in labels if not any((x == v).any() for x in labs)]
    if missing:
        raise RagsegError(f"labels {missing} have no labeled slice")
    # episodes take supports from other patients (two frames of one heart are one), as when a new
    # patient is segmented
    n_slices = len(slices)
    branch = resolve_image_branch(image_branch, slices, adapter.input_size)
    sizes: list[int] = []

    def make(member_seed: int) -> tuple[PrototypeDecoder, TrainingSet]:
        sl, lb, groups = with_augmented_copies(slices, labs, [patient_of(i) for i in images], augment, member_seed)
        ts = build_training_set(adapter, sl, lb, labels, groups=groups)
        sizes.append(len(ts))
        logger.info("encoded %d labeled slices (%d with augmented copies) in %.1f s", n_slices, len(ts), ts.encode_s)
        return PrototypeDecoder(adapter, use_box=use_box, location_prior=location_prior, area_cap=area_cap,
                                image_branch=branch, prior_shift=defaults.FINETUNE_PRIOR_SHIFT), ts

    res = finetune_members(make, members, seed=seed, epochs=epochs, lr=lr, k=k, max_episodes=max_episodes,
                           progress=progress, retrieved=retrieved, precision=precision, on_epoch=on_epoch)
    dec = res.decoder
    names = names or {}
    dec.save(out_dir, {
        "labels": {names.get(v, f"label_{v}"): v for v in labels},
        "data_checksum": data_checksum(ident), "slices": n_slices, "augmented_copies": augment, "training_slices": sizes[0], "patients": len(set(patient_of(i) for i in images)),
        "preprocess": pre.id,
        "epochs": len(res.history), "best_epoch": res.best_epoch, "best_metric": res.best_metric,
        "averaged_epochs": res.averaged, "precision": res.precision, "shift_cells": defaults.FINETUNE_SHIFT,
        "lr": lr, "k": k, "seed": seed, "max_episodes": max_episodes, "retrieved_episodes": retrieved, "encode_s": round(res.encode_s, 2),
        "train_s": round(time.perf_counter() - t0, 2), "history": res.history, "ragseg_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "member_metrics": [r.best_metric for r in res.members] or [res.best_metric],
        "prior_shift_iou": (res.members[0] if res.members else res).prior_shift_iou,
    })
    return res
