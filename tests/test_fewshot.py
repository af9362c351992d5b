"""Few-shot prototype decoder: fine-tuning works (SAM 2 decoder, LiteMedSAM decoder), save/load is strict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ragseg.synthetic import make_subject


def _slices(seeds, shape=(64, 64, 16)):
    """Axial slices (canonical) and label slices of synthetic subjects, slices with any organ only."""
    from ragseg.pipeline import Preprocess
    from ragseg.volume import Volume

    pre = Preprocess(modality="CT")
    sl, lb = [], []
    for s in seeds:
        sub = make_subject(s, shape=shape)
        img = Volume(sub.image, sub.affine)
        lab = Volume(sub.label, sub.affine)
        x, y = pre.slices(img), pre.label_slices(lab)
        keep = (y > 0).any((1, 2))
        sl.append(x[keep])
        lb.append(y[keep])
    return np.concatenate(sl), np.concatenate(lb)


def _heldout_dice(dec, ts_train, ts_test, labels):
    """Mean Dice on held-out slices, prototypes from every training slice with the label."""
    from ragseg.fewshot import hard_dice, predict

    out = []
    for li, _ in enumerate(labels):
        sup = [i for i in range(len(ts_train)) if ts_train.grid_masks[i, li].sum() > 0]
        has = [i for i in range(len(ts_test)) if ts_test.targets[i, li].any()]
        lg = predict(dec, {k: v[has] for k, v in ts_test.feats.items()},
                     {k: v[sup] for k, v in ts_train.feats.items()}, ts_train.grid_masks[sup, li])
        out += hard_dice(lg > 0, ts_test.targets[has, li]).tolist()
    return float(np.mean(out))


def test_finetune_sam2_decoder_lowers_loss_and_raises_heldout_dice(tmp_path):
    """SAM 2's mask decoder (random weights, 128 px) learns prototype prompts on synthetic organs."""
    from ragseg.engine import RagSam2Engine
    from ragseg.fewshot import PrototypeDecoder, Sam2Adapter, build_training_set, finetune
    from ragseg.sam2_model import build_sam2

    torch.manual_seed(0)
    eng = RagSam2Engine(build_sam2("hiera_t", image_size=128, random_weights=True, seed=3), model_id="t")
    ad = Sam2Adapter(eng)
    labels = [1, 2]
    tr_x, tr_y = _slices([1, 2])
    te_x, te_y = _slices([3])
    ts_tr = build_training_set(ad, tr_x, tr_y, labels)
    ts_te = build_training_set(ad, te_x, te_y, labels)
    assert ts_tr.feats["embed"].shape[1:] == (256, 8, 8) and ts_tr.targets.shape[-1] == 32
    # Which held-out Dice one run reaches depends on float rounding (another x86 CPU gave 0.307 where
    # this one gives 0.692 for the same seed), so the test rests on a margin over seeds. Measured here
    # over 3 model x 3 fine-tuning seeds with the decoder kept as the mean of the last 10 epochs:
    # loss ratio last/first 0.22-0.56; held-out Dice gain per run 0.01-0.54 (8 of 9 runs >= 0.26),
    # mean over the 3 fine-tuning seeds of a model 0.24-0.44 (model seed 3: 0.44, runs 0.36-0.54).
    gains = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        dec = PrototypeDecoder(ad, use_box=False)
        before = _heldout_dice(dec, ts_tr, ts_te, labels)
        # random-support episodes, 8 per step and float32, as the margins below were measured with
        res = finetune(dec, ts_tr, epochs=40, lr=1e-3, k=3, seed=seed, max_episodes=None, retrieved=0.0, batch=8,
                       precision="float32")
        after = _heldout_dice(dec, ts_tr, ts_te, labels)
        first, last = res.history[0]["loss"], min(h["loss"] for h in res.history[-3:])
        print(f"SAM 2 decoder, seed {seed}: loss {first:.3f} -> {last:.3f}; held-out Dice {before:.3f} -> {after:.3f}")
        assert last < 0.8 * first  # it learns the training episodes
        gains.append(after - before)
    assert sum(g > 0.05 for g in gains) >= 2, gains  # most runs generalise to an unseen subject
    assert np.mean(gains) > 0.15, gains  # by a margin (mean measured 0.24-0.44)

    # save -> load gives the same decoder; a decoder for another backbone is refused
    dec.exclusive = [(1, 2)]
    dec.save(tmp_path / "dec", {"labels": {"liver": 1, "spleen": 2}, "data_checksum": "x"})
    man = json.loads((tmp_path / "dec" / "manifest.json").read_text())
    assert man["backbone"] == "t" and man["use_box"] is False and man["labels"] == {"liver": 1, "spleen": 2}
    assert man["exclusive"] == [[1, 2]]
    dec2, _ = PrototypeDecoder.load(tmp_path / "dec", ad)
    assert dec2.exclusive == [(1, 2)]
    feats = {k: v[:2] for k, v in ts_te.feats.items()}
    fg, bg = torch.randn(2, 256), torch.randn(2, 256)
    with torch.no_grad():
        assert torch.equal(dec(feats, fg, bg), dec2(feats, fg, bg))
    from ragseg.errors import RagsegError

    ad.backbone_id = "another"
    with pytest.raises(RagsegError, match="trained for backbone 't'"):
        PrototypeDecoder.load(tmp_path / "dec", ad)
    (tmp_path / "dec" / "decoder.pt").write_bytes(b"corrupt")
    ad.backbone_id = "t"
    with pytest.raises(RagsegError, match="cannot load"):
        PrototypeDecoder.load(tmp_path / "dec", ad)


