"""Slice index: exact retrieval, replace on re-save, persistence, crash safety, concurrency."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ragseg.embedders import l2_normalize
from ragseg.index import SliceIndex, SliceRecord

D = 16


def _recs(image_id, n, labels=(1,), checksum="c0"):
    return [SliceRecord(image_id, i, list(labels), checksum) for i in range(n)]


def _vecs(rng, n, d=D):
    return l2_normalize(rng.standard_normal((n, d)))


def test_search_matches_brute_force(tmp_path, rng):
    idx = SliceIndex(tmp_path, embedder_id="e", dim=D)
    all_v, all_r = [], []
    for j in range(10):
        v = _vecs(rng, 12)
        r = _recs(f"img{j}", 12)
        idx.replace_image(f"img{j}", v, r)
        all_v.append(v)
        all_r += r
    V = np.concatenate(all_v)
    q = _vecs(rng, 5)
    hits = idx.search(q, 7)
    brute = np.argsort(-(q @ V.T), axis=1)[:, :7]
    for qi in range(5):
        got = [(h.record.image_id, h.record.slice_index) for h in hits[qi]]
        want = [(all_r[i].image_id, all_r[i].slice_index) for i in brute[qi]]
        assert got == want
        assert np.allclose([h.score for h in hits[qi]], (q[qi] @ V.T)[brute[qi]], atol=1e-5)


def test_filters_and_exclusions(tmp_path, rng):
    idx = SliceIndex(tmp_path, embedder_id="e", dim=D)
    v = _vecs(rng, 6)
    recs = [SliceRecord("a", i, [1] if i % 2 else [2], "c") for i in range(6)]
    idx.replace_image("a", v, recs)
    idx.replace_image("b", _vecs(rng, 3), [SliceRecord("b", i, [1, 2], "c") for i in range(3)])
    # the query is slice 1 of image a: it must never come back, even as its own best match
    h = idx.search(v[1:2], 20, exclude=[("a", 1)])[0]
    assert ("a", 1) not in [(x.record.image_id, x.record.slice_index) for x in h] and len(h) == 8
    h = idx.search(v[1:2], 20, label=2)[0]
    assert all(2 in x.record.labels for x in h) and len(h) == 6
    h = idx.search(v[1:2], 20, exclude_images=["a"])[0]
    assert {x.record.image_id for x in h} == {"b"}


def test_replace_on_resave_and_persistence(tmp_path, rng):
    idx = SliceIndex(tmp_path, embedder_id="e", dim=D)
    idx.replace_image("a", _vecs(rng, 5), _recs("a", 5, checksum="old"))
    idx.replace_image("b", _vecs(rng, 2), _recs("b", 2))
    new = _vecs(rng, 3)
    idx.replace_image("a", new, _recs("a", 3, checksum="new"))
    assert len(idx) == 5
    assert idx.images()["a"] == {"label_checksum": "new", "image_checksum": "", "n_slices": 3, "extra": {}}
    # a new instance (another process) reads the same content
    again = SliceIndex(tmp_path, embedder_id="e", dim=D)
    assert again.images() == idx.images()
    hits = again.search(new[0:1], 1)[0]
    assert hits[0].record.image_id == "a" and hits[0].record.label_checksum == "new"
    assert again.remove_image("a") == 3 and len(again) == 2
    assert len(idx) == 2  # the first instance picks up the other's change


def test_stale_and_corrupt_index_are_detected(tmp_path, rng):
    idx = SliceIndex(tmp_path, embedder_id="e1", dim=D)
    idx.replace_image("a", _vecs(rng, 2), _recs("a", 2))
    other = SliceIndex(tmp_path, embedder_id="e2", dim=D)
    assert other.stale_reason and "embedder changed" in other.stale_reason and len(other) == 0
    (tmp_path / "index.npz").write_bytes(b"garbage")
    broken = SliceIndex(tmp_path, embedder_id="e1", dim=D)
    assert broken.stale_reason and "unreadable" in broken.stale_reason and len(broken) == 0
    broken.replace_image("a", _vecs(rng, 2), _recs("a", 2))  # rebuilding works
    assert SliceIndex(tmp_path, embedder_id="e1", dim=D).stale_reason is None


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall(tmp_path, rng, kind):
    # slice embeddings are clustered (neighbouring slices, similar subjects): a Gaussian mixture
    n = 4000
    centers = _vecs(rng, 40, 32)
    V = l2_normalize(centers[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, 32)))
    idx = SliceIndex(tmp_path, embedder_id="e", dim=32, kind=kind)
    idx.replace_image("x", V, [SliceRecord("x", i, [1], "c") for i in range(n)])
    q = l2_normalize(V[:50] + 0.3 * _vecs(rng, 50, 32))
    exact = np.argsort(-(q @ V.T), axis=1)[:, :10]
    got = idx.search(q, 10)
    recall = np.mean([len({h.record.slice_index for h in got[i]} & set(exact[i])) / 10 for i in range(50)])
    assert recall >= 0.9, recall


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from ragseg.index import SliceIndex, SliceRecord
    d, tag, n_img, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    idx = SliceIndex(d, embedder_id="e", dim=64)
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    for j in range(n_img):
        v = rng.standard_normal((n, 64)).astype("float32")
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        idx.replace_image(f"{tag}{j}", v, [SliceRecord(f"{tag}{j}", i, [1], "c") for i in range(n)])
        print("saved", j, flush=True)
""")


