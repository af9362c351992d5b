"""The pool's label layout: which labels are one connected structure (and the largest-component
rule), which lie enclosed by another (and the label rule for their overlap)."""

from __future__ import annotations

import numpy as np

from ragseg import layout
from ragseg.index import SliceRecord


def _stack(n=8, size=20):
    return np.zeros((n, size, size), np.int64)


def test_structure_fractions_need_consecutive_slices():
    lab = _stack()
    lab[1:6, 5:10, 5:10] = 1  # one blob over 5 slices
    lab[1:6, 2:4, 14:18] = 2  # two blobs of label 2: 5x2x4 = 40 and 5x4x3 = 60 voxels
    lab[1:6, 14:18, 14:17] = 2
    lab[2, 15:18, 2:5] = 3  # label 3 on slices 2 and 6 only: a gap, no evidence
    lab[6, 15:18, 2:5] = 3
    lab[0:2, 0:2, 0:2] = 4  # two slices only: too few
    fr = layout.structure_fractions(lab)
    assert fr == {"1": 1.0, "2": 0.6}
    assert layout.structure_fractions(lab, min_slices=2)["4"] == 1.0


def test_single_structures_need_every_volume_to_agree():
    assert layout.single_structures([{"1": 1.0, "2": 0.95}, {"1": 0.99, "2": 0.5}]) == {1}
    assert layout.single_structures([{"1": 0.95}], fraction=0.96) == set()
    assert layout.single_structures([{}, {}]) == set()  # scattered labels: no evidence, no rule
    recs = [SliceRecord("a", z, [1], "c", extra={layout.RECORD_KEY: {"1": 1.0}}) for z in range(3)]
    recs += [SliceRecord("b", 0, [1], "c", extra={"preprocess": "x"})]  # indexed before the rule: ignored
    assert layout.single_structure_labels(recs) == {1}
    recs += [SliceRecord("c", 0, [1], "c", extra={layout.RECORD_KEY: {"1": 0.4}})]
    assert layout.single_structure_labels(recs) == set()


def test_keep_largest_removes_islands_of_the_listed_labels_only():
    pred = _stack()
    pred[2:6, 4:12, 4:12] = 1
    pred[7, 15:18, 15:18] = 1  # island on a slice of its own
    pred[3, 0:2, 0:2] = 1  # island in-plane, not touching by a face
    pred[2:4, 14:16, 2:4] = 2
    pred[6:8, 14:16, 2:4] = 2  # label 2 in two pieces, but not listed
    out = layout.keep_largest(pred, [1])
    assert (out == 1).sum() == 4 * 8 * 8 and not (out[7] == 1).any() and out[3, 0, 0] == 0
    assert np.array_equal(out == 2, pred == 2)
    assert (pred[7, 15:18, 15:18] == 1).all()  # the input is not modified
    # two pieces of alike size: which one is the structure is a guess, so both stay
    twin = _stack()
    twin[1:3, 2:6, 2:6] = 1  # 32 voxels
    twin[5:7, 12:16, 12:15] = 1  # 24 voxels: at least half of 32
    twin[7, 0:2, 0:2] = 1  # 4 voxels: goes
    kept = layout.keep_largest(twin, [1])
    assert (kept == 1).sum() == 56 and kept[7, 0, 0] == 0
    assert (layout.keep_largest(twin, [1], ratio=1.0) == 1).sum() == 32
    # touching only by an edge (not a face) is not connected
    edge = _stack()
    edge[2, 4:8, 4:8] = 1
    edge[3, 8:9, 8:9] = 1
    assert (layout.keep_largest(edge, [1]) == 1).sum() == 16


def _heart(size=40):
    """A slice with a cavity (3) inside a ring (2), and a third label (1) beside the ring."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 20, xx - 16)
    s = np.zeros((size, size), np.int64)
    s[r < 10] = 2
    s[r < 6] = 3
    s[(xx >= 26) & (xx < 34) & (yy > 12) & (yy < 28)] = 1  # touches the ring's right edge
    return s


def test_outline_counts_find_the_enclosed_pair_only():
    lab = np.stack([_heart(), _heart(), np.zeros((40, 40), np.int64)])
    lab[1][lab[1] == 1] = 0  # one slice without the neighbour
    c = layout.outline_counts(lab)
    assert c["3>2"][0] == c["3>2"][1] > 0  # the cavity's whole outline is ring
    assert 0 < c["1>2"][0] < 0.5 * c["1>2"][1]  # the neighbour touches the ring on one side
    assert 0 < c["2>3"][0] < 0.5 * c["2>3"][1]  # the ring's outline: its hole's edge, and the outside
    assert c["1>3"] == [0, c["1>2"][1]]  # counted on the one slice that has label 1
    assert layout.enclosed_pairs([c]) == {(3, 2)}
    # a second volume where 3 sits beside 2 pools against the first
    apart = np.zeros((1, 40, 40), np.int64)
    apart[0, 2:10, 2:10], apart[0, 2:10, 10:30] = 3, 2
    c2 = layout.outline_counts(np.repeat(apart, 8, 0))
    assert layout.enclosed_pairs([c, c2]) == set()
    pooled = [sum(x[0] for x in (c["3>2"], c2["3>2"])), sum(x[1] for x in (c["3>2"], c2["3>2"]))]
    assert (3, 2) in layout.enclosed_pairs([c, c2], fraction=pooled[0] / pooled[1])
    recs = [SliceRecord("a", z, [1, 2, 3], "c", extra={layout.ENCLOSED_KEY: c}) for z in range(2)]
    recs += [SliceRecord("b", 0, [2, 3], "c", extra={"preprocess": "x"})]  # indexed before the rule: no evidence
    assert layout.enclosed_label_pairs(recs) == {(3, 2)}
    recs += [SliceRecord("c", 0, [2, 3], "c", extra={layout.ENCLOSED_KEY: c2})]
    assert layout.enclosed_label_pairs(recs) == set()
