"""The segmentation infer task: a whole volume, or some slices / an ROI, from the labeled pool.

Request params (JSON ``params`` of ``POST /infer/<model>``), all optional:
    k                     supports per label (1..16; default from --conf k)
    labels                label names or values to segment (default: all with labeled slices)
    slice                 slice number(s) as a viewer shows them (voxel index along the stored
                          axis that is the slicing axis); only these are segmented
    roi                   [[i0, i1], [j0, j1], [k0, k1]] (or flat) voxel bounds, inclusive;
                          slices crossing it are segmented and the result is cut to it
    result_extension      '.nii.gz' (default), '.nii', '.nrrd', '.seg.nrrd'
    result_dtype          'uint8' (default) or 'uint16'
    propagate             3D consistency mode (bool)
    same_image_supports   allow labeled slices of this image as supports (bool)
    keep_labeled_slices   slices a human labeled in this image keep the human label (bool, default true)
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from .. import defaults
from ..errors import InputError, RagsegError
from ..volume import (
    canonical_to_file_slice,
    file_axis_for,
    file_to_canonical_slice,
    load_image,
    load_label,
    save_label,
)
from .components import Components, ModelUnavailable
from .config import parse_bool

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
RESULT_DTYPES = ("uint8", "uint16")


def _as_bool(name: str, v: Any) -> bool:
    try:
        return False if v == "" else parse_bool(v)
    except ValueError as e:
        raise HTTPException(422, f"param {name}: {e}") from None


def _int_list(name: str, v: Any) -> list[int]:
    vals = v if isinstance(v, (list, tuple)) else str(v).replace(" ", "").split(",")
    try:
        return [int(x) for x in vals if str(x) != ""]
    except (TypeError, ValueError):
        raise HTTPException(422, f"param {name}: expected integers, got {v!r}") from None


def _roi(v: Any, shape: tuple[int, int, int]) -> list[tuple[int, int]]:
    flat = np.asarray(v, dtype=float).ravel() if v is not None else np.zeros(0)
    if flat.size != 6:
        raise HTTPException(422, f"param roi: expected [[i0,i1],[j0,j1],[k0,k1]], got {v!r}")
    out = []
    for d in range(3):
        lo, hi = sorted((int(round(flat[2 * d])), int(round(flat[2 * d + 1]))))
        lo, hi = max(lo, 0), min(hi, shape[d] - 1)
        if lo > hi:
            raise HTTPException(422, f"param roi: axis {d} range {flat[2 * d]}..{flat[2 * d + 1]} is outside the image "
                                     f"(size {shape[d]})")
        out.append((lo, hi))
    return out


class RagSegInfer(InferTask):
    """Few-shot segmentation from retrieved labeled slices (type 'segmentation', 3D)."""

    def __init__(self, components: Components, label_names: Callable[[], dict[str, int]],
                 human_label: Callable[[str], str | None], description: str = "",
                 suggestion: Callable[[str], dict | None] | None = None):
        cfg = components.cfg
        super().__init__(
            type=InferType.SEGMENTATION, labels=label_names(), dimension=3,
            description=description or f"Few-shot segmentation from your labeled slices ({components.backend} backend)",
            config={"k": cfg.k, "propagate": cfg.propagate, "same_image_supports": cfg.same_image_supports,
                    "keep_labeled_slices": True},
        )
        self.c = components
        self.label_names = label_names
        self.human_label = human_label
        self.suggestion = suggestion or (lambda image_id: None)

    def is_valid(self) -> bool:
        return True  # listed even when unusable: info() says why, requests get the reason

    def info(self) -> dict[str, Any]:
        self.labels = self.label_names()
        d = super().info()
        d["ragseg"] = self.c.status()
        return d

    # -- request parsing ------------------------------------------------------------------------
    def _names(self) -> tuple[dict[str, int], dict[int, str]]:
        names = self.label_names()
        return names, {v: k for k, v in names.items()}

    def _labels_param(self, v: Any) -> list[int] | None:
        if v is None or v == "" or v == []:
            return None
        names, _ = self._names()
        items = v if isinstance(v, (list, tuple)) else str(v).split(",")
        out = []
        for x in items:
            x = str(x).strip()
            if x.isdigit():
                out.append(int(x))
            elif x in names:
                out.append(names[x])
            else:
                raise HTTPException(422, f"param labels: unknown label {x!r}; known: {', '.join(names) or 'none'}")
        return out

    def __call__(self, request: dict) -> tuple[str, dict]:
        t0 = time.time()
        cfg = self.c.cfg
        k = request.get("k", cfg.k)
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise HTTPException(422, f"param k: expected an integer, got {k!r}") from None
        if not 1 <= k <= defaults.MAX_K:
            raise HTTPException(422, f"param k: must be between 1 and {defaults.MAX_K}, got {k}")
        ext = str(request.get("result_extension") or ".nii.gz")
        if ext not in RESULT_EXTENSIONS:
            raise HTTPException(422, f"param result_extension: must be one of {', '.join(RESULT_EXTENSIONS)}")
        dtype = str(request.get("result_dtype") or "uint8")
        if dtype not in RESULT_DTYPES:
            raise HTTPException(422, f"param result_dtype: must be one of {', '.join(RESULT_DTYPES)}")
        labels = self._labels_param(request.get("labels"))
        propagate = _as_bool("propagate", request.get("propagate", cfg.propagate))
        same = _as_bool("same_image_supports", request.get("same_image_supports", cfg.same_image_supports))
        keep = _as_bool("keep_labeled_slices", request.get("keep_labeled_slices", True))
        image_id = request.get("ragseg_image_id") or "upload"

        path = request.get("image")
        if not isinstance(path, str) or not path or not os.path.exists(path):
            raise HTTPException(404, f"image {image_id!r} not found")
        if propagate and self.c.backend != "rag-sam2":
            raise HTTPException(422, f"param propagate: not available with the {self.c.backend} backend")
        try:
            seg = self.c.segmenter(k=k, same_image=same, propagate=propagate)
        except ModelUnavailable as e:
            raise HTTPException(503, str(e)) from e
        try:
            vol = load_image(path)
        except InputError as e:
            raise HTTPException(422, f"image {image_id!r} cannot be used: {e.problem}") from e

        # which slices: all, `slice`, or those crossing `roi` (viewer numbering -> canonical)
        axis = self.c.pre.axis_index
        fax, _ = file_axis_for(vol.affine, axis)
        n = vol.shape[fax]
        roi = _roi(request["roi"], vol.shape) if request.get("roi") not in (None, "", []) else None
        file_slices: list[int] | None = None
        if request.get("slice") not in (None, "", []):
            file_slices = _int_list("slice", request["slice"])
            bad = [s for s in file_slices if not 0 <= s < n]
            if bad:
                raise HTTPException(422, f"param slice: {bad} outside 0..{n - 1}")
        if roi is not None:
            r = list(range(roi[fax][0], roi[fax][1] + 1))
            file_slices = sorted(set(file_slices) & set(r)) if file_slices is not None else r
        canon = None if file_slices is None else [file_to_canonical_slice(s, vol.shape, vol.affine, axis)
                                                  for s in file_slices]
        try:
            t = time.time()
            with self.c.model_runs:  # at most infer_concurrency segmentations at once; others wait here
                waited = time.time() - t
                res = seg.segment_volume(vol, image_id=image_id, labels=labels, slices=canon)
        except InputError as e:
            raise HTTPException(422, str(e)) from e
        except RagsegError as e:
            raise HTTPException(500, f"segmentation failed: {e}") from e
        out = res.label_map
        if roi is not None:
            box = np.zeros(out.shape, bool)
            box[roi[0][0]:roi[0][1] + 1, roi[1][0]:roi[1][1] + 1, roi[2][0]:roi[2][1] + 1] = True
            out = np.where(box, out, 0).astype(out.dtype)
        kept: list[int] = []
        if keep and image_id != "upload":
            out, kept = self._keep_human_slices(image_id, vol, out, fax, file_slices)

        names, by_value = self._names()
        fd, result_file = tempfile.mkstemp(suffix=ext, prefix="ragseg_")
        os.close(fd)
        try:
            # file voxel order (ITK's slice order for DICOM series) is also the order OHIF's panel
            # copies NRRD voxels into, without reading the header
            save_label(result_file, out, vol, dtype=dtype)
        except InputError as e:
            raise HTTPException(422, str(e)) from e
        name_of = lambda v: by_value.get(v, f"label_{v}")  # noqa: E731
        segmented = sorted(res.supports)
        warnings = [f"no labeled slice for {name_of(v)!r} (label {v}) in the pool; it was not segmented"
                    for v in res.missing_labels]
        result = {
            "label_names": {name_of(v): v for v in sorted(set(segmented) | set(names.values()))},
            "segmented_labels": [name_of(v) for v in segmented],
            "missing_labels": [name_of(v) for v in res.missing_labels],
            # one connected structure in every labeled volume: reduced to the largest component
            "largest_component_only": [name_of(v) for v in res.single_structures],
            # [inner, outer]: the pool shows inner enclosed by outer, so inner won their overlap
            "enclosed": [[name_of(a), name_of(b)] for a, b in res.enclosed],
            "warnings": warnings,
            "supports": {name_of(v): [list(s) for s in sup] for v, sup in res.supports.items()},
            "slices": sorted(canonical_to_file_slice(s, vol.shape, vol.affine, axis) for s in res.slices),
            "human_slices_kept": kept,
            "k": k,
            "backend": self.c.backend,
            "latencies": {"total": round(time.time() - t0, 3), "queued": round(waited, 3),
                          **{k: round(v, 3) for k, v in res.timings.items()}},
        }
        sug = self.suggestion(image_id) if image_id != "upload" else None
        if sug:  # the active-learning suggestion for this image: where to draw next
            result["suggestion"] = {k: sug.get(k) for k in ("slices", "score", "coverage", "strategy", "ts")}
        if self.c.cfg.random_weights_for_testing:
            result["warnings"].append("RANDOM WEIGHTS (random_weights_for_testing=true): this mask is meaningless")
        if not segmented:
            result["message"] = "nothing segmented: " + ("; ".join(warnings) or "the labeled pool is empty")
        return result_file, result

    def _keep_human_slices(self, image_id: str, vol, out: np.ndarray, fax: int,
                           file_slices: list[int] | None) -> tuple[np.ndarray, list[int]]:
        lab_path = self.human_label(image_id)
        if not lab_path:
            return out, []
        try:
            human = load_label(lab_path, like=vol).array
        except InputError as e:
            logger.warning("ignoring unusable saved label of %s: %s", image_id, e)
            return out, []
        other = tuple(a for a in range(3) if a != fax)
        labeled = np.nonzero(human.any(axis=other))[0]
        if file_slices is not None:
            labeled = np.intersect1d(labeled, file_slices)
        if labeled.size == 0:
            return out, []
        out = out.copy()
        idx = [slice(None)] * 3
        idx[fax] = labeled
        out[tuple(idx)] = human[tuple(idx)].astype(out.dtype)
        return out, [int(s) for s in labeled]
