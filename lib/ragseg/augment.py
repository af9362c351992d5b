"""Random spatial and intensity augmentation of (slice, label) pairs.

One recipe for everything trained on few labeled slices: the supervised baselines draw it per
batch (:mod:`ragseg.baselines`); decoder fine-tuning encodes augmented copies of the labeled pool
once, since its image embeddings are computed once (:func:`augmented_copies`).

Rotation up to 15 degrees, isotropic scale 0.85-1.15, translation up to 10% of the side, then
intensity gamma, scale and shift. No flips: left / right structures differ (the two ventricles).

Where a moved image leaves its frame it gets 0, so only slices framed by background (air around
the body: cardiac MRI, brain, CT) are copied for fine-tuning (:func:`frame_is_background`); a crop
that is tissue to its edge (the hippocampus patches) gets no copies, since any fill beyond its frame
is invented: zeros there cost hippocampus 0.687 vs 0.755 without copies, its edge pixels continued
0.743 / 0.710 vs 0.765 / 0.731 (two seeds), while one copy of ACDC's background-framed slices gives
0.810 / 0.799 vs 0.787 / 0.783 (docs/results.md, "Augmented copies").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def border_background(x: np.ndarray) -> float:
    """The intensity a slice shows at its frame: the median of its outermost rows and columns
    (0 for a slice with dark surroundings, tissue grey for a crop that is tissue to the edge)."""
    x = np.asarray(x)
    return float(np.median(np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])))


def frame_is_background(x: np.ndarray) -> bool:
    """Whether the slice's frame is background: its median is among the slice's darkest tenth
    (MRI / CT with air around the body) rather than tissue cut by the crop (a hippocampus patch)."""
    return border_background(x) <= float(np.percentile(np.asarray(x), 10))


def random_affine_intensity(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: ``x`` [n, 1, H, W] intensities in [0, 1], ``y`` [n, 1, H, W] label values
    (nearest-neighbour, so values stay labels). Returns new tensors; where the moved image leaves
    the frame, intensities and labels are 0."""
    n = x.shape[0]
    ang = torch.from_numpy(rng.uniform(-np.pi / 12, np.pi / 12, n)).float()
    sc = torch.from_numpy(rng.uniform(0.85, 1.15, n)).float()
    tr = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 2))).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(ang) / sc
    theta[:, 0, 1] = -torch.sin(ang) / sc
    theta[:, 1, 0] = torch.sin(ang) / sc
    theta[:, 1, 1] = torch.cos(ang) / sc
    theta[:, :, 2] = tr
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    gamma = torch.from_numpy(np.exp(rng.uniform(-0.3, 0.3, n))).float().view(n, 1, 1, 1)
    x = x.clamp(0, 1) ** gamma
    x = x * torch.from_numpy(rng.uniform(0.9, 1.1, n)).float().view(n, 1, 1, 1) \
        + torch.from_numpy(rng.uniform(-0.05, 0.05, n)).float().view(n, 1, 1, 1)
    return x, y


def augmented_copies(slices01: Sequence[np.ndarray], label_slices: Sequence[np.ndarray], copies: int,
                     seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """``copies`` augmented versions of every (slice, label) pair whose frame is background
    (:func:`frame_is_background`; the others get none), each on its slice's own grid (slices may
    differ in size): copy 1 of every such pair in order, then copy 2, ... Returns the copies, their
    labels and the index of the pair each came from. Intensities are clipped to [0, 1] and labels
    keep their dtype. The same ``seed`` gives the same copies (so an embedding cache keyed by
    content serves a re-run)."""
    rng = np.random.default_rng(seed)
    out_x: list[np.ndarray] = []
    out_y: list[np.ndarray] = []
    src: list[int] = []
    framed = [i for i, s in enumerate(slices01) if frame_is_background(s)]
    for _ in range(max(0, int(copies))):
        for i in framed:
            lab = np.asarray(label_slices[i])
            x, y = random_affine_intensity(torch.as_tensor(np.ascontiguousarray(slices01[i], np.float32))[None, None],
                                           torch.as_tensor(np.ascontiguousarray(lab).astype(np.int64))[None, None],
                                           rng)
            out_x.append(x[0, 0].clamp(0, 1).numpy())
            out_y.append(y[0, 0].numpy().astype(lab.dtype))
            src.append(i)
    return out_x, out_y, src


def with_augmented_copies(slices01: Sequence[np.ndarray], label_slices: Sequence[np.ndarray],
                          groups: Sequence[str], copies: int, seed: int = 0
                          ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The pairs followed by their :func:`augmented_copies`; a copy keeps its slice's group (patient),
    so a fine-tuning episode never takes a copy of its query's patient as a support."""
    ax, ay, src = augmented_copies(slices01, label_slices, copies, seed)
    return list(slices01) + ax, list(label_slices) + ay, list(groups) + [groups[i] for i in src]
