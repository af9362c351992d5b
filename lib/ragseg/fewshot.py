"""Few-shot mask-decoder fine-tuning with prototype prompts (Xie et al., WACV 2024; DESIGN.md 1).

The foreground and background prototypes of a label (masked means of support embeddings, see
:mod:`ragseg.prototypes`) replace the user's prompt tokens of a SAM-family mask decoder. Only
that decoder (a copy; the backbone's stays untouched) and a small projection of the prototypes
are trained, on image embeddings computed once by the frozen encoder, with Dice + BCE.

Optionally the training-free box of :func:`ragseg.prototypes.coarse_regions` is added as two more
tokens: prototypes say *what*, the box says roughly *where* (``use_box``).

Backbones plug in through a :class:`DecoderAdapter`: :class:`LiteMedSamAdapter` and
:class:`Sam2Adapter` (SAM 2's mask decoder with its high-resolution skip features).

A trained decoder is saved as a folder: ``decoder.pt`` (state dict) + ``manifest.json``
(backbone id, labels, data checksum, options, history), both written atomically; loading checks
the backbone and loads strictly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import defaults
from .atomic import atomic_write
from .errors import RagsegError
from .precision import autocast
from .precision import resolve as resolve_precision
from .prototypes import (
    anatomy_shift,
    apart_pairs,
    coarse_regions,
    exclusive_cells,
    location_prior,
    mask_grid,
    masked_prototypes,
    region_box,
    region_cell_cap,
)
from .volume import resize_slices

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "decoder.pt"
FORMAT_VERSION = 1


# --- backbones -------------------------------------------------------------------------------------
class DecoderAdapter(Protocol):
    """A frozen SAM-family encoder + prompt encoder, and the mask decoder to fine-tune.

    ``encode`` returns per-slice features as a dict of batched tensors; ``features['embed']`` is
    the [n, C, g, g] embedding prototypes are computed on.
    """

    backbone_id: str
    embed_dim: int
    grid: int  # embedding side g
    input_size: int  # the frame box prompts are given in
    mask_decoder: nn.Module
    prompt_encoder: nn.Module

    def encode(self, slices01: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]: ...

    def decode(self, decoder: nn.Module, feats: dict[str, torch.Tensor], sparse: torch.Tensor,
               dense: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits [n, 1, S, S] from ``decoder`` (the original or a fine-tuned copy); ``dense``
        [n, C, g, g] is added to the "no mask" dense prompt."""
        ...


def _dense(prompt_encoder: nn.Module, n: int, grid: int) -> torch.Tensor:
    """The decoder's dense prompt when no mask is given ("no mask" embedding everywhere).

    Detached: the prompt encoder is the frozen backbone's, shared with the served model; without
    it every fine-tuning step summed a [n, C, g, g] gradient into that model's ``.grad``."""
    return prompt_encoder.no_mask_embed.weight.detach().reshape(1, -1, 1, 1).expand(n, -1, grid, grid)


def _dense_plus(prompt_encoder: nn.Module, n: int, grid: int, extra: torch.Tensor | None) -> torch.Tensor:
    d = _dense(prompt_encoder, n, grid)
    return d if extra is None else d + extra


class LiteMedSamAdapter:
    """LiteMedSAM (256 px input, 64x64x256 embeddings, 256x256 logits)."""

    def __init__(self, lite):  # ragseg.litemedsam.LiteMedSAM
        self.lite = lite
        self.backbone_id = lite.model_id
        self.embed_dim, self.grid, self.input_size = 256, 64, 256
        self.mask_decoder = lite.net.mask_decoder
        self.prompt_encoder = lite.net.prompt_encoder

    def encode(self, slices01):
        return {"embed": self.lite.embeddings(slices01)}

    def decode(self, decoder, feats, sparse, dense=None):
        n = sparse.shape[0]
        logits, _ = decoder(image_embeddings=feats["embed"], image_pe=self.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse,
                            dense_prompt_embeddings=_dense_plus(self.prompt_encoder, n, self.grid, dense),
                            multimask_output=False)
        return logits


class Sam2Adapter:
    """SAM 2's image encoder + SAM mask decoder, as ``SAM2ImagePredictor`` runs them."""

    def __init__(self, engine):  # ragseg.engine.RagSam2Engine
        m = engine.model
        self.engine, self.model = engine, m
        self.backbone_id = engine.model_id
        self.embed_dim = m.sam_prompt_encoder.embed_dim
        self.grid = m.sam_image_embedding_size
        self.input_size = m.image_size
        self.mask_decoder = m.sam_mask_decoder
        self.prompt_encoder = m.sam_prompt_encoder

    @torch.inference_mode()
    def encode(self, slices01):
        f = self.engine.encode_images(self.engine.prepare_images(slices01))
        n = len(f)
        vf = list(f.vision_feats)
        if self.model.directly_add_no_mem_embed:
            vf[-1] = vf[-1] + self.model.no_mem_embed
        maps = [x.permute(1, 2, 0).reshape(n, -1, *hw) for x, hw in zip(vf, f.feat_sizes)]
        out = {"embed": maps[-1]}
        for i, hr in enumerate(maps[:-1]):
            out[f"high_res_{i}"] = hr
        return out

    def decode(self, decoder, feats, sparse, dense=None):
        n = sparse.shape[0]
        hr = [feats[k] for k in sorted(k for k in feats if k.startswith("high_res_"))]
        logits, *_ = decoder(image_embeddings=feats["embed"], image_pe=self.prompt_encoder.get_dense_pe(),
                             sparse_prompt_embeddings=sparse,
                             dense_prompt_embeddings=_dense_plus(self.prompt_encoder, n, self.grid, dense),
                             multimask_output=False, repeat_image=False,
                             high_res_features=hr if self.model.use_high_res_features_in_sam else None)
        return logits


