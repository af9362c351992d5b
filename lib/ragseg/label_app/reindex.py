"""Background re-indexing: keep the slice index equal to the datastore's final labels.

Labels become final in several ways: ``PUT /datastore/label`` (``on_save_label``), a file
dropped into ``labels/final/`` (the datastore watcher, no hook), a DICOM SEG appearing in a
DICOMweb store (no hook), or being there at startup. So the worker does not trust hooks alone:
it reconciles the index with the datastore every ``interval`` seconds (cheap: label files are
re-hashed only when their size or mtime changed), and hooks merely wake it up early.

All heavy work (loading volumes, embedding, memory pre-computation) runs on this worker thread,
never on the request loop. Several app processes may run workers against one index: the index
is updated under its file lock and every job is idempotent (checksum-based).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from ..errors import RagsegError
from ..pipeline import LabeledVolume, embed_labeled_volume
from ..volume import ChecksumCache
from .components import Components
from .dicomweb import DicomwebLabels, is_dicomweb

logger = logging.getLogger(__name__)

FINAL = "final"


@dataclass
class Job:
    id: str
    image: str
    reason: str
    state: str = "queued"  # queued | running | done | failed | skipped
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    slices: int = 0
    memories: int = 0
    error: str | None = None


class Reindexer:
    """A worker thread that indexes final labels and pre-computes their support memories."""

    def __init__(self, components: Components, datastore, *, interval: float = 5.0, max_jobs_kept: int = 200):
        self.c = components
        self.datastore = datastore
        self.interval = interval
        self._q: queue.Queue[str | None] = queue.Queue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: dict[str, str] = {}  # image id -> queued job id (dedup)
        self._last_items: dict[str, LabeledVolume] = {}  # the latest listing, for jobs it queued
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._checksum = ChecksumCache()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self.max_jobs_kept = max_jobs_kept
        self.last_reconcile: float | None = None
        self.last_error: str | None = None
        self.pid = os.getpid()
        self._dicomweb = (DicomwebLabels(datastore, components.index_dir / "dicomweb",
                                         names=lambda: dict(components.cfg.labels),
                                         ohif_seg_fix=components.cfg.ohif_seg_fix)
                          if is_dicomweb(datastore) else None)
        # images whose label could not be fetched in the last listing (PACS down): never dropped
        self.unavailable: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ragseg-reindex", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._q.put(None)
        if self._thread:
            self._thread.join(timeout)

    # -- public API -----------------------------------------------------------------------------
    def submit(self, image_id: str, reason: str) -> str:
        """Queue (re-)indexing of ``image_id``; returns a job id (see :meth:`job`). Returns at once."""
        with self._lock:
            if image_id in self._pending:
                return self._pending[image_id]
            job = Job(f"reindex-{self.pid}-{next(self._ids)}", image_id, reason)
            self._jobs[job.id] = job
            self._pending[image_id] = job.id
            self._evict()
        self._q.put(job.id)
        return job.id

    def _evict(self) -> None:
        """Forget the oldest *finished* jobs past ``max_jobs_kept``; queued and running jobs stay."""
        extra = len(self._jobs) - self.max_jobs_kept
        if extra <= 0:
            return
        for jid in [j.id for j in self._jobs.values() if j.state not in ("queued", "running")][:extra]:
            del self._jobs[jid]

    def busy(self) -> bool:
        """True while a job is queued or running."""
        with self._lock:
            return bool(self._pending) or any(j.state == "running" for j in self._jobs.values())

    def job(self, job_id: str) -> dict | None:
        """The job as a dict (state, timings, slices, error), or None if unknown or forgotten."""
        with self._lock:
            j = self._jobs.get(job_id)
            return asdict(j) if j else None

    def status(self) -> dict:
        with self._lock:
            jobs = [asdict(j) for j in list(self._jobs.values())[-20:]]
            pending = sorted(self._pending)
        st = {"pending": pending, "queue_length": self._q.qsize(), "last_reconcile": self.last_reconcile,
              "recent_jobs": jobs, "worker_alive": bool(self._thread and self._thread.is_alive()),
              "unavailable": sorted(self.unavailable), "last_error": self.last_error}
        if self._dicomweb is not None:
            st["rejected_segs"] = dict(self._dicomweb.rejected)
        return st

    # -- reconcile ------------------------------------------------------------------------------
    def labeled_items(self) -> list[LabeledVolume]:
        """Every image with a final label, as (id, image path, label path)."""
        ds = self.datastore
        if self._dicomweb is not None:
            items = [LabeledVolume(i, img, lab) for i, img, lab in self._dicomweb.items()]
            self.unavailable = set(self._dicomweb.unavailable)
            self._last_items = {it.image_id: it for it in items}
            return items
        out = []
        unavailable = set()
        for image_id in sorted(ds.get_labeled_images(FINAL)):
            try:
                lab = ds.get_label_uri(image_id, FINAL)
                img = ds.get_image_uri(image_id)
            except Exception as e:  # a remote datastore may fail for one item; others go on
                logger.warning("cannot resolve %s: %s", image_id, e)
                unavailable.add(image_id)
                continue
            if lab and img and os.path.exists(lab) and os.path.exists(img):
                out.append(LabeledVolume(image_id, img, lab))
        self.unavailable = unavailable
        self._last_items = {it.image_id: it for it in out}
        return out

    def _item(self, image_id: str, fresh: bool) -> LabeledVolume | None:
        """One image's (image, final label), without listing the whole datastore when possible.

        A folder datastore is asked for that image alone. A DICOMweb one can only be listed (one
        SEG search; SEG metadata is cached), so a job queued by reconcile uses the listing that
        queued it; a save (``fresh``) lists again to see the new SEG.
        """
        if self._dicomweb is not None:
            if fresh or image_id not in self._last_items:
                self.labeled_items()
            return self._last_items.get(image_id)
        ds = self.datastore
        try:
            lab = ds.get_label_uri(image_id, FINAL)
            img = ds.get_image_uri(image_id)
        except Exception as e:  # a remote datastore may fail for one item
            logger.warning("cannot resolve %s: %s", image_id, e)
            self.unavailable.add(image_id)
            return None
        self.unavailable.discard(image_id)
        if lab and img and os.path.exists(lab) and os.path.exists(img):
            return LabeledVolume(image_id, img, lab)
        return None

    def reconcile(self) -> list[str]:
        """Queue every image whose final label is not in the index as it is now; drop removed ones."""
        refresh = getattr(self.datastore, "refresh", None)
        if refresh is not None and type(self.datastore).__name__.endswith("LocalDatastore"):
            refresh()
        index = self.c.index()
        stored = index.images()
        items = self.labeled_items()
        queued = []
        for it in items:
            try:
                lc = self._checksum(it.label_path)
            except OSError:
                continue
            st = stored.get(it.image_id)
            if st is None or st["label_checksum"] != lc:
                self.submit(it.image_id, "reconcile")
                queued.append(it.image_id)
        gone = set(stored) - {it.image_id for it in items} - self.unavailable
        for image_id in gone:
            logger.info("label of %s is gone: removing it from the index", image_id)
            index.remove_image(image_id)
        self.last_reconcile = time.time()
        return queued

    # -- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        next_reconcile = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now >= next_reconcile:
                try:
                    self.reconcile()
                    self.last_error = None
                except RagsegError as e:  # models missing: nothing to do until they appear
                    logger.debug("reconcile skipped: %s", e)
                except Exception as e:  # e.g. the PACS is down: nothing is removed, retried next round
                    self.last_error = f"reconcile failed: {type(e).__name__}: {e}"
                    logger.warning("%s", self.last_error)
                next_reconcile = time.time() + self.interval
            try:
                job_id = self._q.get(timeout=max(0.05, min(self.interval, next_reconcile - time.time())))
            except queue.Empty:
                continue
            if job_id is None:
                break
            self._do(job_id)

    def _do(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return
            job.state, job.started = "running", time.time()
            self._pending.pop(job.image, None)
        try:
            item = self._item(job.image, fresh=job.reason != "reconcile")
            index = self.c.index()
            if item is None and job.image in self.unavailable:
                raise RagsegError("its label cannot be fetched now (datastore unreachable); retried at the next "
                                  "reconcile, the index keeps what it had")
            if item is None:
                index.remove_image(job.image)
                job.state = "skipped"
                job.error = "no final label (removed from index)"
                return
            emb = self.c.embedder()
            vecs, recs = embed_labeled_volume(item, emb, self.c.pre)
            index.replace_image(item.image_id, vecs, recs)
            job.slices = len(recs)
            job.state = "done"
            job.finished = time.time()
            logger.info("indexed %s: %d labeled slices in %.2fs (%s)", item.image_id, len(recs),
                        job.finished - job.started, job.reason)
            if self.c.cfg.precompute_memories and recs:
                job.memories = self._precompute(recs)
        except Exception as e:
            job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            logger.warning("re-indexing %s failed: %s", job.image, job.error)
        finally:
            job.finished = job.finished or time.time()
            with self._lock:
                self._evict()

    def _precompute(self, recs) -> int:
        """Support memories for every (slice, label) of a newly indexed image."""
        from ..pipeline import SupportStore

        engine = self.c.engine()
        store = SupportStore(self.c.pre, max_volumes=1)
        sups = [store.support(r, v) for r in recs for v in r.labels]
        n = 0
        for s in range(0, len(sups), 4):  # small chunks so a stop request is honoured soon
            if self._stop.is_set():
                break
            n += engine.warm_supports(sups[s:s + 4])
        return n
