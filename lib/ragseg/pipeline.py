"""The whole path: datastore -> volumes -> embeddings -> index -> engine -> label map.

* :func:`sync_index` makes the index match a set of labeled volumes (adds new labels, replaces
  re-saved ones, drops deleted ones); it is how the index is rebuilt from the labels.
* :class:`Segmenter` segments a volume (or some of its slices) from the indexed pool.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from . import defaults, layout
from .embedders import Embedder
from .engine import Support
from .errors import InputError, RagsegError
from .index import SliceIndex, SliceRecord
from .volume import (
    IMAGE_EXTS,
    Volume,
    canonical_slices,
    file_checksum,
    image_id_of,
    load_image,
    load_label,
    normalize_intensities,
    resize_logits,
    resolve_axis,
    slices_to_volume,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """How a volume becomes slices; part of the index and cache identity.

    axis: 'axial' / 'coronal' / 'sagittal' or 0/1/2 (canonical RAS axes).
    modality: 'auto', 'CT' or 'MR' (see :func:`ragseg.volume.normalize_intensities`).
    ct_window: CT window preset name.
    """

    axis: int | str = "axial"
    modality: str = "auto"
    ct_window: str = defaults.DEFAULT_CT_WINDOW

    @property
    def axis_index(self) -> int:
        return resolve_axis(self.axis)

    @property
    def id(self) -> str:
        return f"axis{self.axis_index}-{self.modality}-{self.ct_window}"

    def slices(self, vol: Volume) -> np.ndarray:
        """[n, H, W] float32 in [0, 1], canonical orientation."""
        return canonical_slices(normalize_intensities(vol.array, self.modality, self.ct_window),
                                vol.affine, self.axis_index)

    def label_slices(self, lab: Volume) -> np.ndarray:
        return canonical_slices(lab.array, lab.affine, self.axis_index)


@dataclass
class LabeledVolume:
    image_id: str
    image_path: str
    label_path: str


def patient_of(image_id: str, pattern: str = defaults.PATIENT_PATTERN) -> str:
    """The patient an image id belongs to: ``pattern``'s first group (the id itself if it does not match)."""
    m = re.match(pattern, image_id)
    return m.group(1) if m and m.group(1) else image_id


def discover_pairs(images: str | Path, labels: str | Path | None = None, *, image_suffix: str = "",
                   label_suffix: str = "") -> list[LabeledVolume]:
    """Images that have a label of the same id.

    By default ids are file names without extension, in two folders (MONAI Label's layout).
    With suffixes, ids are names with the suffix removed, and both may share one folder:
    ``patient07_flair.nii.gz`` + ``patient07_lesions.nii.gz`` pair with ``image_suffix='_flair'``,
    ``label_suffix='_lesions'`` (``ct.nii.gz`` + ``ct_labels.nii.gz``: ``label_suffix='_labels'``).
    """
    images = Path(images)
    labels = Path(labels) if labels is not None else images
    if not images.is_dir():
        raise InputError(images, "image folder does not exist")
    if not labels.is_dir():
        raise InputError(labels, "label folder does not exist")

    def files(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTS))

    lab_by_id = {}
    for p in files(labels):
        i = image_id_of(p)
        if label_suffix and not i.endswith(label_suffix):
            continue
        lab_by_id[i[:len(i) - len(label_suffix)]] = p
    out = []
    for p in files(images):
        i = image_id_of(p)
        if (label_suffix and i.endswith(label_suffix)) or (image_suffix and not i.endswith(image_suffix)):
            continue
        key = i[:len(i) - len(image_suffix)]
        if key in lab_by_id and lab_by_id[key] != p:
            out.append(LabeledVolume(key, str(p), str(lab_by_id[key])))
    return out


def index_id(embedder: Embedder, pre: Preprocess) -> str:
    """What the stored vectors depend on: the embedder and the slicing/normalisation."""
    return f"{embedder.id}|{pre.id}"


