"""Active learning by embedding diversity: annotate where the labeled pool is thinnest.

k-center greedy on slice embeddings: the next sample is the unlabeled slice farthest (cosine
distance) from every labeled slice; its image is suggested, with the slices that the next greedy
steps pick inside that image (so the annotator knows where to draw). ``coverage`` is the mean,
over all unlabeled slices, of the similarity to the nearest labeled slice (1 = fully covered).

Cold start (nothing labeled): the most representative image, the one whose mean slice embedding
is closest to the mean of all images.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.strategy import Strategy

from ..embedders import l2_normalize
from ..errors import InputError
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

    def get(self, image_path: str) -> tuple[np.ndarray, np.ndarray]:
        """(canonical slice indices, embeddings) for a sample of the image's slices."""
        p = self._dir() / f"{self._checksum(image_path)}.npz"
        if p.exists():
            try:
                with np.load(p) as z:
                    return z["slices"], z["vectors"]
            except Exception:  # unreadable cache entry: recompute
                p.unlink(missing_ok=True)
        vol = load_image(image_path)
        sl = self.c.pre.slices(vol)
        idx = np.unique(np.linspace(0, len(sl) - 1, min(len(sl), MAX_SLICES_PER_IMAGE)).round().astype(int))
        vec = self.c.embedder().embed(sl[idx])
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=str(p.parent), suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, slices=idx, vectors=vec)
        os.replace(tmp, p)
        return idx, vec


class DiversityStrategy(Strategy):
    """Next image by k-center greedy on slice embeddings."""

    def __init__(self, components: Components, cache: SliceEmbeddingCache | None = None):
        super().__init__("Diversity: the image whose slices are farthest from every labeled slice "
                         "(k-center greedy on DINOv2 slice embeddings)")
        self.c = components
        self.cache = cache or SliceEmbeddingCache(components)

    def __call__(self, request: dict, datastore) -> dict | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        try:
            pool = self.c.index().vectors()
        except ModelUnavailable as e:
            raise HTTPException(503, f"diversity strategy unavailable: {e}") from e
        cand_img, cand_slice, cand_vec = [], [], []
        for image_id in sorted(images):
            path = datastore.get_image_uri(image_id)
            try:
                sl, vec = self.cache.get(path)
            except (InputError, OSError) as e:
                logger.warning("diversity: skipping %s: %s", image_id, e)
                continue
            cand_img += [image_id] * len(sl)
            cand_slice += [int(s) for s in sl]
            cand_vec.append(vec)
        if not cand_vec:
            return None
        V = np.concatenate(cand_vec)
        img_arr = np.array(cand_img)
        if len(pool) == 0:
            res = self._cold_start(V, img_arr)
        else:
            res = self._k_center(V, img_arr, np.asarray(cand_slice), pool)
        image_id = res["id"]
        # slice numbers as a viewer shows them
        path = datastore.get_image_uri(image_id)
        if res.get("slices"):
            vol = load_image(path)
            res["slices"] = [canonical_to_file_slice(s, vol.shape, vol.affine, self.c.pre.axis_index)
                             for s in res["slices"]]
        res.update({"strategy": request.get("strategy", "diversity"), "ts": int(time.time())})
        try:
            datastore.update_image_info(image_id, {"ragseg_suggestion": dict(res)})
        except Exception as e:  # a read-only datastore still gets the answer
            logger.warning("could not store the suggestion in image info: %s", e)
        logger.info("diversity: next %s score %.3f coverage %.3f slices %s", image_id, res["score"],
                    res["coverage"], res.get("slices"))
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
