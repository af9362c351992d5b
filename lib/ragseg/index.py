"""FAISS index of labeled-slice embeddings, with metadata, persisted atomically under a file lock.

The on-disk file (``index.npz``) is the single source shared by every process (server workers,
train/batch subprocesses, CLI). It holds the vectors, their ids, one metadata record per vector
and a manifest (embedder id, dimension). Every mutation runs as: take the file lock, reload if
another process changed the file, mutate, write a temp file, ``os.replace`` it over the old one.
A crash mid-write therefore leaves the previous complete index; readers never need the lock.

The index is a cache of the labels: it can always be rebuilt from the datastore
(:func:`ragseg.pipeline.sync_index`), which is what happens when the embedder changes, a label's
checksum no longer matches, or the file is unreadable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
from filelock import FileLock

from . import defaults
from .atomic import atomic_write
from .errors import IndexCorruptError, RagsegError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("auto", "flat", "ivf", "hnsw")


def build_faiss(vectors: np.ndarray, ids: np.ndarray, kind: str, *, nprobe: int = defaults.IVF_NPROBE,
                use_gpu: bool = False):
    """A FAISS inner-product index over unit ``vectors`` with int64 ``ids``.

    kind: 'flat' (exact), 'ivf' (IVF-Flat, sqrt(n) lists trained on at most 64 points per list:
    training cost stays seconds at 1e6 vectors) or 'hnsw'. Small sets are always exact.
    """
    n, d = vectors.shape
    if kind == "flat" or n < 64:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "ivf":
        nlist = max(1, min(int(math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        m = min(n, nlist * 64)
        index.train(vectors if m == n else vectors[rng.choice(n, m, replace=False)])
        index.nprobe = min(nprobe, nlist)  # faiss' wrapper keeps `quantizer` referenced
    elif kind == "hnsw":
        index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(d, defaults.HNSW_M, faiss.METRIC_INNER_PRODUCT))
        faiss.downcast_index(index.index).hnsw.efSearch = defaults.HNSW_EF_SEARCH
    else:
        raise RagsegError(f"unknown index kind {kind!r}")
    if n:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    if use_gpu and kind != "hnsw":
        try:
            index = faiss.index_cpu_to_all_gpus(index)
        except Exception as e:  # a CPU index always works; say why the GPU one did not
            logger.warning("faiss GPU index unavailable, using CPU: %s", e)
    return index


@dataclass
class SliceRecord:
    """Metadata of one indexed slice."""

    image_id: str
    slice_index: int  # along the index's slicing axis, in canonical (RAS) orientation
    labels: list[int]  # label values present on this slice
    label_checksum: str  # SHA-256 of the label file it came from
    image_checksum: str = ""
    image_path: str = ""
    label_path: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Hit:
    score: float  # inner product of unit vectors = cosine similarity
    record: SliceRecord


class SliceIndex:
    """Labeled-slice embeddings for retrieval.

    Args:
        directory: where ``index.npz`` and ``index.lock`` live (created if needed).
        embedder_id: id of the embedder producing the vectors; a stored index with another id is
            stale and is discarded (``stale_reason`` says why) so the caller rebuilds it.
        dim: vector dimension.
        kind: 'flat' (exact inner product), 'ivf', 'hnsw', or 'auto' (flat below
            ``approx_threshold`` vectors, IVF above).
        use_gpu: 'auto' (a GPU index when faiss sees a GPU), True or False.
    """

    def __init__(self, directory: str | os.PathLike, *, embedder_id: str, dim: int, kind: str = "auto",
                 approx_threshold: int = defaults.APPROX_THRESHOLD, nprobe: int = defaults.IVF_NPROBE,
                 use_gpu: bool | str = "auto", lock_timeout: float = defaults.LOCK_TIMEOUT_S):
        if kind not in KINDS:
            raise RagsegError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "index.npz"
        self.embedder_id = embedder_id
        self.dim = int(dim)
        self.kind = kind
        self.approx_threshold = int(approx_threshold)
        self.nprobe = int(nprobe)
        n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        self.use_gpu = (n_gpu > 0) if use_gpu == "auto" else bool(use_gpu) and n_gpu > 0
        self._flock = FileLock(str(self.directory / "index.lock"), timeout=lock_timeout)
        self._tlock = threading.RLock()
        # Readers (search, images, records: request threads) take ``self._state`` once and use only
        # that object; writers build a new _State and swap it in under the lock. Nothing a reader
        # holds is ever mutated, so no reader needs the lock.
        self._state = _State.empty(self.dim)
        self._stamp: tuple | None = None
        self.stale_reason: str | None = None
        self._load_if_changed(force=True)

    # -- persistence ------------------------------------------------------------------------------
    def _file_stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load_if_changed(self, force: bool = False) -> None:
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return
        with self._tlock:
            if stamp is None:
                self._reset()
            else:
                try:
                    self._read()
                except IndexCorruptError as e:
                    logger.warning("%s; starting empty so it is rebuilt from the labels", e)
                    self.stale_reason = str(e)
                    self._reset()
            self._stamp = stamp

    def _reset(self) -> None:
        self._state = _State.empty(self.dim)

    def _read(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                manifest = json.loads(bytes(z["manifest"]).decode())
                vecs = np.array(z["vectors"], dtype=np.float32)
                ids = np.array(z["ids"], dtype=np.int64)
                meta = json.loads(bytes(z["meta"]).decode())
        except Exception as e:
            raise IndexCorruptError(f"index file {self.path} is unreadable ({type(e).__name__}: {e})") from e
        if manifest.get("format") != FORMAT_VERSION:
            raise IndexCorruptError(f"index file {self.path} has format {manifest.get('format')}, expected {FORMAT_VERSION}")
        if manifest.get("embedder_id") != self.embedder_id or int(manifest.get("dim", -1)) != self.dim:
            self.stale_reason = (f"embedder changed ({manifest.get('embedder_id')} -> {self.embedder_id}); "
                                 "index must be rebuilt")
            logger.warning("%s: %s", self.path, self.stale_reason)
            self._reset()
            return
        if vecs.shape != (len(ids), self.dim) or len(meta) != len(ids):
            raise IndexCorruptError(f"index file {self.path} is inconsistent "
                                    f"({vecs.shape} vectors, {len(ids)} ids, {len(meta)} records)")
        self._state = _State(vecs, ids, {int(i): SliceRecord(**r) for i, r in zip(ids, meta)},
                             int(manifest.get("next_id", int(ids.max()) + 1 if len(ids) else 0)))

    def _write(self) -> None:
        st = self._state
        manifest = {"format": FORMAT_VERSION, "embedder_id": self.embedder_id, "dim": self.dim,
                    "next_id": st.next_id, "count": int(len(st.ids))}
        meta = [asdict(st.meta[int(i)]) for i in st.ids]
        # we hold the file lock, so any temp file here is debris of a writer that crashed
        for junk in [*self.directory.glob(".partial-*.npz"), *self.directory.glob(".index.*.npz")]:
            junk.unlink(missing_ok=True)
        with atomic_write(self.path, suffix=".npz") as fh:
            np.savez(fh, vectors=st.vecs, ids=st.ids,
                     manifest=np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8),
                     meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        self._stamp = self._file_stamp()
        self.stale_reason = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SliceIndex]:
        """Lock across threads and processes, reload the latest file, and save on success."""
        with self._tlock, self._flock:
            self._load_if_changed()
            yield self
            self._write()

    # -- mutation ---------------------------------------------------------------------------------
    def _without_image(self, st: _State, image_id: str) -> tuple[_State, int]:
        drop = np.array([st.meta[int(i)].image_id == image_id for i in st.ids], dtype=bool)
        n = int(drop.sum())
        if not n:
            return st, 0
        meta = {int(i): r for i, r in st.meta.items() if r.image_id != image_id}
        return _State(st.vecs[~drop], st.ids[~drop], meta, st.next_id), n

    def replace_image(self, image_id: str, vectors: np.ndarray, records: Sequence[SliceRecord]) -> None:
        """Atomically replace every stored slice of ``image_id`` with these (none = remove)."""
        self.replace_images([(image_id, vectors, records)])

    def replace_images(self, items: Sequence[tuple[str, np.ndarray, Sequence[SliceRecord]]]) -> None:
        """:meth:`replace_image` for several images in one transaction (one file write).

        Applied in order, so ids are those successive ``replace_image`` calls would give: a
        distributed build that merges in the datastore's order stores what a serial one does.
        """
        checked = []
        for image_id, vectors, records in items:
            vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
            if len(vectors) != len(records):
                raise ValueError(f"{image_id}: {len(vectors)} vectors but {len(records)} records")
            if any(r.image_id != image_id for r in records):
                raise ValueError("records must all belong to image_id")
            if len(vectors) and not np.isfinite(vectors).all():
                raise ValueError(f"{image_id}: vectors contain NaN/Inf")
            checked.append((image_id, vectors, records))
        if not checked:
            return
        with self.transaction():
            st = self._state
            for image_id, vectors, records in checked:
                st, _ = self._without_image(st, image_id)
                if len(vectors):
                    ids = np.arange(st.next_id, st.next_id + len(vectors), dtype=np.int64)
                    meta = dict(st.meta)
                    meta.update((int(i), r) for i, r in zip(ids, records))
                    st = _State(np.concatenate([st.vecs, vectors]), np.concatenate([st.ids, ids]), meta,
                                st.next_id + len(vectors))
            self._state = st

    def remove_image(self, image_id: str) -> int:
        """Remove every slice of ``image_id``; returns how many were removed."""
        with self.transaction():
            self._state, n = self._without_image(self._state, image_id)
            return n

    def clear(self) -> None:
        with self.transaction():
            self._reset()

    # -- queries ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up changes written by other processes (cheap when nothing changed)."""
        self._load_if_changed()

    def __len__(self) -> int:
        self.refresh()
        return int(len(self._state.ids))

    def images(self) -> dict[str, dict[str, str]]:
        """image id -> {'label_checksum', 'image_checksum', 'n_slices', 'extra'} of what is stored
        ('extra': the first record's, the volume-level facts its records carry)."""
        self.refresh()
        out: dict[str, dict] = {}
        for r in self._state.meta.values():
            d = out.setdefault(r.image_id, {"label_checksum": r.label_checksum,
                                            "image_checksum": r.image_checksum, "n_slices": 0,
                                            "extra": r.extra or {}})
            d["n_slices"] += 1
        return out

    def records(self) -> list[SliceRecord]:
        self.refresh()
        st = self._state
        return [st.meta[int(i)] for i in st.ids]

    def vectors(self) -> np.ndarray:
        self.refresh()
        return self._state.vecs.copy()

    def ids(self) -> np.ndarray:
        self.refresh()
        return self._state.ids.copy()

    def snapshot(self) -> FrozenIndex:
        """A read-only, picklable copy of the current version (what Ray workers search)."""
        self.refresh()
        return FrozenIndex(self._state, embedder_id=self.embedder_id, dim=self.dim, kind=self.kind,
                           approx_threshold=self.approx_threshold, nprobe=self.nprobe)

    def search(self, queries: np.ndarray, k: int, *, label: int | None = None,
               exclude: Iterable[tuple[str, int]] = (), exclude_images: Iterable[str] = (),
               exclude_per_query: Sequence[Iterable[tuple[str, int]]] | None = None) -> list[list[Hit]]:
        """The ``k`` most similar stored slices for each query vector.

        Args:
            label: only slices on which this label value is present.
            exclude: (image_id, slice_index) pairs never returned, for any query.
            exclude_images: images whose slices are never returned (leave-one-subject-out).
            exclude_per_query: for query i, pairs never returned for that query only (the query
                slice itself: other labeled slices of its image stay usable).
        """
        self.refresh()
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if exclude_per_query is not None and len(exclude_per_query) != len(q):
            raise ValueError(f"exclude_per_query has {len(exclude_per_query)} entries for {len(q)} queries")
        st = self._state  # one consistent snapshot for the whole search
        n = len(st.ids)
        if n == 0 or k <= 0:
            return [[] for _ in range(len(q))]
        excl = {(str(a), int(b)) for a, b in exclude}
        per_q = [excl | {(str(a), int(b)) for a, b in e} for e in exclude_per_query] if exclude_per_query else None
        excl_img = set(exclude_images)

        def ok(r: SliceRecord, qi: int) -> bool:
            return ((label is None or label in r.labels) and r.image_id not in excl_img
                    and (r.image_id, r.slice_index) not in (per_q[qi] if per_q else excl))

        results: list[list[Hit]] = [[] for _ in range(len(q))]
        cap = min(n, defaults.FAISS_MAX_K)  # FAISS' GPU indexes refuse k > 2048
        fetch = min(cap, max(k * defaults.SEARCH_OVERFETCH, 64))
        todo = list(range(len(q)))
        while todo:
            scores, ids = st.search(self, q[todo], fetch)
            again = []
            for row, qi in enumerate(todo):
                hits = [Hit(float(s), st.meta[int(i)]) for s, i in zip(scores[row], ids[row])
                        if i >= 0 and ok(st.meta[int(i)], qi)]
                results[qi] = hits[:k]
                if len(hits) < k and fetch < n:
                    again.append(qi)
            if not again:
                break
            if fetch >= cap:  # the filter rejects nearly everything: score the allowed slices exactly
                for qi in again:
                    results[qi] = self._exact_filtered(st, q[qi], k, lambda r, qi=qi: ok(r, qi))
                break
            todo, fetch = again, min(cap, fetch * 4)
        return results

    @staticmethod
    def _exact_filtered(st: _State, qv: np.ndarray, k: int, ok) -> list[Hit]:
        """Exact top-k among the stored slices ``ok`` accepts (numpy; for very selective filters)."""
        rows = [j for j, i in enumerate(st.ids) if ok(st.meta[int(i)])]
        if not rows:
            return []
        scores = st.vecs[rows] @ qv
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(float(scores[j]), st.meta[int(st.ids[rows[j]])]) for j in order]