def open_index(directory: str | Path, embedder: Embedder, pre: Preprocess, **kwargs) -> SliceIndex:
    return SliceIndex(directory, embedder_id=index_id(embedder, pre), dim=embedder.dim, **kwargs)


def embed_labeled_volume(item: LabeledVolume, embedder: Embedder, pre: Preprocess
                         ) -> tuple[np.ndarray, list[SliceRecord]]:
    """Embeddings and records of every slice of ``item`` that carries a label.

    Slices with no label voxel are not indexed: in a partly labeled volume an empty slice may
    just be unlabeled, so it is not evidence of "no structure here".
    """
    # Checksums first, then parse: if the label is replaced in between, the index stores the
    # new content under the old checksum, which reconcile sees as changed and re-indexes. (The
    # other order would store old content under the new checksum, and nothing would repair it.)
    lc, ic = file_checksum(item.label_path), file_checksum(item.image_path)
    img = load_image(item.image_path)
    lab = load_label(item.label_path, like=img)
    lab_s = pre.label_slices(lab)
    present = [np.unique(s) for s in lab_s]
    keep = [i for i, u in enumerate(present) if (u > 0).any()]
    if not keep:
        return np.zeros((0, embedder.dim), np.float32), []
    vecs = embedder.embed(pre.slices(img)[keep])
    # the volume's label layout (one 3D structure per label? enclosed labels?) rides on each record
    extra = {"preprocess": pre.id, layout.RECORD_KEY: layout.structure_fractions(lab_s),
             layout.ENCLOSED_KEY: layout.outline_counts(lab_s)}
    recs = [SliceRecord(item.image_id, int(i), [int(v) for v in present[i] if v > 0], lc, ic,
                        str(item.image_path), str(item.label_path), dict(extra)) for i in keep]
    return vecs, recs


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)  # Ray: resubmissions after a worker died
    run: dict = field(default_factory=dict)  # how it ran (Ray: actors, threads...)

    def __str__(self) -> str:
        retried = f", {sum(self.retried.values())} retries" if self.retried else ""
        return (f"added {len(self.added)}, updated {len(self.updated)}, removed {len(self.removed)}, "
                f"unchanged {len(self.unchanged)}, failed {len(self.failed)}{retried}")


def index_volume(item: LabeledVolume, embedder: Embedder, pre: Preprocess, stored: dict | None = None
                 ) -> tuple[np.ndarray, list[SliceRecord]] | None:
    """What the index needs of one labeled volume: ``None`` when ``stored`` (its entry in
    :meth:`SliceIndex.images`) has the same label and image checksums and the label-layout
    evidence of today's records, else its embeddings and records. The unit of work of
    :func:`sync_index` and of the Ray index build."""
    if stored and stored["label_checksum"] == file_checksum(item.label_path) \
            and stored["image_checksum"] == file_checksum(item.image_path) \
            and layout.has_evidence(stored.get("extra")):
        return None
    return embed_labeled_volume(item, embedder, pre)


def sync_index(index: SliceIndex, embedder: Embedder, pre: Preprocess, items: Sequence[LabeledVolume], *,
               remove_missing: bool = True, progress: bool = False) -> SyncReport:
    """Make ``index`` hold exactly the labeled slices of ``items``.

    A volume is (re-)embedded when it is new or its label/image checksum changed; images no
    longer in ``items`` are removed. A volume that fails to load is reported, not fatal.
    ``ragseg.scale.sync_index_ray`` does the same with the embedding spread over a Ray cluster.
    """
    rep = SyncReport()
    stored = index.images()
    for it in tqdm(items, desc="indexing labels", disable=not progress, unit="vol"):
        try:
            res = index_volume(it, embedder, pre, stored.get(it.image_id))
        except (RagsegError, OSError) as e:
            logger.warning("cannot index %s: %s", it.image_id, e)
            rep.failed[it.image_id] = str(e)
            continue
        apply_indexed(index, [(it, res)], stored, rep)
    finish_sync(index, items, stored, rep, remove_missing)
    return rep