@pytest.mark.slow
def test_finetune_litemedsam_decoder_raises_heldout_dice(tmp_path):
    """LiteMedSAM (real weights): fine-tuning with prototype+box tokens beats the untrained decoder."""
    import os

    os.environ.setdefault("RAGSEG_CACHE_DIR", str(tmp_path / "cache"))
    from ragseg.fewshot import LiteMedSamAdapter, PrototypeDecoder, build_training_set, finetune
    from ragseg.litemedsam import LiteMedSAM

    ad = LiteMedSamAdapter(LiteMedSAM())
    labels = [1, 2, 3]
    tr_x, tr_y = _slices([1], shape=(64, 64, 12))
    te_x, te_y = _slices([2], shape=(64, 64, 12))
    ts_tr = build_training_set(ad, tr_x, tr_y, labels)
    ts_te = build_training_set(ad, te_x, te_y, labels)
    dec = PrototypeDecoder(ad)
    before = _heldout_dice(dec, ts_tr, ts_te, labels)
    res = finetune(dec, ts_tr, epochs=4, lr=1e-4, seed=0, max_episodes=24)
    after = _heldout_dice(dec, ts_tr, ts_te, labels)
    print(f"LiteMedSAM decoder: loss {res.history[0]['loss']:.3f} -> {res.history[-1]['loss']:.3f}; "
          f"held-out Dice {before:.3f} -> {after:.3f}; {np.mean([h['seconds'] for h in res.history]):.1f} s/epoch")
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert after > before
    # the served model stays frozen: no gradient reaches its encoder, prompt encoder or decoder
    assert all(p.grad is None for p in ad.lite.net.parameters())