@dataclass
class _State:
    """One immutable version of the index contents (plus its lazily built FAISS index)."""

    vecs: np.ndarray
    ids: np.ndarray
    meta: dict[int, SliceRecord]
    next_id: int
    faiss: object = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __getstate__(self) -> dict:  # the FAISS index and the lock are rebuilt where it lands
        return {"vecs": self.vecs, "ids": self.ids, "meta": self.meta, "next_id": self.next_id}

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d, faiss=None, lock=threading.Lock())

    @classmethod
    def empty(cls, dim: int) -> _State:
        return cls(np.zeros((0, dim), dtype=np.float32), np.zeros((0,), dtype=np.int64), {}, 0)

    def search(self, owner: SliceIndex, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:  # build the FAISS index once per version
            if self.faiss is None:
                kind = owner.kind if owner.kind != "auto" else (
                    "ivf" if len(self.ids) >= owner.approx_threshold else "flat")
                self.faiss = build_faiss(self.vecs, self.ids, kind, nprobe=owner.nprobe, use_gpu=owner.use_gpu)
            index = self.faiss
        return index.search(q, k)


class FrozenIndex(SliceIndex):
    """One version of a :class:`SliceIndex`, in memory, read-only and picklable.

    Published once to Ray's object store so every worker searches the same index without a file,
    a lock or a re-read per volume. Searching behaves exactly as on the index it came from.
    """

    def __init__(self, state: _State, *, embedder_id: str, dim: int, kind: str = "auto",
                 approx_threshold: int = defaults.APPROX_THRESHOLD, nprobe: int = defaults.IVF_NPROBE):
        self.directory = self.path = None
        self.embedder_id, self.dim, self.kind = embedder_id, int(dim), kind
        self.approx_threshold, self.nprobe = int(approx_threshold), int(nprobe)
        self.stale_reason = None
        self._state = state
        self._init_local()

    def _init_local(self) -> None:
        """What does not travel between processes: locks and the GPU decision of this host."""
        self._tlock = threading.RLock()
        self.use_gpu = (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0) > 0

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d.pop("_tlock", None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._init_local()

    def refresh(self) -> None:  # nothing to pick up: a snapshot never changes
        pass

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SliceIndex]:
        raise RagsegError("a frozen index snapshot is read-only")
        yield self  # pragma: no cover