# --- the image branch ------------------------------------------------------------------------------
IMAGE_KEY = "image"  # feature key of the [n, 1, 4g, 4g] slice the image branch reads


def decoder_image(slices01: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """[n, H, W] slices in [0, 1] -> [n, 1, 4g, 4g] float16: what :class:`ImageBranch` reads
    (stored beside the cached embeddings; a quarter of a 64x64x256 embedding's size)."""
    return resize_slices(slices01, 4 * grid).to(torch.float16)


def resolve_image_branch(choice: str | bool, slices: Sequence[np.ndarray], input_size: int) -> bool:
    """Whether a decoder fine-tuned on ``slices`` gets an :class:`ImageBranch`.

    ``choice``: True / False (or "on" / "off"), or "auto": on when the slices' median long side is
    at most ``defaults.IMAGE_BRANCH_MAX_SIDE`` scaled to the model's ``input_size`` (64 px for
    LiteMedSAM's 256), where the frozen encoder sees every slice pixel blown up 4x or more."""
    if isinstance(choice, bool):
        return choice
    c = str(choice).strip().lower()
    if c in ("on", "true"):
        return True
    if c in ("off", "false"):
        return False
    if c != "auto":
        raise RagsegError(f"image branch: auto, on or off, not {choice!r}")
    if not len(slices):
        return False
    side = float(np.median([max(s.shape[-2:]) for s in slices]))
    return side <= defaults.IMAGE_BRANCH_MAX_SIDE * input_size / 256


class ImageBranch(nn.Module):
    """The query slice at 4x the embedding grid -> a dense prompt term [n, C, g, g].

    The frozen encoder's embedding of a small crop blown up to the model's input is smooth where
    the crop's intensity edges are; this gives the decoder the slice itself. The last layer starts
    at zero, so an untrained branch leaves the decoder as it was.

    Args:
        embed_dim: C, the decoder's token / dense-prompt width.
        width: channels of the full-resolution layer (twice as many after the 4x stride).
    """

    def __init__(self, embed_dim: int, *, width: int = defaults.IMAGE_BRANCH_WIDTH):
        super().__init__()
        last = nn.Conv2d(2 * width, embed_dim, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),  # edges at full resolution
            nn.Conv2d(width, 2 * width, 4, stride=4), nn.GELU(),  # down to the embedding grid
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            last)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return self.net(image.to(p.device, p.dtype) * 2 - 1)  # [0, 1] -> [-1, 1]


