"""Random spatial and intensity augmentation of (slice, label) pairs.

One recipe for everything trained on few labeled slices: the supervised baselines draw it per
batch (:mod:`ragseg.baselines`); decoder fine-tuning encodes augmented copies of the labeled pool
once, since its image embeddings are computed once (:func:`augmented_copies`).

Rotation up to 15 degrees, isotropic scale 0.85-1.15, translation up to 10% of the side, then
intensity gamma, scale and shift. No flips: left / right structures differ (the two ventricles).

Where a moved image leaves its frame, the baselines' batches get 0. Fine-tuning copies follow
their slice's own frame (:func:`frame_is_background`): background for a slice framed by air
(cardiac MRI, brain, CT), the edge pixels continued for a crop that is tissue to its edge (the
hippocampus patches). One copy with zeros everywhere lifted ACDC (0.820 vs 0.792 without) but cost
hippocampus (0.687 vs 0.755); edge pixels everywhere gave ACDC 0.794 and hippocampus 0.761
(docs/results.md, "Augmented copies").
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


def random_affine_intensity(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
                            outside: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: ``x`` [n, 1, H, W] intensities in [0, 1], ``y`` [n, 1, H, W] label values
    (nearest-neighbour, so values stay labels). Returns new tensors. Where the moved image leaves
    the frame, labels are 0 and intensities are 0 (``outside="zeros"``) or the nearest edge
    pixel's (``"border"``)."""
    if outside not in ("zeros", "border"):
        raise ValueError(f"outside must be 'zeros' or 'border', not {outside!r}")
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
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode=outside, align_corners=False)
    y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).long()
    gamma = torch.from_numpy(np.exp(rng.uniform(-0.3, 0.3, n))).float().view(n, 1, 1, 1)
    x = x.clamp(0, 1) ** gamma
    x = x * torch.from_numpy(rng.uniform(0.9, 1.1, n)).float().view(n, 1, 1, 1) \
        + torch.from_numpy(rng.uniform(-0.05, 0.05, n)).float().view(n, 1, 1, 1)
    return x, y


def augmented_copies(slices01: Sequence[np.ndarray], label_slices: Sequence[np.ndarray], copies: int,
                     seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``copies`` augmented versions of every (slice, label) pair, each on its slice's own grid
    (slices may differ in size): copy 1 of every pair in order, then copy 2, ... Intensities are
    clipped to [0, 1] and labels keep their dtype. The same ``seed`` gives the same copies (so an
    embedding cache keyed by content serves a re-run)."""
    rng = np.random.default_rng(seed)
    out_x: list[np.ndarray] = []
    out_y: list[np.ndarray] = []
    for _ in range(max(0, int(copies))):
        for s, lab in zip(slices01, label_slices):
            lab = np.asarray(lab)
            x, y = random_affine_intensity(torch.as_tensor(np.ascontiguousarray(s, np.float32))[None, None],
                                           torch.as_tensor(np.ascontiguousarray(lab).astype(np.int64))[None, None],
                                           rng, outside="zeros" if frame_is_background(s) else "border")
            out_x.append(x[0, 0].clamp(0, 1).numpy())
            out_y.append(y[0, 0].numpy().astype(lab.dtype))
    return out_x, out_y


def with_augmented_copies(slices01: Sequence[np.ndarray], label_slices: Sequence[np.ndarray],
                          groups: Sequence[str], copies: int, seed: int = 0
                          ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The pairs followed by their :func:`augmented_copies`; a copy keeps its slice's group (patient),
    so a fine-tuning episode never takes a copy of its query's patient as a support."""
    ax, ay = augmented_copies(slices01, label_slices, copies, seed)
    reps = len(ax) // max(1, len(slices01))
    return list(slices01) + ax, list(label_slices) + ay, list(groups) * (1 + reps)
