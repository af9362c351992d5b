"""A linear "is this grid cell the structure" score fitted on the supports, for box prompts.

The training-free prompt scores each embedding cell of the query by cos(cell, foreground
prototype) - cos(cell, background prototype) (:func:`ragseg.prototypes.similarity_map`): one mean
vector per side. Where the structure is many small, scattered objects that differ from their
surroundings mostly in brightness (MS lesions on FLAIR), that score finds bright white matter
broadly: the encoder's unit-length features carry little of the absolute intensity. Here the
supports' cells themselves train a class-balanced logistic regression on [unit-length embedding,
mean intensity of the cell], and its decision value replaces the cosine difference.

Fitted per label on the labeled pool the request may use - every indexed slice of that label, less
the query's own (:meth:`ragseg.litemedsam.LiteMedSamEngine.fit_set`; at most
``defaults.CELL_SCORE_MAX_SUPPORTS``, the retrieved ones always among them) - and kept for that exact
set, so the requests of one index version share one fit and a saved label makes the next request
refit. Server, CLI and harness pass the same pool. On open-ms-flair (2 labeled patients, every slice
of the third), with ``--location-prior -1 --max-regions 16``: training-free Dice 0.352 against
0.349 fitted on the retrieved supports only and 0.094 with the cosine (docs/results.md, "a linear
cell score for MS lesions").

A cell the regression calls the structure keeps that call only when its nearest cell among the fit
set's structure cells and the *retrieved* supports' tissue background is a structure cell
(:meth:`LinearCellScore.score`, ``defaults.CELL_SCORE_NN_VETO``): one line over the whole pool
cannot tell a lesion from the query's bright normal tissue, while slices retrieved at the query's
level hold that tissue as background. This is where retrieval matters for this score
(docs/results.md, "a nearest-cell veto").
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from . import defaults

logger = logging.getLogger(__name__)

REGION_SCORES = ("prototype", "linear")


def cell_intensity(slices01: np.ndarray | torch.Tensor, model_size: int, grid: int) -> torch.Tensor:
    """[n, H, W] intensities in [0, 1] -> [n, grid, grid] mean intensity of each embedding cell
    (the slice resized to the model frame as the encoder sees it, then averaged per cell)."""
    from .volume import resize_slices

    return F.interpolate(resize_slices(slices01, model_size), size=(grid, grid), mode="area")[:, 0]


def cell_features(embs: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """[n, C, g, g] embeddings and [n, g, g] cell intensities -> [n * g * g, C + 1] features."""
    x = F.normalize(embs.float(), dim=1)
    x = torch.cat([x, defaults.CELL_SCORE_INTENSITY_WEIGHT * intensity.float()[:, None]], 1)
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class LinearCellScore:
    """Class-balanced, L2-regularised logistic regression over cell features (L-BFGS).

    Args:
        c: inverse regularisation strength, as scikit-learn's ``C`` (loss summed over cells).
        max_iter: L-BFGS iterations.
    """

    def __init__(self, *, c: float = defaults.CELL_SCORE_C, max_iter: int = defaults.CELL_SCORE_ITERS):
        self.c = float(c)
        self.max_iter = int(max_iter)
        self.w: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        # [m, D] features of the fit set's structure cells, for :meth:`score`'s nearest-cell veto
        self.structure_cells: torch.Tensor | None = None

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> LinearCellScore | None:
        """``x`` [m, D] cell features, ``y`` [m] bool (the cell is the structure). None when one
        side is missing (nothing to separate). Works inside ``torch.inference_mode`` (the engine's)."""
        npos = int(y.sum())
        nneg = int(len(y) - npos)
        if npos == 0 or nneg == 0:
            return None
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().float().clone()  # a normal tensor, even when made under inference mode
            y = y.detach().bool().clone()
            t = y.float()
            # "balanced" class weights: each side weighs as much as the other in the loss
            sw = torch.where(y, len(y) / (2.0 * npos), len(y) / (2.0 * nneg))
            w = torch.zeros(x.shape[1], requires_grad=True)
            b = torch.zeros(1, requires_grad=True)
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                z = x @ w + b
                loss = self.c * (sw * F.binary_cross_entropy_with_logits(z, t, reduction="none")).sum() \
                    + 0.5 * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
        self.w, self.b = w.detach(), b.detach()
        return self

    @torch.no_grad()
    def score(self, emb: torch.Tensor, intensity: torch.Tensor,
              background: torch.Tensor | None = None) -> torch.Tensor:
        """[C, g, g] embedding and [g, g] intensities -> [g, g] decision values (> 0: structure).

        ``background`` [m, D]: cell features of the tissue around the structure in the supports
        retrieved for this query (:func:`background_cells`). A cell the regression calls the
        structure is then set to -1 unless its nearest cell (Euclidean, in the same features) among
        the fit set's structure cells and ``background`` is a structure cell: the line fitted on the
        whole pool cannot tell a lesion from the query's own bright normal tissue, but the supports
        cut at the query's level show that tissue as background."""
        if self.w is None or self.b is None:
            raise RuntimeError("LinearCellScore.score before fit")
        g = emb.shape[-1]
        x = cell_features(emb[None], intensity[None])
        z = x @ self.w + self.b
        pos = self.structure_cells
        if background is not None and len(background) and pos is not None and len(pos):
            cand = torch.nonzero(z > 0)[:, 0]
            if len(cand):
                near_pos = torch.cdist(x[cand], pos).min(1).values
                near_bg = torch.cdist(x[cand], background.float()).min(1).values
                z = z.clone()
                z[cand[near_bg < near_pos]] = -1.0
        return z.reshape(emb.shape[-2], g)


def fit_cell_score(embs: torch.Tensor, masks: torch.Tensor, intensity: torch.Tensor) -> LinearCellScore | None:
    """Fit on supports: ``embs`` [k, C, g, g], ``masks`` [k, g, g] area fractions, ``intensity``
    [k, g, g]. Cells count as the structure where it covers at least
    ``defaults.CELL_SCORE_MIN_COVER`` of them; cells darker than ``defaults.CELL_SCORE_MIN_INTENSITY``
    (air, padding) are left out: they are trivially not the structure and would only dilute the fit.
    At most ``defaults.CELL_SCORE_MAX_CELLS`` cells enter it (a seeded draw; up to half of them the
    structure's)."""
    x = cell_features(embs, intensity)
    y = masks.reshape(-1) >= defaults.CELL_SCORE_MIN_COVER
    keep = (intensity.reshape(-1) > defaults.CELL_SCORE_MIN_INTENSITY) | y
    idx = torch.nonzero(keep)[:, 0]
    cap = defaults.CELL_SCORE_MAX_CELLS
    if len(idx) > cap:  # bound the fit's time: a fixed draw of each side (the weights rebalance them)
        gen = torch.Generator().manual_seed(0)
        pos, neg = idx[y[idx]], idx[~y[idx]]
        pos = pos[torch.randperm(len(pos), generator=gen)[:cap // 2]]
        neg = neg[torch.randperm(len(neg), generator=gen)[:cap - len(pos)]]
        idx = torch.cat([pos, neg])
    fit = LinearCellScore().fit(x[idx], y[idx])
    if fit is not None:  # every structure cell of the fit set, up to the cap (a fixed draw)
        pos = torch.nonzero(y)[:, 0]
        if len(pos) > cap:
            pos = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(1))[:cap]]
        fit.structure_cells = x[pos].contiguous()
    return fit


def background_cells(embs: torch.Tensor, masks: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """Cell features [m, D] of the supports' tissue that is not the structure: ``embs`` [k, C, g, g],
    ``masks`` [k, g, g] area fractions (cells the structure touches at all are left out),
    ``intensity`` [k, g, g] (air and padding, darker than ``defaults.CELL_SCORE_MIN_INTENSITY``,
    left out)."""
    x = cell_features(embs, intensity)
    keep = (masks.reshape(-1) <= 0) & (intensity.reshape(-1) > defaults.CELL_SCORE_MIN_INTENSITY)
    return x[keep]