# --- the prototype-prompted decoder ------------------------------------------------------------------
class PrototypeDecoder(nn.Module):
    """A SAM-family mask decoder prompted by label prototypes instead of points/boxes.

    Args:
        adapter: the backbone (frozen; not part of this module's state).
        use_box: also give the decoder the training-free box of the query's coarse region.
        location_prior: grid cells around the supports' structure a coarse region may lie in
            (None: anywhere); only used to find boxes.
        exclusive: box prompts from exclusive regions (a label's region only where its prototype
            beats its competitors', :func:`ragseg.prototypes.exclusive_cells`), in training and,
            through the engine, at inference: a list of competing label-value pairs, True (every
            pair) or False (none). None: :func:`finetune` takes the pairs that lie apart in the
            labeled pool (:func:`ragseg.prototypes.apart_pairs`).
        area_cap: a box's region keeps at most this multiple of the supports' structure area
            (:func:`ragseg.prototypes.region_cell_cap`); None: off. The engine serves the decoder
            with the cap it was trained with.
        image_branch: also read the query slice itself (:class:`ImageBranch`); its features then
            need ``IMAGE_KEY`` (:func:`decoder_image`), which training sets and the engine give.
        prior_shift: at inference, the location prior also allows the supports' structure moved
            onto the query's anatomy by up to this many cells (:func:`ragseg.prototypes.anatomy_shift`);
            0: the supports' own place only. None: :func:`finetune` decides on the labeled pool
            (:func:`choose_prior_shift`). Training episodes keep the supports' own place.
    """

    def __init__(self, adapter: DecoderAdapter, *, use_box: bool = True,
                 location_prior: int | None = defaults.LOCATION_PRIOR,
                 exclusive: bool | list[tuple[int, int]] | None = None,
                 area_cap: float | None = defaults.REGION_AREA_CAP,
                 image_branch: bool = False, prior_shift: int | None = 0):
        super().__init__()
        object.__setattr__(self, "adapter", adapter)  # not a submodule: its weights are not ours
        self.use_box = use_box
        self.location_prior = location_prior
        self.exclusive = exclusive
        self.area_cap = area_cap
        self.prior_shift = prior_shift
        self.decoder = copy.deepcopy(adapter.mask_decoder)
        c = adapter.embed_dim
        self.proj = nn.Linear(c, c)  # starts as identity: the untrained model is the paper's zero-shot
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(c))
            self.proj.bias.zero_()
        self.token_type = nn.Parameter(torch.zeros(2, c))  # learned fg / bg token offsets
        self.image_branch = ImageBranch(c) if image_branch else None

    def tokens(self, fg: torch.Tensor, bg: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """Sparse prompt tokens [n, 2 (+2), C] from prototypes [n, C] (and boxes [n, 4])."""
        t = torch.stack([self.proj(fg) + self.token_type[0], self.proj(bg) + self.token_type[1]], 1)
        if self.use_box:
            if boxes is None:
                raise ValueError("use_box decoder needs a box per item")
            with torch.no_grad():
                bt = self.adapter.prompt_encoder._embed_boxes(boxes.to(t.device))
            t = torch.cat([t, bt], 1)
        return t

    def forward(self, feats: dict[str, torch.Tensor], fg: torch.Tensor, bg: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n, 1, S, S] for n (query, label) items; ``feats`` rows match the items."""
        dense = None
        if self.image_branch is not None:
            if IMAGE_KEY not in feats:
                raise RagsegError(f"this decoder has an image branch: its features need {IMAGE_KEY!r}")
            dense = self.image_branch(feats[IMAGE_KEY])
        return self.adapter.decode(self.decoder, feats, self.tokens(fg, bg, boxes), dense)

    @torch.no_grad()
    def prompt(self, query_emb: torch.Tensor, support_embs: torch.Tensor | None, support_grid_masks: torch.Tensor,
               max_regions: int = 1, allowed: np.ndarray | None = None,
               protos: tuple[torch.Tensor, torch.Tensor] | None = None, normalized: bool = False,
               shift: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None:
        """Prototypes (fg, bg) and boxes (one per coarse region) for one query and label.

        ``allowed``: [g, g] bool, the cells this label's region may use (see
        :func:`ragseg.prototypes.exclusive_cells`). ``protos``: the supports' (fg, bg) prototypes when
        already computed (``support_embs`` is then not read). ``normalized``: ``query_emb`` is
        unit-length along C (:meth:`TrainingSet.unit`); prototypes come from the raw
        embeddings, so then ``protos`` must be given. ``shift``: the location prior's move onto
        the query (:func:`ragseg.prototypes.location_prior`). Without ``use_box`` the box list holds
        one dummy entry. None: no prototype (empty support masks) or, with ``use_box``, no
        foreground-like region on the query.
        """
        if protos is None:
            if normalized:
                raise ValueError("a normalized query needs its supports' prototypes (protos)")
            protos = masked_prototypes(support_embs, support_grid_masks)
        if protos is None:
            return None
        if not self.use_box:
            return protos[0], protos[1], [torch.zeros(4)]
        prior = location_prior(support_grid_masks, self.location_prior, shift)
        if allowed is not None:
            prior = allowed if prior is None else prior & allowed
        regions = coarse_regions(query_emb, *protos, prior, max_regions=max_regions,
                                 max_cells=region_cell_cap(support_grid_masks, self.area_cap), normalized=normalized)
        if not regions:
            return None
        return protos[0], protos[1], [region_box(r, self.adapter.input_size) for r in regions]

    # -- persistence --------------------------------------------------------------------------------
    def save(self, directory: str | Path, manifest: dict) -> Path:
        """Write ``decoder.pt`` and ``manifest.json`` (each temp file + rename; manifest last)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        man = {"format": FORMAT_VERSION, "backbone": self.adapter.backbone_id, "use_box": self.use_box,
               "location_prior": self.location_prior, "exclusive": self.exclusive, "area_cap": self.area_cap,
               "image_branch": self.image_branch is not None, "prior_shift": self.prior_shift,
               **manifest}
        _atomic_write(d / WEIGHTS, lambda f: torch.save(self.state_dict(), f))
        _atomic_write(d / MANIFEST, lambda f: f.write(json.dumps(man, indent=2, default=str).encode()))
        return d

    @classmethod
    def load(cls, directory: str | Path, adapter: DecoderAdapter) -> tuple[PrototypeDecoder | DecoderEnsemble, dict]:
        """A saved decoder for ``adapter``'s backbone (strict); RagsegError naming the problem. A
        folder whose manifest has ``members`` > 1 holds a :class:`DecoderEnsemble`."""
        d = Path(directory)
        try:
            man = json.loads((d / MANIFEST).read_text())
        except FileNotFoundError:
            raise RagsegError(f"{d}: no {MANIFEST}; not a fine-tuned decoder folder") from None
        except ValueError as e:
            raise RagsegError(f"{d / MANIFEST}: unreadable ({e})") from None
        if man.get("format") != FORMAT_VERSION:
            raise RagsegError(f"{d}: decoder format {man.get('format')!r}, expected {FORMAT_VERSION}")
        if man.get("backbone") != adapter.backbone_id:
            raise RagsegError(f"{d}: decoder was trained for backbone {man.get('backbone')!r}, "
                              f"not {adapter.backbone_id!r}")
        ex = man.get("exclusive", False)
        ex = [tuple(int(v) for v in p) for p in ex] if isinstance(ex, list) else bool(ex)
        shift = man.get("prior_shift") or 0
        if not isinstance(shift, int) or shift < 0:
            raise RagsegError(f"{d / MANIFEST}: prior_shift must be a cell count >= 0, got {shift!r}")
        n = man.get("members", 1)
        if not isinstance(n, int) or n < 1:
            raise RagsegError(f"{d / MANIFEST}: members must be a positive integer, got {n!r}")

        def member() -> PrototypeDecoder:
            # decoders saved before the size cap (image branch, prior shift) existed were trained without one
            return cls(adapter, use_box=bool(man["use_box"]), location_prior=man.get("location_prior"),
                       exclusive=ex, area_cap=man.get("area_cap"), image_branch=bool(man.get("image_branch", False)),
                       prior_shift=shift)

        dec = member() if n == 1 else DecoderEnsemble([member() for _ in range(n)])
        try:
            state = torch.load(d / WEIGHTS, map_location="cpu", weights_only=True)
            dec.load_state_dict(state, strict=True)
        except Exception as e:  # corrupt or truncated file, wrong keys or shapes: one clear error
            raise RagsegError(f"{d / WEIGHTS}: cannot load ({type(e).__name__}: {str(e)[:200]})") from None
        return dec.eval(), man