def _spawn(tmp_path, tag, n_img, n):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "idx"), tag, str(n_img), str(n)],
                            stdout=subprocess.PIPE, text=True)


def test_two_processes_adding_concurrently_lose_nothing(tmp_path):
    procs = [_spawn(tmp_path, t, 15, 20) for t in ("p", "q")]
    for p in procs:
        assert p.wait(timeout=120) == 0
    idx = SliceIndex(tmp_path / "idx", embedder_id="e", dim=64)
    imgs = idx.images()
    assert set(imgs) == {f"{t}{j}" for t in "pq" for j in range(15)}
    assert all(v["n_slices"] == 20 for v in imgs.values()) and len(idx) == 600


def test_crash_mid_write_leaves_a_loadable_index(tmp_path):
    """SIGKILL a writer while its temp file is being written; the index always loads, consistent."""
    d = tmp_path / "idx"
    killed_mid_write = 0
    for trial in range(5):
        p = _spawn(tmp_path, f"t{trial}_", 40, 4000)  # ~1 MB more per save: writes take a while
        p.stdout.readline()  # one complete save exists
        deadline = time.time() + 20
        while time.time() < deadline and not list(d.glob(".partial-*.npz")):
            time.sleep(0.0002)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        killed_mid_write += bool(list(d.glob(".partial-*.npz")))
        idx = SliceIndex(d, embedder_id="e", dim=64)
        assert idx.stale_reason is None, idx.stale_reason
        imgs = idx.images()
        assert len(idx) == sum(v["n_slices"] for v in imgs.values()) and len(idx) > 0
        assert all(v["n_slices"] == 4000 for v in imgs.values())
    assert killed_mid_write >= 3  # the kills really landed inside writes
    SliceIndex(d, embedder_id="e", dim=64).remove_image("t0_0")  # the next writer cleans debris
    assert not list(d.glob(".partial-*.npz"))


def test_readers_never_see_a_half_written_index(tmp_path, rng):
    """Request threads read (images, records, search) while the re-indexer thread writes."""
    import threading

    idx = SliceIndex(tmp_path, embedder_id="e", dim=8)
    big = 3000  # large replacements keep each mutation busy for a while
    vecs = _vecs(rng, big, 8)
    for j in range(3):
        idx.replace_image(f"img{j}", vecs, _recs(f"img{j}", big))
    errors: list[str] = []
    stop = threading.Event()

    def writer():
        j = 0
        while not stop.is_set():
            idx.replace_image(f"img{j % 3}", vecs[: big - (j % 7)], _recs(f"img{j % 3}", big - (j % 7)))
            j += 1

    def reader():
        while not stop.is_set():
            try:
                imgs = idx.images()
                recs = idx.records()
                # each call sees one whole version: every image has one of the sizes written
                assert all(big - 6 <= v["n_slices"] <= big for v in imgs.values()) and len(imgs) == 3
                assert 3 * (big - 6) <= len(recs) <= 3 * big
                idx.search(vecs[:2], 3, label=1)
            except Exception as e:  # noqa: BLE001 - any error here is the bug
                errors.append(f"{type(e).__name__}: {e}")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a busy server does
    try:
        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(4)
        stop.set()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]