def apply_indexed(index: SliceIndex, results: Sequence[tuple[LabeledVolume, tuple | None]], stored: dict,
                  rep: SyncReport) -> None:
    """Store :func:`index_volume` results, in the given order, in one index transaction."""
    batch = []
    for it, res in results:
        if res is None:
            rep.unchanged.append(it.image_id)
        else:
            batch.append((it.image_id, *res))
            (rep.updated if it.image_id in stored else rep.added).append(it.image_id)
    index.replace_images(batch)


def finish_sync(index: SliceIndex, items: Sequence[LabeledVolume], stored: dict, rep: SyncReport,
                remove_missing: bool) -> None:
    """Remove stored images that are no longer among ``items`` (when ``remove_missing``)."""
    if remove_missing:
        for image_id in sorted(set(stored) - {it.image_id for it in items}):
            index.remove_image(image_id)
            rep.removed.append(image_id)


class SegmentationEngine(Protocol):
    """What :class:`Segmenter` needs from a backend (RAG-SAM 2, LiteMedSAM)."""

    model_id: str

    def segment_queries(self, queries: np.ndarray, supports: Sequence[Sequence[Sequence[Support]]], *,
                        timings: dict[str, float] | None = None, progress: bool = False,
                        labels: Sequence[int] | None = None) -> torch.Tensor:
        """[n, H, W] query slices, ``supports[l][i]`` (most similar last) -> float16 logits [n, L, H, W];
        ``labels``: the label value of each of the L channels (an engine with label-specific parts).
        An engine whose ``fits_on_pool`` is true also takes ``pool=``: per label, every labeled slice
        the request may use (not only the retrieved ones)."""
        ...

    def warm_supports(self, supports: Sequence[Support]) -> int:
        """Pre-compute what the engine caches per support (memories, embeddings)."""
        ...


class SupportStore:
    """Loads support slices and masks for index records (a few volumes cached in RAM).

    :meth:`freeze` makes a picklable copy holding every support slice of a record set in memory:
    Ray workers get it once from the object store and never read the support volumes.
    """

    def __init__(self, pre: Preprocess, max_volumes: int = 4):
        self.pre = pre
        self.max_volumes = max_volumes
        self._vols: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._frozen: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {"pre": self.pre, "max_volumes": self.max_volumes, "_frozen": self._frozen}

    def __setstate__(self, d: dict) -> None:
        self.__init__(d["pre"], d["max_volumes"])
        self._frozen = d["_frozen"]

    def freeze(self, records: Sequence[SliceRecord], progress: bool = False) -> SupportStore:
        """A copy that holds the slices of ``records`` (image and label map) in memory."""
        out = SupportStore(self.pre, self.max_volumes)
        by_vol: dict[tuple[str, str], list[SliceRecord]] = {}
        for r in records:
            by_vol.setdefault((r.image_path, r.label_path), []).append(r)
        for recs in tqdm(list(by_vol.values()), desc="loading supports", unit="vol", disable=not progress):
            img, lab = self._volume(recs[0])
            for r in recs:
                out._frozen[(r.image_path, r.label_path, r.slice_index)] = (
                    np.ascontiguousarray(img[r.slice_index]), np.ascontiguousarray(lab[r.slice_index]))
        return out

    def _volume(self, rec: SliceRecord) -> tuple[np.ndarray, np.ndarray]:
        key = (rec.image_path, rec.label_path)
        with self._lock:
            if key in self._vols:
                self._vols.move_to_end(key)
                return self._vols[key]
        img = load_image(rec.image_path)
        lab = load_label(rec.label_path, like=img)
        val = (self.pre.slices(img), self.pre.label_slices(lab))
        with self._lock:
            self._vols[key] = val
            while len(self._vols) > self.max_volumes:
                self._vols.popitem(last=False)
        return val

    def support(self, rec: SliceRecord, label: int) -> Support:
        key = f"{rec.image_checksum}|{rec.label_checksum}|{self.pre.id}|{rec.slice_index}|{label}"

        def load() -> tuple[np.ndarray, np.ndarray]:
            frozen = self._frozen.get((rec.image_path, rec.label_path, rec.slice_index))
            img, lab = frozen if frozen is not None else (a[rec.slice_index] for a in self._volume(rec))
            return img, lab == label

        return Support(hashlib.sha256(key.encode()).hexdigest(), load)