class DecoderEnsemble(nn.Module):
    """Several fine-tunings of one pool served as one decoder: the mean of the members' logits.

    One training's result moves with its seed alone (episode draws, batch order, bf16 rounding);
    averaging a few keeps the good ones' gains and smooths the bad one's misses. Prompts (prototypes,
    boxes, exclusive regions, area cap) are the first member's, so every member decodes the same
    items; members are built alike (same backbone, box use, image branch).

    Args:
        members: the trained :class:`PrototypeDecoder` s (at least one).
    """

    def __init__(self, members: Sequence[PrototypeDecoder]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if len({(m.use_box, m.image_branch is not None) for m in members}) > 1:
            raise ValueError("ensemble members must agree on box prompts and the image branch")
        self.members = nn.ModuleList(members)

    # what the engine and the harness read from a decoder: the first member's
    adapter = property(lambda self: self.members[0].adapter)
    use_box = property(lambda self: self.members[0].use_box)
    location_prior = property(lambda self: self.members[0].location_prior)
    exclusive = property(lambda self: self.members[0].exclusive)
    area_cap = property(lambda self: self.members[0].area_cap)
    image_branch = property(lambda self: self.members[0].image_branch)
    prior_shift = property(lambda self: self.members[0].prior_shift)

    def forward(self, feats: dict[str, torch.Tensor], fg: torch.Tensor, bg: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """The members' mean logits [n, 1, S, S] (see :meth:`PrototypeDecoder.forward`)."""
        return torch.stack([m(feats, fg, bg, boxes) for m in self.members]).mean(0)

    def prompt(self, *args, **kwargs):
        """:meth:`PrototypeDecoder.prompt` of the first member."""
        return self.members[0].prompt(*args, **kwargs)

    def save(self, directory: str | Path, manifest: dict) -> Path:
        """As :meth:`PrototypeDecoder.save`, with ``members`` in the manifest."""
        return PrototypeDecoder.save(self, directory, {**manifest, "members": len(self.members)})


def finetune_members(make: Callable[[int], tuple[PrototypeDecoder, TrainingSet]], members: int = 1, *,
                     seed: int = 0, **kwargs) -> TrainResult:
    """Fine-tune ``members`` decoders of one pool and return them as one.

    ``make(seed)`` builds member j's untrained decoder and training set with seed ``seed + j *
    defaults.FINETUNE_MEMBER_SEED_STEP`` (e.g. its augmented copies), which :func:`finetune`
    (``kwargs``) then trains with; torch's generator is seeded with it first, so a decoder's random
    initial weights depend on its seed alone, not on what the process drew before. One member: that decoder, as :func:`finetune` returns it; more:
    a :class:`DecoderEnsemble`, with each training's result in ``members``, their summed encode
    time, their mean metric and the first one's history and precision.
    """
    if members < 1:
        raise RagsegError(f"members must be >= 1, got {members}")
    done = []
    for j in range(members):
        s = seed + j * defaults.FINETUNE_MEMBER_SEED_STEP
        torch.manual_seed(s)  # the decoder's random init (its image branch) is the seed's, not the process's
        dec, ts = make(s)
        if members > 1:
            logger.info("fine-tuning member %d of %d (seed %d)", j + 1, members, s)
        done.append(finetune(dec, ts, seed=s, **kwargs))
    if members == 1:
        return done[0]
    first = done[0]
    return TrainResult(DecoderEnsemble([r.decoder for r in done]).eval(), history=first.history,
                       best_metric=float(np.mean([r.best_metric for r in done])), best_epoch=first.best_epoch,
                       averaged=first.averaged, encode_s=sum(r.encode_s for r in done),
                       precision=first.precision, members=done)


def _atomic_write(path: Path, write: Callable) -> None:
    with atomic_write(path) as f:
        write(f)


# --- training data -----------------------------------------------------------------------------------
@dataclass
class TrainingSet:
    """Labeled slices with cached embeddings, ready for episodes.

    feats: adapter features of the N slices (computed once by the frozen encoder).
    grid_masks: [N, L, g, g] area fractions per label; targets: [N, L, S, S] bool at decoder size.
    """

    feats: dict[str, torch.Tensor]
    grid_masks: torch.Tensor
    targets: torch.Tensor
    labels: list[int]
    encode_s: float = 0.0
    groups: list[str] | None = None  # the patient of each slice (cross-patient episodes); None: one

    def __len__(self) -> int:
        return int(self.grid_masks.shape[0])

    def similarity(self) -> torch.Tensor:
        """[N, N] cosine similarity of the slices' ``embed`` features average-pooled to a
        ``defaults.LITEMEDSAM_POOL`` grid; computed once. With LiteMedSAM this is the offline
        retrieval embedding itself; with SAM 2 a stand-in for DINOv2's."""
        sim = getattr(self, "_similarity", None)
        if sim is None or sim.shape[0] != len(self):
            emb = self.feats["embed"]
            v = torch.cat([F.adaptive_avg_pool2d(emb[i:i + 64].float(), defaults.LITEMEDSAM_POOL).flatten(1)
                           for i in range(0, len(emb), 64)])
            v = F.normalize(v, dim=1)
            sim = v @ v.T
            self._similarity = sim
        return sim

    def masked_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per slice: ``embed`` summed under each label's grid mask [N, L, C], over all cells
        [N, C], and the masks' areas [N, L]; computed once. A support set's prototypes are then sums
        of rows, with no [k, C, g, g] copy per (query, label) (with such copies the heap fragmented
        to 24 GB resident on a 168-slice pool)."""
        sums = getattr(self, "_sums", None)
        if sums is None or sums[0].shape[0] != len(self):
            emb, gm = self.feats["embed"], self.grid_masks.float()
            fg = torch.cat([torch.einsum("nchw,nlhw->nlc", emb[i:i + 64].float(), gm[i:i + 64])
                            for i in range(0, len(self), 64)])
            alls = torch.cat([emb[i:i + 64].float().sum((2, 3)) for i in range(0, len(self), 64)])
            sums = self._sums = (fg, alls, gm.sum((2, 3)))
        return sums

    def embed_norms(self) -> torch.Tensor:
        """[N, 1, g, g] length of each ``embed`` cell along C (clamped as ``F.normalize`` does);
        computed once: every epoch's episodes compare each slice with prototypes, and the norm was
        most of that. ``unit(i)`` divides by it: the same numbers as ``F.normalize``, without
        keeping a second copy of the embeddings."""
        norms = getattr(self, "_norms", None)
        if norms is None or norms.shape[0] != len(self):
            emb = self.feats["embed"]
            norms = torch.cat([emb[i:i + 64].float().norm(2, dim=1, keepdim=True).clamp_min(1e-12)
                               for i in range(0, len(emb), 64)])
            self._norms = norms
        return norms

    def unit(self, i: int) -> torch.Tensor:
        """Slice ``i``'s ``embed`` [C, g, g] scaled to unit length along C."""
        return self.feats["embed"][i].float() / self.embed_norms()[i]

def build_training_set(adapter: DecoderAdapter, slices01: np.ndarray | Sequence[np.ndarray],
                       label_slices: np.ndarray | Sequence[np.ndarray], labels: Sequence[int],
                       out_size: int | None = None, groups: Sequence[str] | None = None) -> TrainingSet:
    """Encode the slices once and derive per-label masks from their label slices.

    ``groups``: the patient of each slice; episodes then take their supports from other patients
    than the query's whenever the pool has them (as at inference on a new patient).

    ``slices01`` / ``label_slices``: an [N, H, W] array, or a list of [H_i, W_i] slices of any
    sizes (patients scanned differently): every slice goes to the model's input frame, its masks
    to the embedding grid and the output size, so all items share one set of shapes; order kept.
    """
    from .engine import group_by_shape

    sl, lb = list(slices01), list(label_slices)
    if len(sl) != len(lb) or any(a.shape != b.shape for a, b in zip(sl, lb)):
        raise RagsegError("each slice needs a label slice of the same shape")
    if groups is not None and len(groups) != len(sl):
        raise RagsegError("groups must name the patient of every slice")
    pats = list(groups) if groups is not None else None
    shapes = group_by_shape(list(range(len(sl))), lambda i: sl[i].shape)
    if len(shapes) == 1:
        ts = _training_set(adapter, np.stack(sl), np.stack(lb), labels, out_size)
        ts.groups = pats
        return ts
    parts = [_training_set(adapter, np.stack([sl[i] for i in g]), np.stack([lb[i] for i in g]), labels, out_size)
             for g in shapes]
    back = torch.as_tensor(np.argsort(np.concatenate(shapes), kind="stable"))  # undo the grouping
    feats = {k: torch.cat([p.feats[k] for p in parts])[back] for k in parts[0].feats}
    return TrainingSet(feats, torch.cat([p.grid_masks for p in parts])[back],
                       torch.cat([p.targets for p in parts])[back], list(labels), sum(p.encode_s for p in parts),
                       pats)


def _training_set(adapter: DecoderAdapter, slices01: np.ndarray, label_slices: np.ndarray,
                  labels: Sequence[int], out_size: int | None) -> TrainingSet:
    t = time.perf_counter()
    feats = {k: v.detach().float().cpu() for k, v in adapter.encode(slices01).items()}
    enc = time.perf_counter() - t
    feats[IMAGE_KEY] = decoder_image(slices01, adapter.grid)  # for decoders with an image branch
    g = adapter.grid
    s = out_size or 4 * g
    lab = torch.as_tensor(np.asarray(label_slices).astype(np.int64))
    gm = torch.stack([mask_grid(lab == v, g) for v in labels], 1)
    tg = torch.stack([F.interpolate((lab == v)[:, None].float(), size=(s, s), mode="nearest")[:, 0] > 0.5
                      for v in labels], 1)
    return TrainingSet(feats, gm, tg, list(labels), enc)


@dataclass
class Episode:
    query: int
    label_index: int
    supports: list[int]
    fg: torch.Tensor
    bg: torch.Tensor
    box: torch.Tensor


def make_episodes(dec: PrototypeDecoder, ts: TrainingSet, k: int, rng: np.random.Generator,
                  jitter: float = 0.0, retrieved: float = 0.0,
                  retrieved_pool: int = defaults.FINETUNE_RETRIEVED_POOL, prior_shift: int = 0) -> list[Episode]:
    """One episode per (labeled slice, label): supports = up to k *other* slices with the label,
    from other patients than the query's when ``ts.groups`` names patients and others have it.

    Supports are drawn at random among those candidates, or - for a ``retrieved`` share of the
    queries - among the ``retrieved_pool`` x k candidates most like the query
    (:meth:`TrainingSet.similarity`), as retrieval picks them when the decoder is served.

    The query's own mask never enters its prototypes (as at inference). Episodes where the label
    is absent on the query teach the decoder to answer "nothing" to a look-alike region.
    ``prior_shift``: boxes from the location prior moved onto the query as the engine moves it for
    a decoder with that ``prior_shift`` (:func:`choose_prior_shift` compares; training uses 0).
    """
    out: list[Episode] = []
    present = ts.grid_masks.sum((2, 3)) > 0  # [N, L]
    have = [[int(i) for i in torch.nonzero(present[:, li])[:, 0]] for li in range(len(ts.labels))]

    # per query, once for all its labels: whether its supports are drawn like retrieval
    like = rng.random(len(ts)) < retrieved if retrieved > 0 else np.zeros(len(ts), bool)
    sim = ts.similarity() if like.any() else None

    def draw(li: int, q: int) -> list[int] | None:
        others = [i for i in have[li] if i != q]
        if ts.groups is not None:
            foreign = [i for i in others if ts.groups[i] != ts.groups[q]]
            others = foreign or others
        if not others:
            return None
        if like[q]:
            near = torch.argsort(sim[q, others], descending=True)[:max(1, retrieved_pool) * k]
            others = [others[i] for i in near.tolist()]
        return sorted(rng.choice(others, size=min(k, len(others)), replace=False).tolist())

    pairs = competing_pairs(dec.exclusive, ts.labels) if dec.use_box else set()
    exclusive = bool(pairs)
    fg_sum, all_sum, fg_w = ts.masked_sums()
    cells = ts.grid_masks.shape[-1] * ts.grid_masks.shape[-2]

    def prototypes(sup: list[int], li: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`masked_prototypes` of the supports, from the set's per-slice sums."""
        w = fg_w[sup, li].sum()
        if float(w) <= 0:
            return None
        f = fg_sum[sup, li].sum(0)
        return f / w, (all_sum[sup].sum(0) - f) / (len(sup) * cells - w).clamp_min(1e-6)

    drawn: list[dict[int, list[int] | None]] = [{} for _ in range(len(ts))]  # query -> label -> supports
    owners: list[dict[int, np.ndarray]] = [{} for _ in range(len(ts))]
    moves: list[tuple[int, int]] = [(0, 0)] * len(ts)
    whole = exclusive or (prior_shift > 0 and dec.use_box)  # each query's labels decided together
    if whole:
        for li in range(len(ts.labels)):
            for q in range(len(ts)):
                drawn[q][li] = draw(li, q)
        for q, per in enumerate(drawn):
            protos = {li: prototypes(sup, li) for li, sup in per.items() if sup}
            protos = {li: p for li, p in protos.items() if p is not None}
            if exclusive:  # as at inference: each label's region only where it beats the others' on the query
                owners[q] = exclusive_cells(ts.unit(q), {li: p[0] for li, p in protos.items()}, pairs,
                                            normalized=True)
            if prior_shift > 0 and dec.use_box and dec.location_prior is not None:
                found = {li: (p[0], p[1], ts.grid_masks[per[li], li]) for li, p in protos.items()}
                moves[q] = anatomy_shift(ts.unit(q), found, owners[q], prior_shift, normalized=True)
    for li in range(len(ts.labels)):
        for q in range(len(ts)):
            sup = drawn[q][li] if whole else draw(li, q)
            if sup is None:
                continue
            pr = prototypes(sup, li)  # supports carry the label: never None
            p = (dec.prompt(ts.unit(q), None, ts.grid_masks[sup, li], allowed=owners[q].get(li), protos=pr,
                            normalized=True, shift=moves[q]) if pr else None)
            if p is None:
                continue
            fg, bg, boxes = p
            box = boxes[0]
            if jitter > 0 and dec.use_box:
                wh = (box[2:] - box[:2]).clamp_min(1.0).repeat(2)
                box = box + torch.as_tensor(rng.uniform(-jitter, jitter, 4), dtype=torch.float32) * wh
                box = box.clamp(0, dec.adapter.input_size - 1)
            out.append(Episode(q, li, sup, fg, bg, box))
    return out


def _box_area(box: torch.Tensor) -> float:
    return float((box[2:] - box[:2] + 1).clamp_min(0).prod())


def choose_prior_shift(dec: PrototypeDecoder, ts: TrainingSet, k: int = defaults.DEFAULT_K, *, seed: int = 0,
                       radius: int = defaults.PRIOR_SHIFT,
                       min_gain: float = defaults.PRIOR_SHIFT_MIN_GAIN) -> tuple[int, dict[str, float]]:
    """``radius`` when moving the location prior onto the query (:func:`ragseg.prototypes.anatomy_shift`)
    finds the labeled pool's structures better, else 0; and the two measurements.

    Measured on the pool itself, before training: the cross-patient episodes with supports drawn as
    retrieval serves them (:func:`make_episodes`, the same draws both ways), each episode's box
    against the box of the query's true structure (IoU, over episodes whose query carries the
    label). Patients scanned alike (registered crops, one volume) keep the supports' place; hearts
    that sit elsewhere in each patient's frame move it. No query patient enters the choice.
    """
    if radius <= 0 or not dec.use_box or dec.location_prior is None:
        return 0, {}
    truth: dict[tuple[int, int], torch.Tensor] = {}

    def mean_iou(shift: int) -> float:
        ious = []
        for e in make_episodes(dec, ts, k, np.random.default_rng(seed), retrieved=1.0, prior_shift=shift):
            key = (e.query, e.label_index)
            if key not in truth:
                cells = (ts.grid_masks[e.query, e.label_index] > 0.5).numpy()
                truth[key] = region_box(cells, dec.adapter.input_size) if cells.any() else None
            t = truth[key]
            if t is None:
                continue
            lo, hi = torch.maximum(e.box[:2], t[:2]), torch.minimum(e.box[2:], t[2:])
            inter = float((hi - lo + 1).clamp_min(0).prod())  # boxes hold inclusive pixel corners
            ious.append(inter / (_box_area(e.box) + _box_area(t) - inter))
        return float(np.mean(ious)) if ious else 0.0

    still, moved = mean_iou(0), mean_iou(radius)
    return (radius if moved > still + min_gain else 0), {"box_iou_in_place": still, "box_iou_moved": moved}


def competing_pairs(exclusive: bool | Sequence[Sequence[int]] | None, values: Sequence[int]) -> set[frozenset[int]]:
    """Positions in ``values`` whose regions compete under a decoder's ``exclusive`` setting: every
    pair (True), none (False, None, empty), or those whose label values form a listed pair."""
    n = len(values)
    every = {frozenset((i, j)) for i in range(n) for j in range(i + 1, n)}
    if exclusive is True:
        return every
    if not exclusive:
        return set()
    want = {frozenset(int(v) for v in p) for p in exclusive}
    return {p for p in every if frozenset(int(values[i]) for i in p) in want}


def choose_exclusive(ts: TrainingSet, fraction: float = defaults.APART_FRACTION) -> list[tuple[int, int]]:
    """The label pairs whose regions compete for this labeled pool: those that lie apart in its
    label maps (:func:`ragseg.prototypes.apart_pairs`, on the decoder-size targets)."""
    if len(ts.labels) < 2:
        return []
    maps = (ts.targets.long() * torch.tensor(ts.labels)[None, :, None, None]).sum(1)  # labels are disjoint
    return apart_pairs(maps.numpy(), list(ts.labels), fraction)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over items of soft Dice loss + binary cross-entropy (logits, target: [n, S, S])."""
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, t)
    p = torch.sigmoid(logits)
    inter = (p * t).sum((1, 2))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
    return bce + dice.mean()


def hard_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item Dice of binary masks [n, S, S]; 1 when both are empty."""
    inter = (pred & target).sum((1, 2)).float()
    tot = (pred.sum((1, 2)) + target.sum((1, 2))).float()
    return torch.where(tot > 0, 2 * inter / tot.clamp_min(1), torch.ones_like(tot))


@dataclass
class TrainResult:
    decoder: PrototypeDecoder
    history: list[dict] = field(default_factory=list)  # per epoch: loss, dice, seconds
    best_metric: float = 0.0
    best_epoch: int = 0
    averaged: int = 0  # epoch-end states averaged into the decoder kept (0: the best epoch's kept)
    encode_s: float = 0.0
    precision: str = "float32"  # what the decoder's forward passes ran in ("bf16" or "float32")
    members: list[TrainResult] = field(default_factory=list)  # a DecoderEnsemble's trainings, in order
    prior_shift_iou: dict[str, float] = field(default_factory=dict)  # choose_prior_shift's measurements


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of state dicts with the same keys (integer buffers: the last state's)."""
    out = {}
    for k, v in states[-1].items():
        out[k] = torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone()
    return out


def _batch_feats(feats: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in feats.items()}


def shift_batch(feats: dict[str, torch.Tensor], target: torch.Tensor, boxes: torch.Tensor, dy: int, dx: int, *,
                grid: int, input_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Move a batch's features, targets and boxes together by (dy, dx) embedding cells.

    Every feature map moves by the same distance in the image (a map k times finer than the
    ``grid`` by k times as many cells), the [n, S, S] targets by ``S / grid`` pixels per cell and
    the [n, 4] xyxy boxes (in the ``input_size`` frame) by ``input_size / grid``. Maps roll
    around their borders, which hold background in scans, so the content stays what the encoder saw.
    """
    if not (dy or dx):
        return feats, target, boxes
    moved = {}
    for k, v in feats.items():
        f = v.shape[-1] // grid
        moved[k] = torch.roll(v, (dy * f, dx * f), (-2, -1))
    t = target.shape[-1] // grid
    target = torch.roll(target, (dy * t, dx * t), (-2, -1))
    p = input_size / grid
    boxes = (boxes + torch.tensor([dx, dy, dx, dy], dtype=boxes.dtype) * p).clamp(0, input_size - 1)
    return moved, target, boxes


def finetune(dec: PrototypeDecoder, ts: TrainingSet, *, epochs: int = defaults.FINETUNE_EPOCHS,
             lr: float = defaults.FINETUNE_LR, batch: int = defaults.FINETUNE_BATCH, k: int = defaults.DEFAULT_K,
             seed: int = 0, max_episodes: int | None = defaults.FINETUNE_MAX_EPISODES,
             shift: int = defaults.FINETUNE_SHIFT, average_last: int = defaults.FINETUNE_AVERAGE_LAST,
             retrieved: float = defaults.FINETUNE_RETRIEVED, precision: str = defaults.FINETUNE_PRECISION,
             progress: bool = False, on_epoch: Callable[[int, dict], bool | None] | None = None) -> TrainResult:
    """Train ``dec`` (decoder + projection; backbone frozen) on episodes from ``ts``.

    Each epoch draws new support subsets (and box jitter), so the decoder sees varied prototypes;
    with ``max_episodes`` an epoch is a random subset of that many episodes (large pools).
    With ``shift`` > 0 each batch is moved by up to that many embedding cells in y and x
    (:func:`shift_batch`), so the decoder cannot tie a structure to where it lies in the few
    labeled patients.
    ``retrieved``: the share of episodes whose supports are drawn like retrieval
    (:func:`make_episodes`).
    ``precision``: ``"bf16"`` runs the decoder's forward pass under bfloat16 autocast (weights,
    optimizer and loss stay float32), ``"float32"`` does not, ``"auto"`` takes bf16 where the
    hardware multiplies it natively (:func:`ragseg.precision.resolve`).
    A decoder built with ``exclusive=None`` first gets its competing label pairs from
    :func:`choose_exclusive`, one with ``prior_shift=None`` its prior's move from
    :func:`choose_prior_shift`.
    The metric is the epoch's mean Dice over episodes whose query carries the label (before each
    step's update). The decoder kept is the mean of its states at the end of the last
    ``average_last`` epochs, at most the second half of the ``epochs`` (weight averaging: one
    epoch's state is a noisy pick, and a short run's first states are far from where it ends), or
    with ``average_last=0`` the state with the best metric. ``on_epoch(epoch, stats)`` may return True
    to stop early (the average is then over the last epochs run).
    """
    torch.manual_seed(seed)
    device = next(dec.parameters()).device
    res = TrainResult(dec, encode_s=ts.encode_s, precision=resolve_precision(precision, device))
    logger.info("fine-tuning in %s (asked: %s)", res.precision, precision)
    if dec.exclusive is None:
        dec.exclusive = choose_exclusive(ts)
        logger.info("exclusive regions for label pairs lying apart in the pool: %s", dec.exclusive or "none")
    if dec.prior_shift is None:
        dec.prior_shift, res.prior_shift_iou = choose_prior_shift(dec, ts, k, seed=seed)
        logger.info("location prior moved onto the query by up to %d cells (pool box IoU %s)", dec.prior_shift,
                    {a: round(b, 3) for a, b in res.prior_shift_iou.items()})
    rng = np.random.default_rng(seed)
    params = [p for p in dec.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    best_state = copy.deepcopy(dec.state_dict())
    best = -1.0
    n_avg = min(average_last, max(1, epochs // 2)) if average_last > 0 else 0
    recent: list[dict[str, torch.Tensor]] = []  # the last ``n_avg`` epoch-end states
    dec.train()
    for ep in tqdm(range(1, epochs + 1), desc="fine-tuning decoder", disable=not progress, unit="epoch"):
        t0 = time.perf_counter()
        eps = make_episodes(dec, ts, k, rng, jitter=defaults.FINETUNE_BOX_JITTER, retrieved=retrieved)
        if not eps:
            raise RagsegError("no training episode: every label needs at least two labeled slices")
        order = rng.permutation(len(eps))[:max_episodes]
        losses, dices = [], []
        for s in range(0, len(order), batch):
            b = [eps[i] for i in order[s:s + batch]]
            feats = _batch_feats(ts.feats, [e.query for e in b])
            target = torch.stack([ts.targets[e.query, e.label_index] for e in b])
            boxes = torch.stack([e.box for e in b])
            if shift > 0:
                dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, 2))
                feats, target, boxes = shift_batch(feats, target, boxes, dy, dx, grid=dec.adapter.grid,
                                                   input_size=dec.adapter.input_size)
            with autocast(res.precision, device):
                logits = dec(feats, torch.stack([e.fg for e in b]), torch.stack([e.bg for e in b]), boxes)[:, 0]
            logits = logits.float()
            loss = dice_bce_loss(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item() * len(b))
            has = target.flatten(1).any(1)
            if has.any():
                dices += hard_dice(logits.detach()[has] > 0, target[has]).tolist()
        stats = {"epoch": ep, "loss": sum(losses) / len(order), "dice": float(np.mean(dices)) if dices else 0.0,
                 "episodes": len(order), "seconds": time.perf_counter() - t0}
        res.history.append(stats)
        logger.info("epoch %d/%d: loss %.4f, dice %.3f (%d episodes, %.1f s)", ep, epochs, stats["loss"],
                    stats["dice"], len(order), stats["seconds"])
        if stats["dice"] > best:
            best, res.best_epoch = stats["dice"], ep
            best_state = copy.deepcopy(dec.state_dict())
        if n_avg > 0:
            recent = [*recent, copy.deepcopy(dec.state_dict())][-n_avg:]
        if on_epoch is not None and on_epoch(ep, stats):
            break
    if recent:
        best_state = average_states(recent)
        res.averaged = len(recent)
    dec.load_state_dict(best_state)
    dec.eval()
    res.best_metric = best
    return res


def data_checksum(parts: Sequence[str]) -> str:
    """SHA-256 over the training data's identity (file checksums and slice indices)."""
    h = hashlib.sha256()
    for p in sorted(parts):
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


@torch.no_grad()
def predict(dec: PrototypeDecoder, query_feats: dict[str, torch.Tensor], support_feats: dict[str, torch.Tensor],
            support_grid_masks: torch.Tensor, max_regions: int = 1) -> torch.Tensor:
    """Logits [n, S, S] for n queries of one label from k supports (same supports for all)."""
    emb, sup = query_feats["embed"], support_feats["embed"]
    s = 4 * dec.adapter.grid
    out = torch.full((len(emb), s, s), -1024.0)
    for i in range(len(emb)):
        p = dec.prompt(emb[i], sup, support_grid_masks, max_regions=max_regions)
        if p is None:
            continue
        fg, bg, boxes = p
        n = len(boxes)
        f = _batch_feats(query_feats, [i] * n)
        lg = dec(f, fg.expand(n, -1), bg.expand(n, -1), torch.stack(boxes))[:, 0]
        out[i] = lg.max(0).values
    return out