def test_selective_filter_never_asks_faiss_for_more_than_2048(tmp_path, rng, monkeypatch):
    """FAISS GPU indexes refuse k > 2048; a filter that rejects nearly every slice still works."""
    import ragseg.index as index_mod

    asked: list[int] = []
    real = index_mod.build_faiss

    class GpuLike:  # the limit a GPU index enforces, on the real CPU index
        def __init__(self, inner):
            self.inner = inner

        def search(self, q, k):
            asked.append(k)
            if k > 2048:
                raise RuntimeError(f"GPU index only supports k <= 2048 (got {k})")
            return self.inner.search(q, k)

    monkeypatch.setattr(index_mod, "build_faiss", lambda *a, **kw: GpuLike(real(*a, **kw)))
    n = 5000
    vecs = _vecs(rng, n)
    q = vecs[:3]
    # label 2 only on the 4 slices least similar to the first query: found only past the top 2048
    far = np.argsort(vecs @ q[0])[:4]
    recs = [SliceRecord("a", i, [2] if i in far else [1], "c") for i in range(n)]
    idx = SliceIndex(tmp_path, embedder_id="e", dim=D)
    idx.replace_image("a", vecs, recs)
    hits = idx.search(q, 3, label=2)
    assert max(asked) <= 2048
    for qi in range(3):
        want = sorted(far, key=lambda i: -(vecs[i] @ q[qi]))[:3]
        assert [h.record.slice_index for h in hits[qi]] == [int(i) for i in want]
        assert np.allclose([h.score for h in hits[qi]], [vecs[i] @ q[qi] for i in want], atol=1e-5)


def test_per_query_exclusion_keeps_the_images_other_slices(tmp_path, rng):
    """Intra-volume: query slice s excludes (image, s) only, not the image's other labeled slices."""
    idx = SliceIndex(tmp_path, embedder_id="e", dim=D)
    vecs = _vecs(rng, 6)
    idx.replace_image("ct", vecs, _recs("ct", 6))
    hits = idx.search(vecs[:3], 2, exclude_per_query=[[("ct", 0)], [("ct", 1)], [("ct", 2)]])
    for qi in range(3):
        got = [h.record.slice_index for h in hits[qi]]
        assert qi not in got and len(got) == 2
    assert [h.record.slice_index for h in hits[1]][0] != 1
    with pytest.raises(ValueError, match="exclude_per_query"):
        idx.search(vecs[:2], 1, exclude_per_query=[[("ct", 0)]])


def test_replace_images_gives_the_ids_of_successive_replace_image_calls(tmp_path, rng):
    batch = [(f"img{j}", _vecs(rng, 3 + j), _recs(f"img{j}", 3 + j)) for j in range(4)]
    one = SliceIndex(tmp_path / "one", embedder_id="e", dim=D)
    for b in batch:
        one.replace_image(*b)
    one.replace_image("img1", batch[1][1][:2], batch[1][2][:2])  # a re-save replaces in place
    many = SliceIndex(tmp_path / "many", embedder_id="e", dim=D)
    many.replace_images(batch + [("img1", batch[1][1][:2], batch[1][2][:2])])
    np.testing.assert_array_equal(one.ids(), many.ids())
    np.testing.assert_array_equal(one.vectors(), many.vectors())
    assert [(r.image_id, r.slice_index) for r in one.records()] == [(r.image_id, r.slice_index) for r in many.records()]


def test_snapshot_pickles_and_searches_like_the_index(tmp_path, rng):
    import pickle

    from ragseg.errors import RagsegError

    idx = SliceIndex(tmp_path, embedder_id="e", dim=D)
    for j in range(6):
        idx.replace_image(f"img{j}", _vecs(rng, 10), _recs(f"img{j}", 10, labels=(1, j % 3 + 1)))
    q = _vecs(rng, 4)
    want = idx.search(q, 5, label=2, exclude_images={"img1"})
    snap = pickle.loads(pickle.dumps(idx.snapshot()))
    got = snap.search(q, 5, label=2, exclude_images={"img1"})
    assert [[(h.record.image_id, h.record.slice_index) for h in r] for r in got] == \
        [[(h.record.image_id, h.record.slice_index) for h in r] for r in want]
    assert snap.embedder_id == "e" and len(snap) == 60 and snap.images() == idx.images()
    idx.replace_image("img0", _vecs(rng, 1), _recs("img0", 1))  # the snapshot does not change
    assert len(snap) == 60 and len(idx) == 51
    with pytest.raises(RagsegError):
        snap.replace_image("img9", _vecs(rng, 1), _recs("img9", 1))