@pytest.mark.slow
def test_cli_finetune_then_segment_with_the_decoder(tmp_path):
    """`ragseg finetune` writes a decoder folder; `ragseg segment --decoder` uses it; a wrong backbone is refused."""
    import os
    import subprocess
    import sys

    from ragseg.synthetic import make_dataset

    root = tmp_path / "ds"
    make_dataset(root, n_subjects=3, n_labeled=2, shape=(64, 64, 5), seed=2)  # few slices: each is a real encode
    env = {**os.environ, "RAGSEG_CACHE_DIR": str(tmp_path / "cache"), "RAGSEG_WEIGHTS_DIR": str(tmp_path / "w")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ragseg.cli", *args], capture_output=True, text=True, env=env,
                              timeout=900)

    r = cli("finetune", str(root), str(root / "labels" / "final"), "--out", str(tmp_path / "dec"), "--epochs", "2",
            "--modality", "CT", "--augment-copies", "0")  # copies: test_train_decoder_groups_frames_of_one_patient
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["epochs"] == 2 and res["epoch_s"] > 0 and 0 < res["best_metric"] <= 1
    man = json.loads((tmp_path / "dec" / "manifest.json").read_text())
    assert man["backbone"].startswith("litemedsam:") and man["labels"] == {"label_1": 1, "label_2": 2, "label_3": 3}
    assert len(man["data_checksum"]) == 64 and len(man["history"]) == 2 and man["slices"] > 0

    out = tmp_path / "seg.nii.gz"
    r = cli("-v", "segment", str(root / "subject_02.nii.gz"), "--supports", str(root), "--decoder", str(tmp_path / "dec"),
            "-o", str(out), "--modality", "CT", "-k", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fine-tuned decoder" in r.stderr and "backend litemedsam" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["voxels_per_label"]["1"] > 0

    # a decoder trained on another backbone (SAM 2) is refused with a clear message
    r = cli("finetune", str(root), str(root / "labels" / "final"), "--out", str(tmp_path / "dec2"), "--epochs", "1",
            "--backbone", "sam2", "--random-weights-for-testing", "--image-size", "128", "--modality", "CT",
            "--augment-copies", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("segment", str(root / "subject_02.nii.gz"), "--supports", str(root), "--decoder", str(tmp_path / "dec2"),
            "-o", str(out), "--backend", "litemedsam", "--modality", "CT")
    assert r.returncode == 2 and "was trained for backbone" in r.stderr


def test_decoder_swapped_mid_request_is_not_mixed_into_it():
    """The train task's decoder is swapped in by a background thread; a running request keeps its own."""
    from ragseg.engine import Support
    from ragseg.fewshot import LiteMedSamAdapter, PrototypeDecoder
    from ragseg.litemedsam import LiteMedSAM, LiteMedSamEngine

    lite = LiteMedSAM.random(seed=0)
    adapter = LiteMedSamAdapter(lite)
    old, new = PrototypeDecoder(adapter, use_box=False), PrototypeDecoder(adapter, use_box=False)
    eng = LiteMedSamEngine(lite, decoder=old, decode_batch=1)
    calls: list[str] = []

    def spy(name, dec):
        forward = dec.forward

        def f(*a, **kw):
            calls.append(name)
            if len(calls) == 1:
                eng.set_decoder(new)  # the newly trained decoder lands while this request runs
            return forward(*a, **kw)
        dec.forward = f

    spy("old", old)
    spy("new", new)
    rng = np.random.default_rng(0)
    q = rng.random((3, 64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    sup = Support("s0", lambda: (q[0], mask))
    eng.segment_queries(q, [[[sup]] * 3])
    assert calls == ["old"] * 3, calls  # every slice of the request by the decoder it started with
    eng.segment_queries(q[:1], [[[sup]]])
    assert calls[3:] == ["new"]  # the next request uses the new one


def test_episodes_take_supports_from_other_patients():
    """With patients named, an episode's supports come from other patients than its query's
    (as when a new patient is segmented); from the same one only when nobody else has the label."""
    from ragseg.fewshot import TrainingSet, make_episodes

    class _Adapter:
        input_size = 32

    class _Decoder:  # prompts are not what this test is about: constant ones
        use_box = False
        exclusive = False
        adapter = _Adapter()

        def prompt(self, query_emb, support_embs, support_masks, **kw):
            return torch.zeros(16), torch.zeros(16), torch.zeros(1, 4)

    n = 12
    groups = ["a"] * 3 + ["b"] * 4 + ["c"] * 5
    gm = torch.zeros(n, 2, 8, 8)
    gm[:, 0, 2:5, 2:5] = 1.0  # label 0 on every slice
    gm[[0, 1, 2], 1, 4:6, 4:6] = 1.0  # label 1 only on patient a's slices
    ts = TrainingSet({"embed": torch.randn(n, 16, 8, 8)}, gm, torch.zeros(n, 2, 32, 32, dtype=torch.bool), [1, 2],
                     groups=groups)
    eps = make_episodes(_Decoder(), ts, k=3, rng=np.random.default_rng(0))
    assert sum(e.label_index == 0 for e in eps) == n
    for e in eps:
        sup_groups = {groups[i] for i in e.supports}
        assert e.query not in e.supports
        if e.label_index == 0:
            assert groups[e.query] not in sup_groups, e
        elif e.query in (0, 1, 2):  # only patient a has label 1: its other slices
            assert sup_groups == {"a"}
    # without patients, supports of the same patient are drawn too
    ts.groups = None
    eps = make_episodes(_Decoder(), ts, k=11, rng=np.random.default_rng(0))
    e = next(e for e in eps if e.query == 1 and e.label_index == 0)
    assert {0, 2} <= set(e.supports)


def test_retrieved_episodes_draw_the_slices_most_like_the_query():
    """A retrieved-like episode's supports are the other patients' slices most like its query
    (here: the same level of the structure), as retrieval serves them; random ones are not."""
    from ragseg.fewshot import TrainingSet, make_episodes

    class _Adapter:
        input_size = 32

    class _Decoder:
        use_box = False
        exclusive = False
        adapter = _Adapter()

        def prompt(self, query_emb, support_embs, support_masks, **kw):
            return torch.zeros(16), torch.zeros(16), torch.zeros(1, 4)

    g = torch.Generator().manual_seed(0)
    n_pat, levels = 3, 6
    look = torch.randn(levels, 16, 8, 8, generator=g)  # what each level of the structure looks like
    emb = torch.cat([look + 0.1 * torch.randn(levels, 16, 8, 8, generator=g) for _ in range(n_pat)])
    level = [z for _ in range(n_pat) for z in range(levels)]
    groups = [str(p) for p in range(n_pat) for _ in range(levels)]
    n = len(level)
    gm = torch.zeros(n, 1, 8, 8)
    gm[:, 0, 2:5, 2:5] = 1.0
    ts = TrainingSet({"embed": emb}, gm, torch.zeros(n, 1, 32, 32, dtype=torch.bool), [1], groups=groups)
    assert ts.similarity().shape == (n, n)

    def same_level(eps):
        return np.mean([level[s] == level[e.query] for e in eps for s in e.supports])

    like = make_episodes(_Decoder(), ts, k=1, rng=np.random.default_rng(0), retrieved=1.0, retrieved_pool=2)
    assert len(like) == n
    for e in like:
        assert groups[e.supports[0]] != groups[e.query]
    assert same_level(like) == 1.0
    rand = [e for s in range(5) for e in make_episodes(_Decoder(), ts, k=1, rng=np.random.default_rng(s))]
    assert same_level(rand) < 0.5
    half = [e for s in range(5) for e in make_episodes(_Decoder(), ts, k=1, rng=np.random.default_rng(s),
                                                         retrieved=0.5, retrieved_pool=2)]
    assert same_level(rand) + 0.2 < same_level(half) < 0.95


def test_episodes_prompt_with_the_supports_prototypes_and_the_unit_query():
    """make_episodes computes prototypes from per-slice sums and normalizes each query once; the
    decoder must get what :func:`masked_prototypes` and ``F.normalize`` give for that episode."""
    from ragseg.fewshot import TrainingSet, make_episodes
    from ragseg.prototypes import masked_prototypes

    class _Adapter:
        input_size = 32

    seen = []

    class _Decoder:
        use_box = True
        exclusive = False
        adapter = _Adapter()

        def prompt(self, query_emb, support_embs, support_masks, protos=None, normalized=False, **kw):
            seen.append((query_emb, normalized, support_masks))
            return protos[0], protos[1], [torch.zeros(4)]

    g = torch.Generator().manual_seed(0)
    n = 10
    emb = 3.0 * torch.randn(n, 16, 8, 8, generator=g)
    gm = (torch.rand(n, 2, 8, 8, generator=g) > 0.6).float()
    gm[3, 1] = 0.0  # label 2 absent on one slice: never its support
    ts = TrainingSet({"embed": emb}, gm, torch.zeros(n, 2, 32, 32, dtype=torch.bool), [1, 2],
                     groups=[f"p{i // 2}" for i in range(n)])
    eps = make_episodes(_Decoder(), ts, k=3, rng=np.random.default_rng(0))
    assert len(eps) == len(seen) == 2 * n  # every (slice, label); slice 3 as a query of an absent label
    for e, (q, normalized, masks) in zip(eps, seen):
        assert normalized
        torch.testing.assert_close(q, torch.nn.functional.normalize(emb[e.query], dim=0))
        assert torch.equal(masks, gm[e.supports, e.label_index])
        fg, bg = masked_prototypes(emb[e.supports], gm[e.supports, e.label_index])
        torch.testing.assert_close(e.fg, fg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e.bg, bg, rtol=1e-5, atol=1e-5)
        assert 3 not in e.supports or e.label_index == 0


def test_train_decoder_groups_frames_of_one_patient(tmp_path):
    """Two frames of one heart (``patient001_frame01`` / ``_frame12``) are one patient when the
    train task builds its episodes, so a frame is never the support of its twin; the manifest
    keeps the patient count, the retrieved-episode share and the augmented copies."""
    from ragseg.fewshot import LiteMedSamAdapter
    from ragseg.litemedsam import LiteMedSAM
    from ragseg.pipeline import Preprocess, discover_pairs, patient_of
    from ragseg.synthetic import make_subject, write_subject
    from ragseg.training import train_decoder

    assert patient_of("patient001_frame12") == "patient001" and patient_of("hippocampus_003") == "hippocampus_003"
    for i, name in enumerate(["patient001_frame01", "patient001_frame12", "patient002_frame01", "patient002_frame09"]):
        s = make_subject(40 + i, shape=(48, 48, 3))
        write_subject(s, tmp_path / f"{name}.nii.gz", tmp_path / "labels" / f"{name}.nii.gz")
    items = discover_pairs(tmp_path, tmp_path / "labels")
    res = train_decoder(items, LiteMedSamAdapter(LiteMedSAM.random(seed=0)), Preprocess(modality="CT"),
                        tmp_path / "dec", labels=[1], epochs=1, max_episodes=4, retrieved=1.0, augment=1)
    man = json.loads((tmp_path / "dec" / "manifest.json").read_text())
    assert man["patients"] == 2 and man["retrieved_episodes"] == 1.0 and man["slices"] > 4
    # one augmented copy of every labeled slice was encoded with it (and kept its patient)
    assert man["augmented_copies"] == 1 and man["training_slices"] == 2 * man["slices"]
    assert res.history and res.history[0]["episodes"] == 4


def _lookalike_pool(n_patients: int = 3, per_patient: int = 2, seed: int = 0, gap: int = 8):
    """Embeddings [N, 256, 64, 64] of slices with two structures that look alike (one shared
    appearance plus a small label-specific part) and lie ``gap`` cells apart: a small A left of a
    large B, placed differently in every patient (as two ventricles' blood pools across hearts)."""
    from ragseg.fewshot import TrainingSet

    g = torch.Generator().manual_seed(seed)
    u, f, a, b = torch.nn.functional.normalize(torch.randn(4, 256, generator=g), dim=1)
    n = n_patients * per_patient
    emb = u[None, :, None, None].repeat(n, 1, 64, 64).clone()
    gm = torch.zeros(n, 2, 64, 64)
    for i in range(n):
        r, c = 16 + 4 * (i % 5), 8 + 3 * (i % 4)
        gm[i, 0, r:r + 6, c:c + 6] = 1  # A: 6 x 6 cells
        gm[i, 1, r - 4:r + 12, c + 6 + gap:c + 22 + gap] = 1  # B: 16 x 16 cells, to the right
    emb += 0.02 * torch.randn(emb.shape, generator=g)
    for li, part in ((0, a), (1, b)):
        m = gm[:, li] > 0
        emb.permute(0, 2, 3, 1)[m] += (f + 0.5 * part) - u
    targets = torch.nn.functional.interpolate(gm, scale_factor=4, mode="nearest") > 0.5
    groups = [f"p{i // per_patient}" for i in range(n)]
    return TrainingSet({"embed": emb}, gm, targets, [1, 2], groups=groups)


def test_exclusive_regions_for_structures_that_look_alike_and_lie_apart():
    """Without exclusive regions the small structure's box lands on its larger look-alike; the two
    lie apart in every labeled slice, so fine-tuning makes them compete. Touching structures (one
    organ's parts) keep their plain regions."""
    from ragseg.fewshot import (
        LiteMedSamAdapter,
        PrototypeDecoder,
        choose_exclusive,
        competing_pairs,
        make_episodes,
    )
    from ragseg.litemedsam import LiteMedSAM
    from ragseg.prototypes import exclusive_cells

    ts = _lookalike_pool()
    dec = PrototypeDecoder(LiteMedSamAdapter(LiteMedSAM.random(seed=0)), location_prior=None)
    assert dec.exclusive is None  # decided on the pool by finetune
    assert choose_exclusive(ts) == [(1, 2)]
    assert choose_exclusive(_lookalike_pool(gap=0)) == []  # B right next to A: they touch
    assert choose_exclusive(_one_label(ts)) == []
    # the mechanism: A's box is on A itself only with exclusive regions (every pair, or the listed one)
    for ex, on_a in ((False, False), (True, True), ([(1, 2)], True), ([(1, 3)], False)):
        dec.exclusive = ex
        eps = [e for e in make_episodes(dec, ts, 2, np.random.default_rng(0)) if e.label_index == 0]
        x0 = np.array([float(e.box[0]) / 4 for e in eps])  # grid column of the box's left edge
        a_col = np.array([int(torch.nonzero(ts.grid_masks[e.query, 0].any(0))[0]) for e in eps])
        assert (np.abs(x0 - a_col) <= 1).all() == on_a, (ex, x0, a_col)
    # exclusive episodes sum per-slice masked sums: the same prototypes as from the supports themselves
    from ragseg.prototypes import masked_prototypes

    dec.exclusive = [(1, 2)]
    for e in make_episodes(dec, ts, 2, np.random.default_rng(1)):
        fg, bg = masked_prototypes(ts.feats["embed"][e.supports], ts.grid_masks[e.supports, e.label_index])
        assert torch.allclose(e.fg, fg, atol=1e-5) and torch.allclose(e.bg, bg, atol=1e-5)
    # each cell goes to the label whose prototype it resembles most; one label: no competition
    q = ts.feats["embed"][0]
    fgs = {0: q[:, ts.grid_masks[0, 0] > 0].mean(1), 1: q[:, ts.grid_masks[0, 1] > 0].mean(1)}
    own = exclusive_cells(q, fgs)
    assert own[0][ts.grid_masks[0, 0].numpy() > 0].all() and own[1][ts.grid_masks[0, 1].numpy() > 0].all()
    assert not (own[0] & own[1]).any() and exclusive_cells(q, {0: fgs[0]}) == {}
    # only listed pairs compete; a label without a rival is not restricted
    fgs[2] = fgs[1]
    own = exclusive_cells(q, fgs, {frozenset((0, 1))})
    assert set(own) == {0, 1} and not (own[0] & own[1]).any()
    assert competing_pairs([(1, 3)], [1, 2, 3]) == {frozenset((0, 2))}
    assert competing_pairs(True, [5, 6, 7]) == {frozenset(p) for p in ((0, 1), (0, 2), (1, 2))}
    assert competing_pairs(False, [1, 2]) == set() == competing_pairs([(1, 2)], [1, 3])


def test_apart_pairs_from_label_layout():
    """Pairs touching in at most the given fraction of the slices that carry both lie apart."""
    from ragseg.prototypes import apart_pairs

    lab = np.zeros((10, 20, 20), np.int64)
    lab[:, 2:6, 2:6] = 1
    lab[:, 2:6, 10:14] = 3  # 1 and 3: 4 pixels apart
    lab[:5, 6:9, 2:14] = 2  # 2 borders both in half the slices ...
    lab[5:, 12:15, 2:14] = 2  # ... and lies apart from them in the other half
    assert apart_pairs(lab, [1, 2, 3]) == [(1, 3)]
    assert apart_pairs(lab, [1, 2, 3], fraction=0.5) == [(1, 2), (1, 3), (2, 3)]
    lab[0, 2:6, 6:10] = 1  # 1 reaches 3 in one slice in ten: still apart at 0.1, not at 0.0
    assert apart_pairs(lab, [1, 2, 3]) == [(1, 3)] and apart_pairs(lab, [1, 2, 3], fraction=0.0) == []
    assert apart_pairs(lab, [1, 4]) == []  # never together: nothing to say


def _one_label(ts):
    from ragseg.fewshot import TrainingSet

    return TrainingSet(ts.feats, ts.grid_masks[:, :1], ts.targets[:, :1], ts.labels[:1], groups=ts.groups)


def test_engine_uses_exclusive_regions_only_with_a_decoder_trained_on_them(monkeypatch):
    """The engine gives a fine-tuned decoder the boxes it was trained with: exclusive regions when its
    manifest says so (two labels with identical supports: the first takes every cell, the second gets
    no box), for every pair or for the listed label pairs; the plain coarse regions otherwise."""
    from ragseg.engine import Support
    from ragseg.fewshot import LiteMedSamAdapter, PrototypeDecoder
    from ragseg.litemedsam import LiteMedSAM, LiteMedSamEngine

    lite = LiteMedSAM.random(seed=0)
    adapter = LiteMedSamAdapter(lite)
    img = np.full((64, 64), 0.1, np.float32)
    img[20:44, 16:40] = 0.9
    mask = np.zeros((64, 64), bool)
    mask[20:44, 16:40] = True
    sups = [[[Support("a|1", lambda: (img, mask))]], [[Support("a|2", lambda: (img, mask))]]]
    for exclusive, items, labels in ((False, 2, None), (True, 1, None), ([(1, 2)], 1, [1, 2]), ([(1, 3)], 2, [1, 2]),
                                     ([(1, 2)], 2, None)):  # listed pairs need the channels' label values
        dec = PrototypeDecoder(adapter, location_prior=None, exclusive=exclusive)
        seen: list[int] = []
        forward = dec.forward

        def f(feats, fg, bg, boxes=None, forward=forward, seen=seen):
            seen.append(len(fg))
            return forward(feats, fg, bg, boxes)
        monkeypatch.setattr(dec, "forward", f)
        LiteMedSamEngine(lite, decoder=dec, location_prior=None).segment_queries(img[None], sups, labels=labels)
        assert sum(seen) == items, (exclusive, seen)


def test_shift_batch_moves_features_targets_and_boxes_together():
    """A structure at one place in the features, targets and box is at the same new place in all
    three after a shift, whatever each one's resolution (SAM 2's high-res maps are 2x and 4x)."""
    from ragseg.fewshot import shift_batch

    grid, size = 8, 128  # embedding cells, box frame: 16 px per cell
    emb = torch.zeros(2, 3, grid, grid)
    hr = torch.zeros(2, 1, 4 * grid, 4 * grid)
    tgt = torch.zeros(2, 2 * grid, 2 * grid, dtype=torch.bool)  # decoder output: 2 px per cell
    emb[:, :, 2:4, 1:3] = 1.0
    hr[:, :, 8:16, 4:12] = 1.0
    tgt[:, 4:8, 2:6] = True
    boxes = torch.tensor([[16.0, 32.0, 47.0, 63.0]] * 2)  # x0, y0, x1, y1 of cells x 1-2, y 2-3
    f, t, b = shift_batch({"embed": emb, "high_res_0": hr}, tgt, boxes, dy=3, dx=-1, grid=grid, input_size=size)
    assert torch.equal(torch.nonzero(f["embed"][0, 0]).min(0).values, torch.tensor([5, 0]))
    assert torch.equal(torch.nonzero(f["high_res_0"][0, 0]).min(0).values, torch.tensor([20, 0]))
    assert torch.equal(torch.nonzero(t[0]).min(0).values, torch.tensor([10, 0]))
    assert t.sum() == tgt.sum() and f["embed"].sum() == emb.sum()
    assert torch.equal(b, torch.tensor([[0.0, 80.0, 31.0, 111.0]] * 2))
    same = shift_batch({"embed": emb}, tgt, boxes, 0, 0, grid=grid, input_size=size)
    assert same[0]["embed"] is emb and same[1] is tgt and same[2] is boxes
    # past the border, maps wrap around and boxes stay inside the frame
    _, _, b = shift_batch({"embed": emb}, tgt, boxes, dy=-3, dx=0, grid=grid, input_size=size)
    assert float(b[0, 1]) == 0.0 and float(b[0, 3]) == 15.0


def test_finetune_keeps_the_mean_of_the_last_epochs_and_trains_on_shifted_batches():
    """The decoder kept is the mean of the last ``average_last`` epoch-end states (or, with 0, the
    best epoch's); ``shift`` changes what the decoder is trained on (0 reproduces the unshifted run)."""
    import copy

    from ragseg.engine import RagSam2Engine
    from ragseg.fewshot import PrototypeDecoder, Sam2Adapter, build_training_set, finetune
    from ragseg.sam2_model import build_sam2

    eng = RagSam2Engine(build_sam2("hiera_t", image_size=128, random_weights=True, seed=3), model_id="t")
    ad = Sam2Adapter(eng)
    x, y = _slices([1])
    ts = build_training_set(ad, x, y, [1, 2])

    def run(**kw):
        torch.manual_seed(0)
        dec = PrototypeDecoder(ad, use_box=True, location_prior=None)
        seen = []
        res = finetune(dec, ts, epochs=kw.pop("epochs", 6), lr=1e-3, seed=0, max_episodes=8,
                       on_epoch=lambda ep, st: seen.append(copy.deepcopy(dec.state_dict())), **kw)
        return dec.state_dict(), seen, res

    kept, seen, res = run(average_last=3, shift=0)
    assert res.averaged == 3
    for k, v in kept.items():
        if v.is_floating_point():
            assert torch.allclose(v, torch.stack([s[k] for s in seen[-3:]]).mean(0), atol=1e-6), k
    moved = [k for k in kept if kept[k].is_floating_point() and not torch.equal(kept[k], seen[-1][k])]
    assert moved  # an average, not the last state
    # a run shorter than twice ``average_last`` averages its second half only
    kept_h, seen_h, res_h = run(average_last=10, shift=0, epochs=4)
    assert res_h.averaged == 2
    assert all(torch.allclose(kept_h[k], torch.stack([s[k] for s in seen_h[-2:]]).mean(0), atol=1e-6)
               for k in kept_h if kept_h[k].is_floating_point())
    kept0, seen0, res0 = run(average_last=0, shift=0)
    assert res0.averaged == 0
    assert all(torch.equal(kept0[k], seen0[res0.best_epoch - 1][k]) for k in kept0)
    # the same seed with shifts trains on other batches, so it ends elsewhere
    kept_s, _, _ = run(average_last=0, shift=2)
    assert any(not torch.equal(kept_s[k], kept0[k]) for k in kept0 if kept0[k].is_floating_point())


def test_region_cap_keeps_the_most_foreground_like_cells():
    """The size cap: a coarse region keeps at most ``factor`` x the supports' mean structure area,
    choosing the cells most like the foreground; without it every foreground-like cell counts."""
    from ragseg.prototypes import coarse_regions, region_cell_cap

    g = 16
    fg, bg = torch.zeros(4), torch.zeros(4)
    fg[0], bg[1] = 1.0, 1.0
    emb = torch.zeros(4, g, g)
    emb[1] = 1.0  # background everywhere ...
    emb[0, 2:14, 2:14] = 1.5  # ... a wide foreground-like block (144 cells) ...
    emb[0, 6:10, 6:10] = 3.0  # ... whose 16-cell centre is far more foreground-like
    masks = torch.zeros(2, g, g)
    masks[0, :4, :4] = 1.0  # 16 cells
    masks[1, :2, :4] = 1.0  # 8 cells: mean 12
    assert region_cell_cap(masks, 1.5) == 18 and region_cell_cap(masks, None) is None
    assert region_cell_cap(masks, 0) is None
    wide = coarse_regions(emb, fg, bg)
    assert wide[0].sum() == 144
    capped = coarse_regions(emb, fg, bg, max_cells=region_cell_cap(masks, 1.0))  # 12 of the 16 tied: ties kept
    assert capped[0].sum() == 16 and capped[0][6:10, 6:10].all()


def test_decoder_keeps_its_area_cap_and_the_engine_serves_it(tmp_path, monkeypatch):
    """The cap a decoder was trained with is saved, loaded (None for decoders saved before the cap
    existed) and used by the engine instead of the engine's own."""
    from ragseg import prototypes
    from ragseg.engine import Support
    from ragseg.fewshot import LiteMedSamAdapter, PrototypeDecoder
    from ragseg.litemedsam import LiteMedSAM, LiteMedSamEngine

    lite = LiteMedSAM.random(seed=0)
    adapter = LiteMedSamAdapter(lite)
    PrototypeDecoder(adapter, area_cap=2.5).save(tmp_path / "d", {"labels": [1]})
    dec, man = PrototypeDecoder.load(tmp_path / "d", adapter)
    assert man["area_cap"] == 2.5 and dec.area_cap == 2.5
    man.pop("area_cap")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(man))
    assert PrototypeDecoder.load(tmp_path / "d", adapter)[0].area_cap is None

    seen: list = []
    real = prototypes.coarse_regions

    def spy(*a, max_cells=None, **kw):
        seen.append(max_cells)
        return real(*a, max_cells=max_cells, **kw)
    monkeypatch.setattr(prototypes, "coarse_regions", spy)
    img = np.full((64, 64), 0.1, np.float32)
    img[20:44, 16:40] = 0.9
    mask = np.zeros((64, 64), bool)
    mask[20:44, 16:40] = True  # 576 px = 576 cells of the 64-cell grid on a 64 px slice
    sups = [[[Support("a|1", lambda: (img, mask))]]]
    LiteMedSamEngine(lite, location_prior=None, area_cap=1.0).segment_queries(img[None], sups)
    LiteMedSamEngine(lite, decoder=dec, location_prior=None, area_cap=1.0).segment_queries(img[None], sups)
    LiteMedSamEngine(lite, decoder=PrototypeDecoder(adapter, area_cap=None), location_prior=None,
                     area_cap=1.0).segment_queries(img[None], sups)
    assert seen == [576, 1440, None], seen


def test_area_cap_option_parsing():
    from ragseg.label_app.config import AppConfig, ConfigError
    from ragseg.prototypes import parse_area_cap

    assert parse_area_cap("none") is None and parse_area_cap("0") is None and parse_area_cap("1.5") == 1.5
    assert AppConfig.from_conf({"area_cap": "2"}).area_cap == 2.0
    assert AppConfig.from_conf({}).area_cap is None
    with pytest.raises(ConfigError, match="area_cap"):
        AppConfig.from_conf({"area_cap": "-1"})
    with pytest.raises(ConfigError, match="area_cap"):
        AppConfig.from_conf({"area_cap": "big"})


def test_image_branch_starts_as_the_plain_decoder_trains_and_reads_the_served_query(tmp_path, monkeypatch):
    """The image branch adds nothing until trained, is trained by fine-tuning, is saved and loaded
    with its decoder (decoders saved before it load without one), and the engine gives it the
    query slice being segmented."""
    from ragseg.engine import Support
    from ragseg.errors import RagsegError
    from ragseg.fewshot import (
        IMAGE_KEY,
        ImageBranch,
        LiteMedSamAdapter,
        PrototypeDecoder,
        build_training_set,
        decoder_image,
        finetune,
    )
    from ragseg.litemedsam import LiteMedSAM, LiteMedSamEngine

    lite = LiteMedSAM.random(seed=0)
    ad = LiteMedSamAdapter(lite)
    x, y = _slices([1], shape=(64, 64, 6))
    ts = build_training_set(ad, x, y, [1, 2, 3])
    assert ts.feats[IMAGE_KEY].shape == (len(x), 1, 256, 256)
    assert torch.equal(ts.feats[IMAGE_KEY], decoder_image(x, 64))

    torch.manual_seed(0)
    plain = PrototypeDecoder(ad)
    dec = PrototypeDecoder(ad, image_branch=True)
    assert isinstance(dec.image_branch, ImageBranch) and plain.image_branch is None
    missing = dec.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("image_branch.") for k in missing)
    feats = {k: v[:2] for k, v in ts.feats.items()}
    fg, bg = torch.randn(2, 256), torch.randn(2, 256)
    box = torch.tensor([[40.0, 40, 200, 200]] * 2)
    with torch.no_grad():
        assert torch.equal(dec(feats, fg, bg, box), plain(feats, fg, bg, box))  # untrained: no change
        with pytest.raises(RagsegError, match="image branch"):
            dec({"embed": feats["embed"]}, fg, bg, box)

    finetune(dec, ts, epochs=2, max_episodes=8, seed=0, precision="float32")
    assert dec.image_branch.net[-1].weight.abs().sum() > 0  # fine-tuning reached the branch
    with torch.no_grad():  # and the decoder now reads the slice: another image, other logits
        other = {**feats, IMAGE_KEY: feats[IMAGE_KEY].flip(-1)}
        assert not torch.allclose(dec(feats, fg, bg, box), dec(other, fg, bg, box))

    dec.save(tmp_path / "d", {"labels": [1, 2, 3]})
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert man["image_branch"] is True
    dec2, _ = PrototypeDecoder.load(tmp_path / "d", ad)
    with torch.no_grad():
        assert torch.equal(dec(feats, fg, bg, box), dec2(feats, fg, bg, box))
    plain.save(tmp_path / "p", {"labels": [1, 2, 3]})
    man = json.loads((tmp_path / "p" / "manifest.json").read_text())
    man.pop("image_branch")  # as written before the branch existed
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(man))
    assert PrototypeDecoder.load(tmp_path / "p", ad)[0].image_branch is None

    seen: list[torch.Tensor] = []
    forward = dec2.image_branch.forward
    monkeypatch.setattr(dec2.image_branch, "forward", lambda im: seen.append(im) or forward(im))
    q = x[:2]
    sups = [[[Support("s", lambda: (x[3], y[3] == 1))]] * 2]
    LiteMedSamEngine(lite, decoder=dec2, location_prior=None).segment_queries(q, sups)
    assert len(seen) == 2  # one decode batch per query slice
    for i, im in enumerate(seen):
        assert torch.equal(im[0], decoder_image(q[i:i + 1], 64)[0])  # the query's own slice


def test_image_branch_is_chosen_for_pools_of_small_slices():
    """auto: a branch for pools whose median slice is at most 64 px on its long side (hippocampus
    crops, ~35 x 51 px), none for slices near the model's size (ACDC, 154-256 px); the bound
    scales with the model's input; the train task and the CLI spell the choice their ways."""
    from ragseg.errors import RagsegError
    from ragseg.fewshot import resolve_image_branch
    from ragseg.label_app.train import _branch

    hippo = [np.zeros((35, 51))] * 5 + [np.zeros((40, 70))] * 2
    acdc = [np.zeros((216, 256))] * 3 + [np.zeros((48, 48))]
    assert resolve_image_branch("auto", hippo, 256) is True
    assert resolve_image_branch("auto", acdc, 256) is False
    assert resolve_image_branch("auto", acdc, 1024) is True  # SAM 2's 1024 px input: 256 px is a 4x blow-up
    assert resolve_image_branch("auto", [], 256) is False
    assert resolve_image_branch("on", acdc, 256) is True and resolve_image_branch(False, hippo, 256) is False
    with pytest.raises(RagsegError, match="auto, on or off"):
        resolve_image_branch("sometimes", hippo, 256)
    assert _branch(True) is True and _branch("false") is False and _branch("auto") == "auto"
    with pytest.raises(ValueError, match="auto, true or false"):
        _branch("maybe")


def test_decoders_averaged_are_the_seeded_members_served_as_their_mean(tmp_path, monkeypatch):
    """`decoders=N`: member j is exactly the single training with seed + 100 j; the ensemble's logits
    are the members' mean; it is saved and loaded strictly as one decoder, and the engine decodes
    every item with every member."""
    from ragseg import defaults
    from ragseg.engine import Support
    from ragseg.errors import RagsegError
    from ragseg.fewshot import IMAGE_KEY, DecoderEnsemble, LiteMedSamAdapter, PrototypeDecoder, decoder_image
    from ragseg.litemedsam import LiteMedSAM, LiteMedSamEngine
    from ragseg.pipeline import Preprocess, discover_pairs
    from ragseg.synthetic import write_subject
    from ragseg.training import train_decoder

    for i in range(3):
        write_subject(make_subject(50 + i, shape=(48, 48, 3)), tmp_path / f"p{i}.nii.gz", tmp_path / "labels" / f"p{i}.nii.gz")
    items = discover_pairs(tmp_path, tmp_path / "labels")
    lite = LiteMedSAM.random(seed=0)
    ad = LiteMedSamAdapter(lite)
    kw = dict(labels=[1, 2], epochs=1, max_episodes=4, augment=1, precision="float32")
    res = train_decoder(items, ad, Preprocess(modality="CT"), tmp_path / "ens", members=2, seed=3, **kw)
    ens = res.decoder
    assert isinstance(ens, DecoderEnsemble) and len(ens.members) == 2 and len(res.members) == 2
    step = defaults.FINETUNE_MEMBER_SEED_STEP
    for j, m in enumerate(ens.members):  # each member is the plain training with its seed
        single = train_decoder(items, ad, Preprocess(modality="CT"), tmp_path / f"s{j}", seed=3 + j * step, **kw).decoder
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), single.state_dict().values()))
    a, b = (list(m.state_dict().values()) for m in ens.members)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))  # other seeds, other decoders

    x, y = _slices([7], shape=(48, 48, 6))
    assert ens.image_branch is not None  # 48 px slices: auto gives the members a branch
    feats = {"embed": lite.embeddings(x[:2]), IMAGE_KEY: decoder_image(x[:2], 64)}
    fg, bg = torch.randn(2, 256), torch.randn(2, 256)
    box = torch.tensor([[40.0, 40, 200, 200]] * 2)
    with torch.no_grad():
        want = (ens.members[0](feats, fg, bg, box) + ens.members[1](feats, fg, bg, box)) / 2
        assert torch.allclose(ens(feats, fg, bg, box), want, atol=1e-6)
    man = json.loads((tmp_path / "ens" / "manifest.json").read_text())
    assert man["members"] == 2 and len(man["member_metrics"]) == 2
    loaded, _ = PrototypeDecoder.load(tmp_path / "ens", ad)
    assert isinstance(loaded, DecoderEnsemble)
    with torch.no_grad():
        assert torch.equal(loaded(feats, fg, bg, box), ens(feats, fg, bg, box))
    man["members"] = 3  # a manifest that does not match its weights: refused, not half-loaded
    (tmp_path / "ens" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(RagsegError, match="cannot load"):
        PrototypeDecoder.load(tmp_path / "ens", ad)

    calls = []
    for m in loaded.members:
        fw = m.forward
        monkeypatch.setattr(m, "forward", lambda *a, _fw=fw, **k: calls.append(1) or _fw(*a, **k))
    sups = [[[Support("s", lambda: (x[-1], y[-1] == 1))]] * 2]
    LiteMedSamEngine(lite, decoder=loaded, location_prior=None).segment_queries(x[:2], sups)
    assert len(calls) == 2 * 2  # every query's decode batch went through both members


def _displaced(shape_rc=(20, 16), size=(24, 24), move=(0, 0)):
    """A 64 px slice with a bright square (moved by ``move`` px) and its mask."""
    img = np.full((64, 64), 0.1, np.float32)
    mask = np.zeros((64, 64), bool)
    r, c = shape_rc[0] + move[0], shape_rc[1] + move[1]
    img[r:r + size[0], c:c + size[1]] = 0.9
    mask[r:r + size[0], c:c + size[1]] = True
    return img, mask


def test_shift_cells_and_the_prior_that_also_allows_the_moved_structure():
    from ragseg.prototypes import location_prior, shift_cells

    m = np.zeros((8, 8), bool)
    m[1:3, 2:4] = True
    assert np.array_equal(np.argwhere(shift_cells(m, 3, -1)), np.argwhere(m) + [3, -1])
    assert np.array_equal(np.argwhere(shift_cells(m, -1, 4)), np.argwhere(m) + [-1, 4])
    assert shift_cells(m, 0, 5).sum() == 2  # one of its two columns leaves the grid
    assert not shift_cells(m, 9, 0).any()
    masks = torch.from_numpy(m[None].astype(np.float32))
    assert np.array_equal(location_prior(masks, 0, (4, 0)), m | shift_cells(m, 4, 0))  # both places
    assert np.array_equal(location_prior(masks, 1), location_prior(masks, 1, (0, 0)))
    assert location_prior(masks, None, (4, 0)) is None


def test_anatomy_shift_finds_where_the_query_structure_lies():
    """The supports' structure cells are moved onto the query's foreground-like cells: the known
    displacement within the radius, (0, 0) when the structure is in place or nothing is
    foreground-like, and every label moves together."""
    from ragseg.prototypes import anatomy_shift

    g, c = 32, 8
    rng = np.random.default_rng(0)
    fg, bg = torch.from_numpy(rng.normal(size=c)).float(), torch.from_numpy(rng.normal(size=c)).float()
    sup = torch.zeros(2, g, g)
    sup[:, 8:16, 10:18] = 1.0

    def query(dy, dx):
        q = bg[:, None, None].repeat(1, g, g).clone()
        q[:, 8 + dy:16 + dy, 10 + dx:18 + dx] = fg[:, None, None]
        return q + 0.05 * torch.randn(c, g, g, generator=torch.Generator().manual_seed(1))

    for move in ((5, -3), (0, 0), (-6, 6)):
        assert anatomy_shift(query(*move), {0: (fg, bg, sup)}, radius=8) == move
    assert anatomy_shift(query(5, -3), {0: (fg, bg, sup)}, radius=0) == (0, 0)
    flat = bg[:, None, None].repeat(1, g, g)
    assert anatomy_shift(flat, {0: (fg, bg, sup)}, radius=8) == (0, 0)  # nothing foreground-like: stay
    # a second label whose cells it may not use stays out of the target; one move for both labels
    allowed = {1: np.zeros((g, g), bool)}
    assert anatomy_shift(query(4, 2), {0: (fg, bg, sup), 1: (fg, bg, sup)}, allowed, radius=8) == (4, 2)


def test_prior_shift_is_chosen_on_the_pool_and_served_by_the_engine(tmp_path, monkeypatch):
    """Patients whose structure sits at different places in the frame: the pool's episodes find it
    better with the prior moved, so the decoder gets the move; patients alike keep the supports'
    place. The choice is saved and loaded, and the engine then boxes a displaced query structure
    whole, where the supports' place alone clips it."""
    from ragseg.engine import Support
    from ragseg.errors import RagsegError
    from ragseg.fewshot import LiteMedSamAdapter, PrototypeDecoder, build_training_set, choose_prior_shift
    from ragseg.litemedsam import LiteMedSAM, LiteMedSamEngine

    lite = LiteMedSAM.random(seed=0)
    adapter = LiteMedSamAdapter(lite)
    moves = {"a": (0, 0), "b": (6, 6), "c": (-6, 6), "d": (6, -6)}
    for spread, expect in ((True, 8), (False, 0)):
        sl, lb, groups = [], [], []
        for p, mv in moves.items():
            for j in range(2):
                img, mask = _displaced(move=mv if spread else (0, 0), size=(22 + 2 * j, 24))
                sl.append(img)
                lb.append(mask.astype(np.int64))
                groups.append(p)
        ts = build_training_set(adapter, np.stack(sl), np.stack(lb), [1], groups=groups)
        dec = PrototypeDecoder(adapter, prior_shift=None)
        chosen, iou = choose_prior_shift(dec, ts, k=2, radius=8)
        assert chosen == expect, (spread, iou)
        if spread:
            assert iou["box_iou_moved"] > iou["box_iou_in_place"] + 0.01, iou

    dec = PrototypeDecoder(adapter, prior_shift=8)
    dec.save(tmp_path / "d", {"labels": [1]})
    assert PrototypeDecoder.load(tmp_path / "d", adapter)[0].prior_shift == 8
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    man.pop("prior_shift")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(man))
    assert PrototypeDecoder.load(tmp_path / "d", adapter)[0].prior_shift == 0  # saved before the move existed
    man["prior_shift"] = -3
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(RagsegError, match="prior_shift"):
        PrototypeDecoder.load(tmp_path / "d", adapter)

    s_img, s_mask = _displaced()
    q_img, q_mask = _displaced(move=(7, 7))
    sups = [[[Support("a|1", lambda: (s_img, s_mask))]]]
    boxes = {}
    for shift in (0, 8):
        dec = PrototypeDecoder(adapter, prior_shift=shift)
        forward = dec.forward

        def f(feats, fg, bg, b=None, forward=forward, shift=shift):
            boxes[shift] = b.clone()
            return forward(feats, fg, bg, b)
        monkeypatch.setattr(dec, "forward", f)
        LiteMedSamEngine(lite, decoder=dec, location_prior=2).segment_queries(q_img[None], sups)
    # 64 px slice -> 256 px model frame: 4 px per pixel; the query square spans pixels 27..50
    whole = torch.tensor([23 * 4, 27 * 4, 47 * 4 - 1, 51 * 4 - 1], dtype=torch.float32)  # x0 y0 x1 y1
    assert (boxes[0][0, 2:] < whole[2:] - 8).all(), boxes[0]  # clipped to the supports' place
    b = boxes[8][0]
    assert (b[:2] <= whole[:2] + 4).all() and (b[2:] >= whole[2:] - 4).all(), b  # the whole moved square...
    assert float((b[2:] - b[:2] + 1).prod()) < 2 * float((whole[2:] - whole[:2] + 1).prod()), b  # ...not the frame
