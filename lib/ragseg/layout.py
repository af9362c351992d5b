"""What the labeled pool's label layout says about each label: is it one connected 3D structure,
and which labels lie enclosed by another?

A left ventricle, a hippocampus head or a liver is one connected 3D structure in every labeled
volume; MS lesions or a label that covers both kidneys are not. For a label that the pool shows
as one structure, a predicted volume keeps only its largest connected component (and any other
at least half its size: then which piece is the structure is a guess): slice-by-slice
predictions leave stray islands on slices where a look-alike region fooled the decoder, and
those islands are not connected to the structure through the neighbouring slices.

A left ventricle lies inside the myocardium's ring on every slice; a kidney never lies inside the
liver. Where the pool shows one label enclosed by another (the inner label's outline is the outer
label), the label rule lets the inner structure win the overlap of the two predicted masks: a
box-prompted decoder fills a ring into a disk over its cavity (:func:`ragseg.pipeline.resolve_nested`).
For labels the pool shows side by side the rule would hand the overlap to whichever spurious
mask happens to be the smaller one, so it applies only to the enclosed pairs.

The evidence is computed when a labeled volume is indexed (:func:`structure_fractions` and
:func:`outline_counts`, stored in each record's ``extra``) and read back per request
(:func:`single_structure_labels`, :func:`enclosed_label_pairs`), so the index stays the only
state and is rebuilt from the labels like everything else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from . import defaults

logger = logging.getLogger(__name__)

RECORD_KEY = "largest_component"  # SliceRecord.extra key: {label value (str): fraction}
ENCLOSED_KEY = "outline"  # SliceRecord.extra key: {"inner>outer": [outline pixels on outer, outline pixels]}
_FACES = ndimage.generate_binary_structure(3, 1)  # 6-connectivity: slices connect only through overlap


def largest_fraction(mask: np.ndarray) -> float:
    """Share of the voxels of a 3D bool mask that lie in its largest 6-connected component."""
    lab, n = ndimage.label(mask, structure=_FACES)
    if n == 0:
        return 0.0
    sizes = np.bincount(lab.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def structure_fractions(label_slices: np.ndarray, min_slices: int = defaults.STRUCTURE_MIN_SLICES
                        ) -> dict[str, float]:
    """label value (as str, for JSON) -> :func:`largest_fraction` of that label in a stack of
    canonical label slices [n, H, W], for labels drawn on at least ``min_slices`` consecutive
    slices with no unlabeled slice in between. A label drawn on scattered slices (a few-shot user
    labels slices 10, 20 and 30) says nothing about 3D connectivity and gets no entry."""
    out: dict[str, float] = {}
    for v in np.unique(label_slices):
        if v == 0:
            continue
        m = label_slices == v
        zs = np.nonzero(m.any((1, 2)))[0]
        if len(zs) < min_slices or zs[-1] - zs[0] + 1 != len(zs):
            continue
        out[str(int(v))] = round(largest_fraction(m[zs[0]:zs[-1] + 1]), 4)
    return out


def single_structure_labels(records: Iterable, fraction: float = defaults.STRUCTURE_FRACTION) -> set[int]:
    """Labels that are one structure in the pool: every labeled volume with evidence for the label
    (:func:`structure_fractions`, read from index records' ``extra``) has at least ``fraction`` of
    its voxels in the largest component, and at least one volume has evidence."""
    per_image: dict[str, dict[str, float]] = {}
    for r in records:
        if r.image_id not in per_image:
            per_image[r.image_id] = (r.extra or {}).get(RECORD_KEY) or {}
    return single_structures(per_image.values(), fraction)


def single_structures(volumes: Iterable[dict[str, float]], fraction: float = defaults.STRUCTURE_FRACTION
                      ) -> set[int]:
    """The rule of :func:`single_structure_labels` on one :func:`structure_fractions` per volume."""
    seen: dict[int, bool] = {}
    for fr in volumes:
        for v, f in fr.items():
            seen[int(v)] = seen.get(int(v), True) and float(f) >= fraction
    return {v for v, ok in seen.items() if ok}


def keep_largest(label_slices: np.ndarray, values: Iterable[int],
                 ratio: float = defaults.STRUCTURE_KEEP_RATIO) -> np.ndarray:
    """For each label value in ``values``, keep its largest 6-connected component in the stack
    [n, H, W] of consecutive slices, and any other component at least ``ratio`` times its size
    (when two pieces are alike in size, which is the structure is a guess: keep both); the rest
    becomes background. Returns a new array."""
    out = label_slices.copy()
    for v in values:
        m = label_slices == v
        lab, n = ndimage.label(m, structure=_FACES)
        if n <= 1:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out[m & (sizes[lab] < ratio * sizes.max())] = 0
    return out


def has_evidence(extra: dict | None) -> bool:
    """Whether a record's ``extra`` holds every kind of evidence this module reads (volumes indexed
    by an older version lack some and are re-indexed once)."""
    return bool(extra) and RECORD_KEY in extra and ENCLOSED_KEY in extra


def outline_counts(label_slices: np.ndarray) -> dict[str, list[int]]:
    """How much of each label's in-plane outline is another label, over a stack of canonical label
    slices [n, H, W]: ``"a>b" -> [outline pixels of a that are b, outline pixels of a]`` for every
    pair drawn on a common slice. The outline is the ring of pixels 4-adjacent to the label and not
    in it. Per slice, so scattered labeled slices are evidence too (unlike 3D connectivity)."""
    counts: dict[str, list[int]] = {}
    for s in label_slices:
        present = [int(v) for v in np.unique(s) if v != 0]
        if len(present) < 2:
            continue
        for a in present:
            m = s == a
            ring = ndimage.binary_dilation(m) & ~m
            on = np.bincount(s[ring].ravel().astype(np.int64), minlength=max(present) + 1)
            total = int(ring.sum())
            for b in present:
                if b != a:
                    c = counts.setdefault(f"{a}>{b}", [0, 0])
                    c[0] += int(on[b])
                    c[1] += total
    return counts


def enclosed_pairs(volumes: Iterable[dict[str, list[int]]], fraction: float = defaults.ENCLOSED_FRACTION
                   ) -> set[tuple[int, int]]:
    """(inner, outer) label pairs whose pooled :func:`outline_counts` over the volumes put at least
    ``fraction`` of the inner label's outline on the outer label."""
    pooled: dict[str, list[int]] = {}
    for counts in volumes:
        for key, (on, total) in counts.items():
            c = pooled.setdefault(key, [0, 0])
            c[0] += int(on)
            c[1] += int(total)
    out = set()
    for key, (on, total) in pooled.items():
        if total > 0 and on >= fraction * total:
            a, b = key.split(">")
            out.add((int(a), int(b)))
    return out


def enclosed_label_pairs(records: Iterable, fraction: float = defaults.ENCLOSED_FRACTION) -> set[tuple[int, int]]:
    """The rule of :func:`enclosed_pairs` on the evidence stored in index records' ``extra`` (one
    entry per labeled volume; volumes indexed before the evidence existed give none)."""
    per_image: dict[str, dict[str, list[int]]] = {}
    for r in records:
        if r.image_id not in per_image:
            per_image[r.image_id] = (r.extra or {}).get(ENCLOSED_KEY) or {}
    return enclosed_pairs(per_image.values(), fraction)