@dataclass
class SegmentationResult:
    """A volume's segmentation on the input grid.

    label_map: int array with the input image's shape (0 = background).
    probabilities: label value -> float16 probability array on the same grid (when requested).
    supports: label value -> list of (image_id, slice_index) pairs used (first query slice that
        has supports).
    missing_labels: requested labels with no labeled slice in the pool.
    slices: canonical slice indices that were segmented.
    timings: seconds per stage: load (read + normalise), embed (DINOv2 of the queries),
        retrieval, supports (memories from cache or computed), encode (SAM 2 image encoder),
        decode (memory attention + mask decoder), write (upsampling + label assembly).
    """

    label_map: np.ndarray
    probabilities: dict[int, np.ndarray] = field(default_factory=dict)
    supports: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    missing_labels: list[int] = field(default_factory=list)
    slices: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    single_structures: list[int] = field(default_factory=list)  # labels kept to their largest component
    enclosed: list[tuple[int, int]] = field(default_factory=list)  # (inner, outer): inner wins their overlap


@dataclass
class SliceSegmentation:
    """Canonical-slice result of :meth:`Segmenter.segment_slices`.

    labels: [len(slices), H, W] label values (0 = background), by :func:`logits_to_labels`; over
        consecutive slices, labels in ``single_structures`` keep only their largest component
        (``logits`` are the engine's, before that).
    active: label values that were segmented (had supports); logits (when asked) follow this order.
    """

    labels: np.ndarray
    slices: list[int]
    supports: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    missing_labels: list[int] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    single_structures: list[int] = field(default_factory=list)  # labels reduced to their largest component
    enclosed: list[tuple[int, int]] = field(default_factory=list)  # (inner, outer) pairs of the label rule
    logits: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)


def logits_to_labels(logits: torch.Tensor, values: Sequence[int], *,
                     nested: Iterable[tuple[int, int]] = ()) -> np.ndarray:
    """The label rule: per pixel, the label with the highest logit if that logit says "present".

    logits: [n, L, H, W]; values: the label value of each of the L channels -> int64 [n, H, W].
    nested: (inner, outer) label-value pairs the labeled pool shows enclosed
        (:func:`ragseg.layout.enclosed_label_pairs`). First, where inner's mask lies (mostly)
        inside outer's mask on a slice, inner wins their overlap: label maps are disjoint, so such
        an overlap is an error of one of the two, and a box- or prototype-prompted decoder fills
        what a structure encloses (a ring such as the myocardium comes out as a disk over the
        cavity), so the enclosed structure is the one to keep (see :func:`resolve_nested`).
    """
    lg = logits.float()
    pos = {int(v): i for i, v in enumerate(values)}
    pairs = [(pos[a], pos[b]) for a, b in nested if a in pos and b in pos]
    if pairs:
        lg = resolve_nested(lg, pairs)
    best, arg = lg.max(dim=1)
    lab = torch.tensor(list(values), dtype=torch.int64)[arg]
    lab[best <= defaults.MASK_THRESHOLD] = 0
    return lab.numpy()


def resolve_nested(logits: torch.Tensor, pairs: Iterable[tuple[int, int]],
                   fraction: float = defaults.NESTED_FRACTION) -> torch.Tensor:
    """For each (inner, outer) pair of channel positions: on a slice where inner's mask (logit >
    threshold) is smaller than outer's and lies at least ``fraction`` inside it, outer's logits are
    pushed below inner's on inner's pixels. Returns a new tensor."""
    out = logits.clone()
    masks = logits > defaults.MASK_THRESHOLD  # [n, L, H, W]
    area = masks.flatten(2).sum(2)  # [n, L]
    for i in range(logits.shape[0]):
        for a, b in pairs:
            if area[i, a] == 0 or area[i, a] >= area[i, b]:
                continue
            inter = int((masks[i, a] & masks[i, b]).sum())
            if inter >= fraction * int(area[i, a]):
                m = masks[i, a]
                out[i, b][m] = torch.minimum(out[i, b][m], out[i, a][m] - 1.0)
    return out


