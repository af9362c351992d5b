"""Retrieval-augmented SAM 2: segment query slices conditioned on (slice, mask) supports.

Each retrieved support is encoded by SAM 2's memory encoder into a *conditioning memory*, as if
it were a mask-prompted frame of a video; SAM 2's memory attention and mask decoder then segment
the query as the next frame (DESIGN.md section 2). We call SAM 2's own ``track_step`` and
``_encode_new_memory`` and copy what ``SAM2VideoPredictor`` does around them, so that the result
equals the video predictor's on the same frames (tests/test_engine_equivalence.py):

1. a support goes through ``track_step(is_init_cond_frame=True, mask_inputs=mask,
   run_mem_encoder=False)`` (the mask becomes the output directly), and its memory is encoded
   afterwards from the low-resolution ``pred_masks`` upsampled to the model size and binarised;
2. the model is configured with ``binarize_mask_from_pts_for_mem_enc`` (sam2_model.py);
3. memory features are stored as bfloat16, as the predictor stores them, and upcast for use;
4. support masks are resized to the model size as ``add_new_mask`` does.

A support memory depends only on (support slice, mask, model), so it is cached (RAM + disk) and a
query costs one image-encoder pass plus memory attention and decoding.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import defaults
from .atomic import atomic_path

logger = logging.getLogger(__name__)


@dataclass
class ImageFeatures:
    """SAM 2 backbone features of a batch of n slices, flattened as ``track_step`` takes them.

    vision_feats[i] / vision_pos[i]: [HW_i, n, C_i] per feature level (high-res levels first).
    """

    vision_feats: list[torch.Tensor]
    vision_pos: list[torch.Tensor]
    feat_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return int(self.vision_feats[-1].shape[1])

    def select(self, idx: Sequence[int] | torch.Tensor) -> ImageFeatures:
        """Features of the slices ``idx`` (repeats allowed: one entry per object)."""
        i = torch.as_tensor(idx, dtype=torch.long, device=self.vision_feats[-1].device)
        return ImageFeatures([f.index_select(1, i) for f in self.vision_feats],
                             [p.index_select(1, i) for p in self.vision_pos], list(self.feat_sizes))

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        if len(parts) == 1:
            return parts[0]
        return ImageFeatures([torch.cat([p.vision_feats[j] for p in parts], 1) for j in range(len(parts[0].vision_feats))],
                             [torch.cat([p.vision_pos[j] for p in parts], 1) for j in range(len(parts[0].vision_pos))],
                             list(parts[0].feat_sizes))


@dataclass
class SupportMemory:
    """A support encoded as a SAM 2 conditioning memory (what the video predictor stores).

    maskmem_features: [1, C_mem, h, w] bfloat16 (the predictor's storage dtype).
    obj_ptr: [1, C] object pointer from the mask decoder run on the support mask.
    """

    maskmem_features: torch.Tensor
    obj_ptr: torch.Tensor


@dataclass
class Support:
    """A retrieved support: a cache key and a loader for its pixels and mask.

    ``load()`` returns (slice in [0, 1] as [H, W] float, mask as [H, W] bool); it is called on a
    cache miss, and by the linear cell score (``region_score="linear"``) for the slice's intensities.
    """

    key: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


def read_cache_file(path: Path, parse: Callable):
    """``parse(torch.load(path))``, or None when the file is absent; an unreadable or unparsable
    file is removed (the entry is recomputed, never fatal)."""
    if not path.exists():
        return None
    try:
        return parse(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        logger.warning("dropping unreadable cache file %s: %s", path, e)
        path.unlink(missing_ok=True)
        return None


def _tally(cache, found) -> None:
    """Count a disk lookup of ``cache`` (its ``_lock``, ``hits``, ``misses``) as a hit or a miss."""
    with cache._lock:
        if found is None:
            cache.misses += 1
        else:
            cache.hits += 1


class SupportMemoryCache:
    """LRU of support memories in RAM, backed by one file per memory on disk (optional).

    Disk writes go to a temp file then ``os.replace``: a crash leaves the old file or none,
    and concurrent writers of the same key write identical content.
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_items: int = defaults.MEMORY_CACHE_ITEMS,
                 item_type: type = SupportMemory):
        self.directory = Path(directory) if directory else None
        self.item_type = item_type  # a dataclass whose fields are all tensors
        self.max_items = max_items
        self._ram: OrderedDict[str, SupportMemory] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, key: str):
        with self._lock:
            mem = self._ram.get(key)
            if mem is not None:
                self._ram.move_to_end(key)
                self.hits += 1
                return mem
        mem = None if self.directory is None else read_cache_file(self._path(key), lambda d: self.item_type(**d))
        _tally(self, mem)
        if mem is not None:
            self._put_ram(key, mem)
        return mem

    def _put_ram(self, key: str, mem: SupportMemory) -> None:
        with self._lock:
            self._ram[key] = mem
            self._ram.move_to_end(key)
            while len(self._ram) > self.max_items:
                self._ram.popitem(last=False)

    def put(self, key: str, mem: SupportMemory) -> None:
        tensors = {f.name: getattr(mem, f.name).detach().cpu() for f in dataclasses.fields(mem)}
        mem = self.item_type(**tensors)
        self._put_ram(key, mem)
        if self.directory is None:
            return
        with atomic_path(self._path(key)) as tmp:
            torch.save(tensors, tmp)


