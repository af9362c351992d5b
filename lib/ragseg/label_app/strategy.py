"""Active learning by embedding diversity: annotate where the labeled pool is thinnest.

k-center greedy on slice embeddings: the next sample is the unlabeled slice farthest (cosine
distance) from every labeled slice; its image is suggested, with the slices that the next greedy
steps pick inside that image (so the annotator knows where to draw). ``coverage`` is the mean,
over all unlabeled slices, of the similarity to the nearest labeled slice (1 = fully covered).

Cold start (nothing labeled): the most representative image, the one whose mean slice embedding
is closest to the mean of all images.

Embedding images is slow (LiteMedSAM: ~2 s a slice on a CPU), so it never happens on the
request: :class:`EmbeddingWarmer` embeds every unlabeled image in the background (at startup and
whenever new images appear) into an on-disk cache, and the strategy answers from what is cached.
Until every image is cached the answer says ``partial: true`` with how many are.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.strategy import Strategy

from ..atomic import atomic_write
from ..embedders import l2_normalize
from ..errors import InputError, RagsegError
from ..pipeline import index_id
from ..volume import ChecksumCache, canonical_to_file_slice, load_image
from .components import Components, ModelUnavailable

logger = logging.getLogger(__name__)

SUGGESTED_SLICES = 3
MAX_SLICES_PER_IMAGE = 64  # evenly spaced sample of a volume's slices, bounds cost on big volumes


class SliceEmbeddingCache:
    """Embeddings of every slice of an image, on disk, keyed by image checksum and embedder."""

    def __init__(self, components: Components):
        self.c = components
        self._checksum = ChecksumCache()

    def _dir(self) -> Path:
        tag = hashlib.sha256(index_id(self.c.embedder(), self.c.pre).encode()).hexdigest()[:12]
        return self.c.index_dir / "embeddings" / tag

    def _path(self, image_path: str) -> Path:
        return self._dir() / f"{self._checksum(image_path)}.npz"

    def peek(self, image_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Cached (canonical slice indices, file slice numbers, embeddings), or None. Never embeds."""
        p = self._path(image_path)
        if not p.exists():
            return None
        try:
            with np.load(p) as z:
                return z["slices"], z["file_slices"], z["vectors"]
        except Exception:  # unreadable or old-format entry: recomputed by the warmer
            p.unlink(missing_ok=True)
            return None

    def get(self, image_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`peek`, computing and caching the entry if missing (slow: runs the embedder)."""
        hit = self.peek(image_path)
        if hit is not None:
            return hit
        p = self._path(image_path)
        vol = load_image(image_path)
        sl = self.c.pre.slices(vol)
        idx = np.unique(np.linspace(0, len(sl) - 1, min(len(sl), MAX_SLICES_PER_IMAGE)).round().astype(int))
        vec = self.c.embedder().embed(sl[idx])
        fidx = np.array([canonical_to_file_slice(int(s), vol.shape, vol.affine, self.c.pre.axis_index) for s in idx])
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(p) as fh:
            np.savez(fh, slices=idx, file_slices=fidx, vectors=vec)
        return idx, fidx, vec


class EmbeddingWarmer:
    """Background thread that keeps :class:`SliceEmbeddingCache` filled for unlabeled images.

    Rescans the datastore every ``interval`` seconds (new images, newly unlabeled ones); ``status``
    says how far it got. Embedding runs on this thread only, never on a request.
    """

    def __init__(self, components: Components, datastore, cache: SliceEmbeddingCache, *, interval: float = 10.0):
        self.c, self.datastore, self.cache, self.interval = components, datastore, cache, interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed: dict[str, str] = {}  # image id -> why it cannot be embedded
        self.enabled = True  # False (--conf embed_unlabeled false): the strategy embeds on the request
        self.busy = lambda: False  # while true (labels being indexed), the warmer waits: labels first
        self.last_pass: float | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ragseg-embed", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.warm()
            except RagsegError as e:  # models not loadable: /info says why; retried later
                logger.debug("embedding warm-up skipped: %s", e)
            except Exception as e:  # a datastore hiccup: retried next round
                logger.warning("embedding warm-up failed: %s: %s", type(e).__name__, e)
            self._wake.wait(self.interval)
            self._wake.clear()

    def warm(self) -> int:
        """Embed every unlabeled image not cached yet; returns how many were embedded."""
        n = 0
        for image_id in sorted(self.datastore.get_unlabeled_images()):
            while self.busy() and not self._stop.is_set():
                time.sleep(0.2)
            if self._stop.is_set():
                break
            try:
                path = self.datastore.get_image_uri(image_id)
                if self.cache.peek(path) is None:
                    self.cache.get(path)
                    n += 1
                self.failed.pop(image_id, None)
            except (InputError, OSError) as e:
                self.failed[image_id] = str(e)
        self.last_pass = time.time()
        if n:
            logger.info("diversity: embedded %d new unlabeled image(s) in the background", n)
        return n


class DiversityStrategy(Strategy):
    """Next image by k-center greedy on slice embeddings."""

    def __init__(self, components: Components, cache: SliceEmbeddingCache | None = None,
                 warmer: EmbeddingWarmer | None = None):
        super().__init__("Diversity: the image whose slices are farthest from every labeled slice "
                         "(k-center greedy on slice embeddings)")
        self.c = components
        self.cache = cache or SliceEmbeddingCache(components)
        self.warmer = warmer

    def __call__(self, request: dict, datastore) -> dict | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        try:
            pool = self.c.index().vectors()
        except ModelUnavailable as e:
            raise HTTPException(503, f"diversity strategy unavailable: {e}") from e
        background = self.warmer is not None and self.warmer.enabled
        cand_img, cand_slice, cand_vec = [], [], []
        file_slice: dict[tuple[str, int], int] = {}
        waiting = []
        for image_id in sorted(images):
            try:
                path = datastore.get_image_uri(image_id)
                hit = self.cache.peek(path) if background else self.cache.get(path)
            except (InputError, OSError) as e:
                logger.warning("diversity: skipping %s: %s", image_id, e)
                continue
            if hit is None:  # the background warmer has not reached it yet
                waiting.append(image_id)
                continue
            sl, fsl, vec = hit
            cand_img += [image_id] * len(sl)
            cand_slice += [int(s) for s in sl]
            file_slice.update({(image_id, int(a)): int(b) for a, b in zip(sl, fsl)})
            cand_vec.append(vec)
        if background and waiting:
            self.warmer.wake()
        if not cand_vec:
            # nothing embedded yet (just started): any unlabeled image, and say so
            res = {"id": sorted(images)[0], "slices": [], "score": None, "coverage": None, "cold_start": True}
        else:
            V = np.concatenate(cand_vec)
            img_arr = np.array(cand_img)
            if len(pool) == 0:
                res = self._cold_start(V, img_arr)
            else:
                res = self._k_center(V, img_arr, np.asarray(cand_slice), pool)
        image_id = res["id"]
        # slice numbers as a viewer shows them
        res["slices"] = [file_slice[(image_id, s)] for s in res.get("slices") or []]
        res["partial"] = bool(waiting)
        res["embedded_images"] = len(images) - len(waiting)
        res["unlabeled_images"] = len(images)
        if waiting:
            res["message"] = (f"{len(waiting)} of {len(images)} unlabeled images are still being embedded in the "
                              "background; this suggestion covers the others")
        res.update({"strategy": request.get("strategy", "diversity"), "ts": int(time.time())})
        try:
            datastore.update_image_info(image_id, {"ragseg_suggestion": dict(res)})
        except Exception as e:  # a read-only datastore still gets the answer
            logger.warning("could not store the suggestion in image info: %s", e)
        logger.info("diversity: next %s score %s coverage %s slices %s%s", image_id, res["score"], res["coverage"],
                    res.get("slices"), " (partial)" if waiting else "")
        return res

    @staticmethod
    def _cold_start(V: np.ndarray, img: np.ndarray) -> dict:
        ids = sorted(set(img.tolist()))
        means = l2_normalize(np.stack([V[img == i].mean(0) for i in ids]))
        center = l2_normalize(means.mean(0, keepdims=True))[0]
        sims = means @ center
        best = int(np.argmax(sims))
        return {"id": ids[best], "slices": [], "score": float(sims[best]), "coverage": 0.0, "cold_start": True}

    @staticmethod
    def _k_center(V: np.ndarray, img: np.ndarray, slices: np.ndarray, pool: np.ndarray) -> dict:
        nearest = (V @ pool.T).max(axis=1)  # similarity of each candidate slice to the labeled pool
        dist = 1.0 - nearest
        first = int(np.argmax(dist))
        image_id = str(img[first])
        # further greedy steps inside the chosen image: where else to draw
        chosen = [first]
        d = np.minimum(dist, 1.0 - V @ V[first])
        mine = img == image_id
        for _ in range(SUGGESTED_SLICES - 1):
            cand = np.where(mine, d, -np.inf)
            j = int(np.argmax(cand))
            if not np.isfinite(cand[j]) or j in chosen:
                break
            chosen.append(j)
            d = np.minimum(d, 1.0 - V @ V[j])
        return {"id": image_id, "slices": [int(slices[j]) for j in chosen], "score": float(dist[first]),
                "image_gap": float(dist[mine].mean()), "coverage": float(nearest.mean()), "cold_start": False}