def diverse_top_k(hits: Sequence, k: int) -> list:
    """The k best of ``hits`` (best first) with at most ceil(k / images among them) from one image.

    Across patients the most similar slices tend to come from one labeled volume (its contrast,
    its field of view), and prototypes from one heart carry its particulars; spreading the
    supports over the labeled volumes averages those out. With one labeled image (intra-volume
    few-shot) the cap is k: plain top-k.
    """
    images = {h.record.image_id for h in hits}
    cap = -(-k // max(1, len(images)))
    out, count = [], {}
    for h in hits:
        i = h.record.image_id
        if count.get(i, 0) < cap:
            out.append(h)
            count[i] = count.get(i, 0) + 1
            if len(out) == k:
                break
    return out


class Segmenter:
    """Segments volumes from the labeled pool in ``index``.

    Args:
        engine: the backend (:class:`ragseg.engine.RagSam2Engine` or
            :class:`ragseg.litemedsam.LiteMedSamEngine`).
        embedder: the embedder the index was built with.
        index: the labeled-slice index.
        pre: slicing and normalisation (must match the index's).
        k: supports retrieved per label and query slice.
        allow_same_image: let other labeled slices of the query's own image be supports
            (intra-volume few-shot). Off for leave-one-subject-out evaluation.
        propagate: 3D-consistency mode (track through neighbouring slices, see
            :meth:`RagSam2Engine.propagate`).
        diverse: spread the k supports over the labeled images (see :func:`diverse_top_k`).
        keep_largest: for labels the pool shows as one connected 3D structure, keep only the
            largest connected component of a prediction over consecutive slices
            (:mod:`ragseg.layout`).
        store: where support slices come from (default: read from the records' files on demand;
            Ray workers pass a frozen store, see :meth:`SupportStore.freeze`).
    """

    def __init__(self, engine: SegmentationEngine, embedder: Embedder, index: SliceIndex, pre: Preprocess, *,
                 k: int = defaults.DEFAULT_K, allow_same_image: bool = True, propagate: bool = False,
                 diverse: bool = defaults.DIVERSE_SUPPORTS, store: SupportStore | None = None,
                 keep_largest: bool = defaults.KEEP_LARGEST_COMPONENT):
        if not 1 <= k <= defaults.MAX_K:
            raise RagsegError(f"k must be between 1 and {defaults.MAX_K}, got {k}")
        if index.embedder_id != index_id(embedder, pre):
            raise RagsegError(f"index was built for {index.embedder_id}, not {index_id(embedder, pre)}")
        self.engine, self.embedder, self.index, self.pre = engine, embedder, index, pre
        self.k, self.allow_same_image, self.propagate, self.diverse = k, allow_same_image, propagate, diverse
        self.store = store or SupportStore(pre)
        self.keep_largest = keep_largest

    def pool_labels(self) -> list[int]:
        return sorted({v for r in self.index.records() for v in r.labels})

    @torch.inference_mode()
    def segment_volume(self, image: Volume | str | Path, *, image_id: str | None = None,
                       labels: Iterable[int] | None = None, slices: Iterable[int] | None = None,
                       return_probabilities: bool = False, progress: bool = False) -> SegmentationResult:
        """Segment ``image`` (all slices, or the canonical slice indices ``slices``).

        Args:
            image_id: the image's id in the pool. Each query slice excludes itself as a support;
                other labeled slices of the same image are used (intra-volume few-shot) unless
                ``allow_same_image`` is off, which excludes every slice of the image.
            labels: label values to segment (default: every label in the pool).
        """
        t = time.perf_counter()
        vol = image if isinstance(image, Volume) else load_image(image)
        image_id = image_id or image_id_of(vol.path or "query")
        all_slices = self.pre.slices(vol)
        load_s = time.perf_counter() - t
        want = self.pool_labels() if labels is None else sorted(set(int(v) for v in labels))
        res = SegmentationResult(np.zeros(vol.shape, dtype=np.uint8 if max(want or [0]) < 256 else np.uint16))
        try:
            sres = self.segment_slices(all_slices, image_id=image_id, labels=want, slices=slices,
                                       return_logits=return_probabilities, progress=progress)
        except InputError as e:
            raise InputError(vol.path, e.problem) from e
        res.supports, res.missing_labels, res.slices, res.timings = (sres.supports, sres.missing_labels,
                                                                     sres.slices, sres.timings)
        res.single_structures, res.enclosed = sres.single_structures, sres.enclosed
        res.timings["load"] = load_s
        if not sres.active or not sres.slices:
            return res
        t = time.perf_counter()
        n_total = len(all_slices)
        full = np.zeros(all_slices.shape, dtype=res.label_map.dtype)
        full[sres.slices] = sres.labels.astype(res.label_map.dtype)
        res.label_map = slices_to_volume(full, vol.affine, self.pre.axis_index).copy()
        if return_probabilities:
            probs = torch.sigmoid(sres.logits.float()).numpy().astype(np.float16)
            for li, v in enumerate(sres.active):
                p = np.zeros((n_total, *all_slices.shape[1:]), dtype=np.float16)
                p[sres.slices] = probs[:, li]
                res.probabilities[v] = slices_to_volume(p, vol.affine, self.pre.axis_index).copy()
        res.timings["write"] += time.perf_counter() - t
        return res

    @torch.inference_mode()
    def segment_slices(self, all_slices: np.ndarray, *, image_id: str, labels: Iterable[int] | None = None,
                       slices: Iterable[int] | None = None, return_logits: bool = False,
                       progress: bool = False) -> SliceSegmentation:
        """Segment canonical slices ``all_slices[slices]`` of image ``image_id``: retrieval, supports,
        engine and the label rule. :meth:`segment_volume` (the server, the CLI) and the evaluation
        harness both go through here.

        Args:
            all_slices: [n, H, W] every canonical slice of the image, intensities in [0, 1].
            slices: indices into ``all_slices`` to segment (default all).
        """
        tm: dict[str, float] = dict.fromkeys(("load", "embed", "retrieval", "supports", "encode", "decode", "write"), 0.0)
        n_total, H, W = all_slices.shape
        sel = list(range(n_total)) if slices is None else sorted(set(int(s) for s in slices))
        bad = [s for s in sel if not 0 <= s < n_total]
        if bad:
            raise InputError(None, f"slice indices {bad[:5]} out of range 0..{n_total - 1}")
        pool = self.pool_labels()
        want = pool if labels is None else sorted(set(int(v) for v in labels))
        res = SliceSegmentation(np.zeros((len(sel), H, W), np.int64), slices=sel, timings=tm,
                                missing_labels=[v for v in want if v not in pool])
        active = [v for v in want if v in pool]
        if not active or not sel:
            return res

        q = all_slices[sel]
        t = time.perf_counter()
        qvec = self.embedder.embed(q)
        tm["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        excl_img = [] if self.allow_same_image else [image_id]
        # each query slice excludes itself only: the image's other labeled slices stay supports
        own = [[(image_id, s)] for s in sel]
        # supports per label and query slice, most similar last (nearest frame to the query)
        per_label: dict[int, list[list]] = {}
        for v in active:
            if self.propagate:
                mean = qvec.mean(0, keepdims=True)
                mean /= max(float(np.linalg.norm(mean)), 1e-12)
                hits = self.index.search(mean, self.k, label=v, exclude=[(image_id, s) for s in sel],
                                         exclude_images=excl_img)[0]
                per_label[v] = [hits[::-1]] * len(sel)
            else:
                fetch = self.k * defaults.DIVERSE_CANDIDATES if self.diverse else self.k
                hits = self.index.search(qvec, fetch, label=v, exclude_per_query=own, exclude_images=excl_img)
                per_label[v] = [diverse_top_k(h, self.k)[::-1] if self.diverse else h[::-1] for h in hits]
        tm["retrieval"] = time.perf_counter() - t
        for v in active:
            first = next((h for h in per_label[v] if h), [])
            res.supports[v] = [(h.record.image_id, h.record.slice_index) for h in first]
        # labels that only the query slices themselves carry have no usable support
        for v in list(active):
            if all(len(h) == 0 for h in per_label[v]):
                active.remove(v)
                res.supports.pop(v, None)
                res.missing_labels.append(v)
        if not active:
            return res

        # Support objects per label and query slice (one per distinct (slice, label): the engine
        # computes or reads each support's memory/embedding once for the volume)
        sup_objs: dict[tuple[str, int, int], Support] = {}

        def support(rec: SliceRecord, v: int) -> Support:
            rid = (rec.image_id, rec.slice_index, v)
            if rid not in sup_objs:
                sup_objs[rid] = self.store.support(rec, v)
            return sup_objs[rid]

        sups = [[[support(h.record, v) for h in hits] for hits in per_label[v]] for v in active]
        kw = {}
        if getattr(self.engine, "fits_on_pool", False):  # e.g. the linear cell score: every usable labeled slice
            own_set = {(image_id, s) for s in sel}
            recs = sorted((r for r in self.index.records() if (r.image_id, r.slice_index) not in own_set
                           and r.image_id not in excl_img), key=lambda r: (r.image_id, r.slice_index))

            kw["pool"] = [[support(r, v) for r in recs if v in r.labels] for v in active]
        if self.propagate:
            t = time.perf_counter()
            logits = self._propagate(q, [s[0] for s in sups], (H, W), tm)
            tm["decode"] = time.perf_counter() - t - tm["supports"]
        else:
            logits = self.engine.segment_queries(q, sups, timings=tm, progress=progress, labels=active, **kw)
        t = time.perf_counter()
        res.active = active
        enclosed = sorted(layout.enclosed_label_pairs(self.index.records())) if defaults.NESTED_WINS else []
        res.labels = logits_to_labels(logits, active, nested=enclosed)
        res.enclosed = [p for p in enclosed if p[0] in active and p[1] in active]
        if self.keep_largest and len(sel) > 1 and sel[-1] - sel[0] + 1 == len(sel):  # consecutive slices
            one = sorted(layout.single_structure_labels(self.index.records()) & set(active))
            res.labels = layout.keep_largest(res.labels, one)
            res.single_structures = one
        res.logits = logits if return_logits else None
        tm["write"] += time.perf_counter() - t
        return res

    def _propagate(self, q: np.ndarray, sups: list[list[Support]], hw: tuple[int, int],
                   tm: dict[str, float]) -> torch.Tensor:
        """3D mode (RAG-SAM 2 only): each label's supports for the first slice condition the whole run."""
        if not hasattr(self.engine, "propagate"):
            raise RagsegError(f"propagate is not supported by the {type(self.engine).__name__} backend")
        t = time.perf_counter()
        mem_lists_all = [self.engine.support_memories(s) for s in sups]
        tm["supports"] = time.perf_counter() - t
        groups: dict[int, list[int]] = {}
        for li, s in enumerate(sups):
            groups.setdefault(len(s), []).append(li)
        out = torch.full((len(q), len(sups), *hw), -1024.0, dtype=torch.float16)
        cache: dict[int, object] = {}

        def feats(j: int):
            if j not in cache:
                cache.clear()
                eb = self.engine.encode_batch
                start = (j // eb) * eb
                f = self.engine.encode_images_cached(self.engine.prepare_images(q[start:start + eb]))
                for t in range(len(f)):
                    cache[start + t] = f.select([t])
            return cache[j]

        for _, lis in groups.items():
            low = self.engine.propagate(feats, len(q), [mem_lists_all[li] for li in lis])  # [n, objs, h, w]
            for j in range(len(q)):
                out[j, lis] = resize_logits(low[j][None], hw)[0].cpu().to(out.dtype)
        return out