def group_by_shape(items, shape_of) -> list[list]:
    """``items`` (a dict's items or a sequence) in groups of equal ``shape_of(item)``, order kept
    within each group: slices of different sizes are stacked per size."""
    groups: dict[tuple, list] = {}
    for it in (items.items() if isinstance(items, dict) else items):
        groups.setdefault(tuple(shape_of(it)), []).append(it)
    return list(groups.values())


class FeatureCache:
    """LRU of per-slice image-encoder features, bounded in bytes, with an optional disk tier.

    Keyed by a hash of the slice's model input, so a second request on the same volume (another
    label, another k) skips the image encoder, and a changed image can never hit a stale entry.
    Positional encodings are the same for every slice and are kept once, not per slice.

    directory: also keep every entry as one file there (written atomically; an unreadable file
    is dropped and recomputed). The evaluation harness uses it so that re-running a table does
    not re-encode a data set (LiteMedSAM: ~2 s per slice on a CPU, 2 MB per entry on disk).
    """

    def __init__(self, max_bytes: int = defaults.FEATURE_CACHE_BYTES, directory: str | os.PathLike | None = None):
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory else None
        self._d: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.pos: list[torch.Tensor] | None = None
        self.sizes: list[tuple[int, int]] | None = None
        self.hits = self.misses = 0

    @staticmethod
    def key(image: torch.Tensor, model_id: str) -> str:
        import hashlib

        return hashlib.sha1(model_id.encode() + image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    def _file(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, key: str) -> list[torch.Tensor] | None:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
                self.hits += 1
                return v
        v = None if self.directory is None else read_cache_file(self._file(key), list)
        _tally(self, v)
        if v is not None:
            self._put_ram(key, v)
        return v

    def put(self, key: str, feats: list[torch.Tensor]) -> None:
        if self.directory is not None and not self._file(key).exists():
            with atomic_path(self._file(key), suffix=".pt") as tmp:
                torch.save([f.contiguous() for f in feats], tmp)
        self._put_ram(key, feats)

    def _put_ram(self, key: str, feats: list[torch.Tensor]) -> None:
        n = sum(f.numel() * f.element_size() for f in feats)
        if n > self.max_bytes:
            return
        with self._lock:
            if key in self._d:
                return
            self._d[key] = feats
            self._bytes += n
            while self._bytes > self.max_bytes and self._d:
                _, old = self._d.popitem(last=False)
                self._bytes -= sum(f.numel() * f.element_size() for f in old)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def stats(self) -> dict:
        """Lookups so far (a disk hit counts as a hit) and what RAM holds, for /info and logs."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._d), "bytes": self._bytes,
                    "directory": str(self.directory) if self.directory else None}


class RagSam2Engine:
    """Segments query slices from support memories with SAM 2's memory attention.

    Args:
        model: a SAM2Base built by :func:`ragseg.sam2_model.build_sam2` (eval mode).
        model_id: identifies the weights; part of every support-memory cache key.
        cache: support-memory cache (RAM only when None is given a default in-RAM cache).
        encode_batch: slices per image-encoder forward pass.
        object_batch: (query, object) pairs per memory-attention pass; bounds attention memory.
        feature_cache: LRU of query-slice image features across requests (None: a default one;
            pass ``FeatureCache(0)`` to disable).
        autocast: run the image encoder and memory attention under bfloat16 autocast. 'auto' =
            on when the model is on a CUDA GPU (as SAM 2's own demos run); ignored on CPU.
        compile: ``torch.compile`` the image encoder ('auto' = on CUDA only; it does not pay off
            on CPU and needs a compiler toolchain).
    """

    def __init__(self, model: torch.nn.Module, *, model_id: str, cache: SupportMemoryCache | None = None,
                 encode_batch: int = defaults.ENCODE_BATCH, object_batch: int = 8,
                 feature_cache: FeatureCache | None = None, autocast: bool | str = "auto",
                 compile: bool | str = False):
        self.model = model
        self.model_id = model_id
        self.cache = cache if cache is not None else SupportMemoryCache()
        self.features = feature_cache if feature_cache is not None else FeatureCache()
        self.encode_batch = max(1, int(encode_batch))
        self.object_batch = max(1, int(object_batch))
        self.image_size = int(model.image_size)
        self._pos_enc: torch.Tensor | None = None  # memory positional encoding: same for every frame
        on_cuda = self.device.type == "cuda"
        self.autocast = on_cuda if autocast == "auto" else bool(autocast) and on_cuda
        if (on_cuda if compile == "auto" else bool(compile)):
            try:
                self.model.image_encoder = torch.compile(self.model.image_encoder, dynamic=False)
            except Exception as e:  # no toolchain / unsupported op: eager still works
                logger.warning("torch.compile unavailable, running eagerly: %s", e)

    def _amp(self):
        import contextlib

        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs ------------------------------------------------------------------------------------
    def prepare_images(self, slices01: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[n, H, W] slices in [0, 1] -> [n, 3, S, S] normalised model input."""
        from .volume import resize_slices, to_model_input

        return to_model_input(resize_slices(slices01, self.image_size))

    def prepare_mask(self, mask: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[H, W] binary mask -> [1, 1, S, S] float, resized exactly as ``add_new_mask`` does."""
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        m = m.bool()[None, None].float().to(self.device)
        if m.shape[-2:] != (self.image_size, self.image_size):
            m = F.interpolate(m, size=(self.image_size, self.image_size), align_corners=False,
                              mode="bilinear", antialias=True)
            m = (m >= 0.5).float()
        return m

    # -- image encoder -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> ImageFeatures:
        """[n, 3, S, S] normalised slices -> backbone features, ``encode_batch`` at a time."""
        parts = []
        for s in range(0, len(images), self.encode_batch):
            x = images[s:s + self.encode_batch].to(self.device, dtype=torch.float32)
            with self._amp():
                backbone_out = self.model.forward_image(x)
                _, feats, pos, sizes = self.model._prepare_backbone_features(backbone_out)
            parts.append(ImageFeatures([f.float() for f in feats], [p.float() for p in pos], list(sizes)))
        return ImageFeatures.cat(parts)

    @torch.inference_mode()
    def encode_images_cached(self, images: torch.Tensor) -> ImageFeatures:
        """:meth:`encode_images` through the feature LRU: only slices not seen recently are encoded."""
        fc = self.features
        if fc.max_bytes <= 0:
            return self.encode_images(images)
        keys = [fc.key(images[i], self.model_id) for i in range(len(images))]
        got = [fc.get(k) for k in keys]
        miss = [i for i, g in enumerate(got) if g is None]
        if miss:
            new = self.encode_images(images[miss])
            if fc.pos is None:
                fc.pos, fc.sizes = [p[:, :1].clone() for p in new.vision_pos], list(new.feat_sizes)
            for j, i in enumerate(miss):
                got[i] = [f[:, j:j + 1].clone() for f in new.vision_feats]
                fc.put(keys[i], got[i])
        n = len(images)
        feats = [torch.cat([g[lvl] for g in got], 1) for lvl in range(len(got[0]))]
        pos = [p.expand(-1, n, -1) for p in fc.pos]
        return ImageFeatures(feats, pos, list(fc.sizes))

    # -- support memories -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_support(self, feats: ImageFeatures, mask: torch.Tensor) -> SupportMemory:
        """Memory of one support: ``feats`` of its slice (n=1) and its [1, 1, S, S] mask."""
        m = self.model
        out = m.track_step(frame_idx=0, is_init_cond_frame=True, current_vision_feats=feats.vision_feats,
                           current_vision_pos_embeds=feats.vision_pos, feat_sizes=feats.feat_sizes,
                           point_inputs=None, mask_inputs=mask,
                           output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                           num_frames=1, run_mem_encoder=False)
        # as SAM2VideoPredictor.propagate_in_video_preflight: re-encode from the low-res output
        high_res = F.interpolate(out["pred_masks"], size=(self.image_size, self.image_size),
                                 mode="bilinear", align_corners=False)
        maskmem, pos = m._encode_new_memory(current_vision_feats=feats.vision_feats, feat_sizes=feats.feat_sizes,
                                            pred_masks_high_res=high_res,
                                            object_score_logits=out["object_score_logits"], is_mask_from_pts=True)
        if self._pos_enc is None:
            self._pos_enc = pos[-1][0:1].clone()
        return SupportMemory(maskmem.to(torch.bfloat16), out["obj_ptr"])

    def memory_key(self, support_key: str) -> str:
        import hashlib

        return hashlib.sha256(f"{self.model_id}|{support_key}".encode()).hexdigest()

    @torch.inference_mode()
    def support_memories(self, supports: Sequence[Support]) -> list[SupportMemory]:
        """Memories of ``supports`` from the cache, computing (and caching) the missing ones.

        Missing supports' slices go through the image encoder together (batched).
        """
        keys = [self.memory_key(s.key) for s in supports]
        found: dict[str, SupportMemory] = {}
        todo: dict[str, Support] = {}
        for k, s in zip(keys, supports):
            if k in found or k in todo:
                continue
            mem = self.cache.get(k)
            if mem is None:
                todo[k] = s
            else:
                found[k] = mem
        if todo:
            loaded = dict(zip(todo, (s.load() for s in todo.values())))
            # supports from different images may differ in size: encode each size as one batch
            for group in group_by_shape(loaded, lambda kv: kv[1][0].shape):
                images = self.prepare_images(np.stack([img for _, (img, _) in group]))
                feats = self.encode_images(images)
                for i, (k, (_, mask)) in enumerate(group):
                    mem = self.encode_support(feats.select([i]), self.prepare_mask(mask))
                    self.cache.put(k, mem)
                    found[k] = mem
        if self._pos_enc is None and found:
            self._init_pos_enc()
        return [found[k] for k in keys]

    def _init_pos_enc(self) -> None:
        """Memory positional encoding: a sine encoding that depends only on the feature size."""
        h = w = self.image_size // 16  # SAM 2's lowest-resolution feature map (stride 16)
        dummy = torch.zeros(1, 1, h, w, device=self.device)
        self._pos_enc = self.model.memory_encoder.position_encoding(dummy).to(torch.float32)

    # -- queries -----------------------------------------------------------------------------------
    def _cond_outputs(self, memories: Sequence[Sequence[SupportMemory]], frames: Sequence[int]) -> dict:
        """Stack per-item support memories into the ``cond_frame_outputs`` of a batch."""
        assert self._pos_enc is not None
        b = len(memories)
        out = {}
        for j, t in enumerate(frames):
            feats = torch.cat([mem[j].maskmem_features for mem in memories], 0).to(self.device).float()
            out[t] = {
                "maskmem_features": feats,
                "maskmem_pos_enc": [self._pos_enc.to(self.device).expand(b, -1, -1, -1)],
                "obj_ptr": torch.cat([mem[j].obj_ptr for mem in memories], 0).to(self.device),
            }
        return out

    def warm_supports(self, supports: Sequence[Support]) -> int:
        """Compute and cache the memories of ``supports`` (after a label is indexed); returns the count."""
        for s in range(0, len(supports), self.encode_batch):
            self.support_memories(supports[s:s + self.encode_batch])
        return len(supports)

    @torch.inference_mode()
    def segment_queries(self, queries: np.ndarray, supports: Sequence[Sequence[Sequence[Support]]], *,
                        timings: dict[str, float] | None = None, progress: bool = False,
                        labels: Sequence[int] | None = None) -> torch.Tensor:
        """The engine interface the pipeline calls: logits for every (query slice, label).

        Args:
            queries: [n, H, W] slices in [0, 1].
            supports: ``supports[l][i]``: supports of label l for query i, most similar last (an
                empty list: nothing to condition on, the label stays absent on that slice).
            timings: seconds added under 'supports', 'encode', 'decode', 'write'.
            labels: the label value of each of the L channels (not needed by this engine).

        Returns:
            float16 logits [n, L, H, W] (-1024 where a label had no support).
        """
        import time

        from tqdm import tqdm

        from .volume import resize_logits

        tm = timings if timings is not None else {}
        n, H, W = queries.shape
        L = len(supports)
        distinct: dict[str, Support] = {}
        for per_query in supports:
            for sups in per_query:
                for s in sups:
                    distinct.setdefault(s.key, s)
        t = time.perf_counter()
        mems = dict(zip(distinct, self.support_memories(list(distinct.values()))))
        tm["supports"] = tm.get("supports", 0.0) + time.perf_counter() - t
        # float16 halves the volume-sized buffer; -1024 and the 0 threshold are exact in it
        logits = torch.full((n, L, H, W), -1024.0, dtype=torch.float16)
        for s in tqdm(range(0, n, self.encode_batch), desc="segmenting", disable=not progress, unit="batch"):
            chunk = list(range(s, min(n, s + self.encode_batch)))
            t = time.perf_counter()
            feats = self.encode_images_cached(self.prepare_images(queries[chunk]))
            tm["encode"] = tm.get("encode", 0.0) + time.perf_counter() - t
            groups: dict[int, list[tuple[int, int]]] = {}  # same number of supports -> one batch
            for ci, qi in enumerate(chunk):
                for li in range(L):
                    if supports[li][qi]:
                        groups.setdefault(len(supports[li][qi]), []).append((ci, li))
            for items in groups.values():
                f = feats.select([ci for ci, _ in items])
                mem_lists = [[mems[x.key] for x in supports[li][chunk[ci]]] for ci, li in items]
                t = time.perf_counter()
                low, _ = self.segment(f, mem_lists)
                tm["decode"] = tm.get("decode", 0.0) + time.perf_counter() - t
                t = time.perf_counter()
                up = resize_logits(low, (H, W))[:, 0].cpu()
                for j, (ci, li) in enumerate(items):
                    logits[chunk[ci], li] = up[j]
                tm["write"] = tm.get("write", 0.0) + time.perf_counter() - t
        return logits

    @torch.inference_mode()
    def segment(self, query_feats: ImageFeatures, memories: Sequence[Sequence[SupportMemory]], *,
                support_frames: Sequence[int] | None = None, query_frame: int | None = None,
                num_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment a batch of queries, item i conditioned on ``memories[i]`` (k each).

        By default supports sit at frames 0..k-1 and the query at frame k, so the last support is
        the query's nearest neighbour in time (SAM 2 weights object pointers by distance):
        callers pass supports most-similar-last.

        Returns:
            low-res mask logits [n, 1, S/4, S/4] and object-score logits [n, 1].
        """
        n = len(query_feats)
        if len(memories) != n:
            raise ValueError(f"{n} queries but {len(memories)} support lists")
        ks = {len(m) for m in memories}
        if len(ks) != 1 or 0 in ks:
            raise ValueError(f"every query needs the same, non-zero number of supports; got {sorted(ks)}")
        k = ks.pop()
        frames = list(support_frames) if support_frames is not None else list(range(k))
        qf = query_frame if query_frame is not None else max(frames) + 1
        nf = num_frames if num_frames is not None else max(max(frames), qf) + 1
        if len(frames) != k:
            raise ValueError(f"{len(frames)} support frame indices for {k} supports")
        logits, scores = [], []
        for s in range(0, n, self.object_batch):
            idx = list(range(s, min(n, s + self.object_batch)))
            f = query_feats.select(idx)
            with self._amp():
                out = self.model.track_step(
                    frame_idx=qf, is_init_cond_frame=False, current_vision_feats=f.vision_feats,
                    current_vision_pos_embeds=f.vision_pos, feat_sizes=f.feat_sizes, point_inputs=None,
                    mask_inputs=None, num_frames=nf, run_mem_encoder=False,
                    output_dict={"cond_frame_outputs": self._cond_outputs([memories[i] for i in idx], frames),
                                 "non_cond_frame_outputs": {}})
            logits.append(out["pred_masks"].float())
            scores.append(out["object_score_logits"].float())
        return torch.cat(logits, 0), torch.cat(scores, 0)

    @torch.inference_mode()
    def propagate(self, query_feats: Callable[[int], ImageFeatures], n_queries: int,
                  memories: Sequence[Sequence[SupportMemory]]) -> torch.Tensor:
        """3D-consistency mode: track objects through consecutive query slices like video frames.

        The k supports of each object are conditioning frames 0..k-1; query slice j is frame
        k + j, and each processed query's own prediction is encoded into memory (as SAM 2 does
        for non-conditioning frames), so later slices see their neighbours.

        Args:
            query_feats: j -> features of query slice j (n=1), computed lazily so a volume
                never holds all slices' features at once.
            memories: per object, its k supports (same k for every object).

        Returns:
            low-res logits [n_queries, n_objects, S/4, S/4].
        """
        n_obj = len(memories)
        k = len(memories[0])
        if any(len(m) != k for m in memories) or k == 0:
            raise ValueError("every object needs the same, non-zero number of supports")
        output_dict = {"cond_frame_outputs": self._cond_outputs(memories, range(k)), "non_cond_frame_outputs": {}}
        num_frames = k + n_queries
        result = []
        for j in range(n_queries):
            f = query_feats(j).select([0] * n_obj)
            t = k + j
            out = self.model.track_step(
                frame_idx=t, is_init_cond_frame=False, current_vision_feats=f.vision_feats,
                current_vision_pos_embeds=f.vision_pos, feat_sizes=f.feat_sizes, point_inputs=None,
                mask_inputs=None, output_dict=output_dict, num_frames=num_frames, run_mem_encoder=True)
            output_dict["non_cond_frame_outputs"][t] = {
                "maskmem_features": out["maskmem_features"].to(torch.bfloat16).float(),
                "maskmem_pos_enc": out["maskmem_pos_enc"],
                "obj_ptr": out["obj_ptr"],
            }
            # keep only the memories SAM 2 can still attend to (num_maskmem / obj-pointer window)
            keep = max(self.model.num_maskmem, self.model.max_obj_ptrs_in_encoder)
            output_dict["non_cond_frame_outputs"].pop(t - keep, None)
            result.append(out["pred_masks"].float()[:, 0])
        return torch.stack(result, 0)
