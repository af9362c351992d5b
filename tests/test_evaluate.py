"""The evaluation harness on a 2-subject synthetic set (LiteMedSAM with its real weights)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from ragseg.errors import RagsegError
from ragseg.synthetic import make_dataset


@pytest.mark.slow
def test_harness_outputs_and_dice_match_numpy(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, n_subjects=2, n_labeled=2, shape=(64, 64, 6), seed=3)  # few slices: each is a real encode
    out = tmp_path / "eval"
    env = {**os.environ, "RAGSEG_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ragseg.cli", "evaluate", str(root), str(root / "labels" / "final"),
           "--classes", "liver=1,spleen=2", "--mode", "loso", "--n-support", "1", "--k", "1,2",
           "--methods", "retrieved,random,finetuned,gt-box,unet,dynunet", "--finetune-epochs", "1",
           "--baseline-iters", "2", "--baseline-size", "64",
           "--modality", "CT", "--save-predictions", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # long stages say what they are doing: a progress bar in slices/s while encoding
    assert "encoding slices: 100%" in r.stderr and "slice/s" in r.stderr and "loading volumes" in r.stderr

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert list(rows[0]) == ["case", "subject", "patient", "n_support", "seed", "method", "k", "class", "label", "dice",
                             "hd95", "gt_voxels", "pred_voxels", "query_slices", "seconds"]
    # 2 cases x 2 classes x (retrieved, random, finetuned at k=1,2 + gt-box + unet + dynunet)
    assert len(rows) == 2 * 2 * (3 * 2 + 3)
    assert {r["method"] for r in rows} == {"retrieved", "random", "finetuned", "gt-box", "unet", "dynunet"}
    summary = (out / "summary.md").read_text()
    assert "| retrieved | 1 | 1 |" in summary and "| gt-box | 1 | 0 |" in summary and "HD95" in summary
    assert "| dynunet | 1 | 0 |" in summary and "retrieved - random" in summary
    assert "backend litemedsam" in summary
    for f in ("dice_by_k.png", "overlay_best.png", "overlay_worst.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    cases = json.loads((out / "cases.json").read_text())["cases"]

    # Dice recomputed independently: nibabel's canonical orientation, numpy, the saved predictions
    for r in rows:
        lab = nib.as_closest_canonical(nib.load(root / "labels" / "final" / f"{r['subject']}.nii.gz"))
        gt = np.moveaxis(np.asarray(lab.dataobj), 2, 0)  # axial slices [z, x, y]
        pred = np.load(out / "predictions" / f"{r['case']}__{r['method']}__k{r['k']}.npz")
        q = pred["query_slices"]
        assert q.tolist() == cases[r["case"]]["query_slices"]
        p, g = pred["pred"] == int(r["label"]), gt[q] == int(r["label"])
        expect = 1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum())
        assert abs(float(r["dice"]) - expect) < 1e-9, (r, expect)
        assert int(r["gt_voxels"]) == g.sum() and int(r["pred_voxels"]) == p.sum()
    # the ground-truth box prompt is a real segmentation of these simple shapes
    gtbox = [float(r["dice"]) for r in rows if r["method"] == "gt-box"]
    assert np.mean(gtbox) > 0.7, gtbox


def test_a_baselines_only_run_encodes_nothing(tmp_path):
    """The supervised baselines read pixels: `--methods unet` must not spend the encoder's minutes."""
    root = tmp_path / "ds"
    make_dataset(root, n_subjects=3, n_labeled=3, shape=(48, 48, 5), seed=4)
    out, fc = tmp_path / "eval", tmp_path / "fc"
    env = {**os.environ, "RAGSEG_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "ragseg.cli", "evaluate", str(root), str(root / "labels" / "final"),
                        "--classes", "liver=1,spleen=2", "--mode", "cross", "--n-support", "1,2", "--methods", "unet",
                        "--baseline-iters", "2", "--baseline-size", "32", "--modality", "CT",
                        "--feature-cache", str(fc), "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "encoding slices" not in r.stderr
    assert not fc.exists() or not any(p.is_file() for p in fc.rglob("*")), list(fc.rglob("*"))
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 2 and {r["method"] for r in rows} == {"unet"}  # 1 query x 2 pools x 2 classes
    assert "- unet: 2 training(s)" in (out / "summary.md").read_text()


def test_dice_and_hd95_helpers():
    from ragseg.evaluate import dice_score, hd95

    a = np.zeros((3, 20, 20), bool)
    b = np.zeros_like(a)
    a[1, 5:10, 5:10] = True
    b[1, 5:10, 7:12] = True
    assert dice_score(a, b) == pytest.approx(2 * 15 / 50)
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0
    # b is a shifted 2 voxels along the last axis: HD95 = 2 voxels times that axis's spacing
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, b, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert hd95(a, b, (1.0, 3.0, 1.0)) == pytest.approx(2.0)
    assert np.isnan(hd95(a, np.zeros_like(a), (1, 1, 1)))


def test_loso_never_splits_a_patient():
    """ED and ES of one heart are one patient: never one in the pool and the other queried."""
    from ragseg.evaluate import EvalConfig, Subject, _loso_cases

    lab = np.zeros((3, 4, 4), np.int32)
    lab[1, 1:3, 1:3] = 1
    ids = [f"patient{p:03d}_frame{f:02d}" for p in (1, 2, 3, 4) for f in (1, 12)] + ["loner"]
    subjects = [Subject(i, np.zeros((3, 4, 4), np.float32), lab, (1.0, 1.0, 1.0),
                        group=__import__("re").match(EvalConfig.group_pattern, i).group(1)) for i in ids]
    cfg = EvalConfig(images="", labels=None, out="", classes={"x": 1}, mode="loso", n_support=2, seeds=[0, 1])
    cfg.validate()
    cases = _loso_cases(subjects, cfg)
    assert len(cases) == len(ids) * 2  # every volume of every held-out patient, per seed
    for c in cases:
        pool_groups = {s.group for s, _ in c.pool}
        assert c.query.group not in pool_groups and len(pool_groups) == 2, (c.name, pool_groups)
        assert all(z == 1 for _, z in c.pool)  # only labeled slices
        # both volumes of a chosen patient are in the pool
        for g in pool_groups - {"loner"}:
            assert {s.id for s, _ in c.pool if s.group == g} == {f"{g}_frame01", f"{g}_frame12"}
    # the two volumes of one patient get the same pool for a seed
    by = {c.name: c for c in cases}
    assert [(s.id, z) for s, z in by["patient001_frame01-n2-s0"].pool] == [(s.id, z) for s, z in by["patient001_frame12-n2-s0"].pool]
    with pytest.raises(Exception, match="capture group"):
        EvalConfig(images="", labels=None, out="", classes={"x": 1}, group_pattern="^patient").validate()


def test_cross_cases_nest_pools_and_share_queries():
    """--mode cross: per seed the pools of a learning curve are nested, the queries are the same
    patients for every n, never in a pool, and both volumes of a patient go together."""
    import re

    from ragseg.evaluate import EvalConfig, Subject, _cross_cases

    lab = np.zeros((3, 4, 4), np.int32)
    lab[1:, 1:3, 1:3] = 1
    ids = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 11) for f in (1, 12)]
    subjects = [Subject(i, np.zeros((3, 4, 4), np.float32), lab, (1.0, 1.0, 1.0),
                        group=re.match(EvalConfig.group_pattern, i).group(1)) for i in ids]
    cfg = EvalConfig(images="", labels=None, out="", classes={"x": 1}, mode="cross", n_support=[1, 2, 4], seeds=[0, 1])
    cfg.validate()
    cases = _cross_cases(subjects, cfg)
    for seed in (0, 1):
        pools = {n: {s.group for c in cases if c.seed == seed and c.n_support == n for s, _ in c.pool} for n in (1, 2, 4)}
        assert [len(pools[n]) for n in (1, 2, 4)] == [1, 2, 4]
        assert pools[1] < pools[2] < pools[4]  # nested
        queries = {n: {c.query.group for c in cases if c.seed == seed and c.n_support == n} for n in (1, 2, 4)}
        assert queries[1] == queries[2] == queries[4] and len(queries[1]) == 10 - 4
        assert queries[1].isdisjoint(pools[4])
        for n in (1, 2, 4):  # every volume of a pool patient, only its labeled slices; both frames queried
            c = next(c for c in cases if c.seed == seed and c.n_support == n)
            assert len(c.pool) == 2 * 2 * n and all(z in (1, 2) for _, z in c.pool)
            assert len({c.pool_key for c in cases if c.seed == seed and c.n_support == n}) == 1
        assert len([c for c in cases if c.seed == seed]) == 3 * 6 * 2
    with pytest.raises(Exception, match="more than 4 patients"):
        _cross_cases(subjects[:8], cfg)


def test_confidence_interval_and_paired_difference_over_patients():
    from scipy import stats

    from ragseg.evaluate import ci95, paired_difference, summarize

    rng = np.random.default_rng(0)
    rows = []
    truth = {}
    for p in range(6):
        for _case in range(4):  # 2 volumes x 2 seeds
            for c in ("x", "y"):
                base = 0.5 + 0.05 * p
                for m, shift in (("retrieved", 0.1), ("random", 0.0)):
                    d = base + shift + rng.normal(0, 0.01)
                    rows.append({"method": m, "k": 3, "n_support": 4, "patient": f"p{p}", "class": c,
                                 "dice": d, "hd95": 1.0})
                    truth.setdefault((m, p), []).append(d)
    # CI over patients: each patient's 8 cases averaged first, then a t-interval over 6 patients
    per_pat = [np.mean(truth[("retrieved", p)]) for p in range(6)]
    expect = stats.t.ppf(0.975, 5) * np.std(per_pat, ddof=1) / np.sqrt(6)
    summ = summarize(rows, ["x", "y"])
    assert summ[("retrieved", 3, 4)]["mean"]["dice_ci95"] == pytest.approx(expect)
    assert summ[("retrieved", 3, 4)]["mean"]["patients"] == 6
    assert ci95([0.5]) != ci95([0.5])  # NaN for one patient
    d = paired_difference(rows, ["x", "y"])[(3, 4)]
    assert d["diff"] == pytest.approx(0.1, abs=0.01) and d["wins"] == 6 and d["patients"] == 6
    assert d["ci95"] < 0.02  # paired: the large between-patient spread cancels


def test_bad_baseline_size_is_refused_before_any_work():
    from ragseg.evaluate import EvalConfig

    for size in (0, 100):
        with pytest.raises(RagsegError, match="multiple of 32"):
            EvalConfig(images="", labels=None, out="", classes={"x": 1}, baseline_size=size).validate()
    EvalConfig(images="", labels=None, out="", classes={"x": 1}, baseline_size=64).validate()
    EvalConfig(images="", labels=None, out="", classes={"x": 1}, baseline_size=None).validate()  # auto


def test_cli_baseline_size_takes_auto_or_pixels():
    from ragseg.cli import build_parser

    p = build_parser()
    base = ["evaluate", "imgs", "--classes", "x=1", "--out", "o"]
    assert p.parse_args(base).baseline_size is None
    assert p.parse_args(base + ["--baseline-size", "auto"]).baseline_size is None
    assert p.parse_args(base + ["--baseline-size", "96"]).baseline_size == 96
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--baseline-size", "big"])


def test_learning_curve_series_are_told_apart():
    """Every (method, k) series of a full curve gets its own look; a method keeps one colour."""
    from ragseg.evaluate import K_FREE, METHODS, curve_styles

    summ = {(m, k, n): {} for m in METHODS for k in ((0,) if m in K_FREE else (1, 3, 5)) for n in (1, 2, 4)}
    st = curve_styles(summ)
    assert set(st) == {(m, k) for m, k, _ in summ}
    assert len(set(st.values())) == len(st)  # no two series drawn alike
    for m in METHODS:
        assert len({c for (mm, _), (c, _, _) in st.items() if mm == m}) == 1
    assert len({st[(m, 3 if m not in K_FREE else 0)][0] for m in METHODS}) == len(METHODS)


def _run_folder(path, seed, methods, rng, command=None, finetune=None, **cfg_kw):
    """A run folder as `ragseg evaluate` leaves it (results.csv, cases.json, summary.md), written by
    the harness's own report writer from rows of 3 patients x 2 pool sizes; with ``command`` (a
    ``ragseg evaluate`` line) its settings are that command's as the CLI parses it; ``finetune``:
    the fine-tuning record every case keeps (as the harness's)."""
    from ragseg.cli import config_from_command
    from ragseg.evaluate import K_FREE, EvalConfig, write_reports

    if command is not None:
        cfg = config_from_command(command)
    else:
        cfg = EvalConfig(images="/data/ds", labels=None, out=str(path), classes={"x": 1, "y": 2}, mode="cross",
                         n_support=[1, 2], ks=[3], seeds=[seed], methods=methods, figures=False, **cfg_kw)
    path.mkdir()
    rows, info = [], {}
    for p in range(3):
        for n in (1, 2):
            case = f"p{p}-n{n}-s{seed}"
            info[case] = {"subject": f"p{p}", "seed": seed, "n_support": n}
            if finetune is not None:
                info[case]["finetune"] = finetune
            for m in methods:
                for c, lab in (("x", 1), ("y", 2)):
                    rows.append({"case": case, "subject": f"p{p}", "patient": f"p{p}", "n_support": n, "seed": seed,
                                 "method": m, "k": 0 if m in K_FREE else 3, "class": c, "label": lab,
                                 "dice": float(rng.uniform(0.5, 0.9)), "hd95": float(rng.uniform(1, 5)),
                                 "gt_voxels": 100, "pred_voxels": 90, "query_slices": 10, "seconds": 1.0})
    write_reports(rows, cfg, info, command or f"ragseg evaluate --seeds {seed} {' '.join(methods)}", 60.0,
                  "backend test")
    return rows


def test_merged_runs_report_as_one_and_refuse_what_does_not_belong_together(tmp_path):
    """`ragseg evaluate-merge`: a second seed and baselines run apart join the first run's table
    (same numbers as one run over all rows, intervals over patients, baseline differences, curve);
    runs with other settings or the same cases are refused."""
    from ragseg.cli import main
    from ragseg.evaluate import merge_runs, paired_difference, summarize

    rng = np.random.default_rng(0)
    a = _run_folder(tmp_path / "s0", 0, ["retrieved", "finetuned"], rng)
    b = _run_folder(tmp_path / "s1", 1, ["retrieved", "finetuned"], rng)
    c = _run_folder(tmp_path / "base", 0, ["dynunet"], rng, baseline_size=64)  # baselines run apart, own setting
    d = _run_folder(tmp_path / "base1", 1, ["dynunet"], rng, baseline_size=64)
    out = tmp_path / "merged"
    assert main(["evaluate-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), str(tmp_path / "base"),
                 str(tmp_path / "base1"), "--out", str(out)]) == 0
    summ = summarize(a + b + c + d, ["x", "y"])
    text = (out / "summary.md").read_text()
    assert "seeds [0, 1]" in text and "Merged from 4 runs:" in text and "`ragseg evaluate --seeds 1" in text
    for (m, k, n), e in summ.items():
        assert e["mean"]["patients"] == 3
        assert f"| {m} | {n} | {k} |" in text and f"{e['mean']['dice_mean']:.3f} ± {e['mean']['dice_ci95']:.3f} |" in text
    diff = paired_difference(a + b + c + d, ["x", "y"], "finetuned", "dynunet")
    assert set(diff) == {(3, 1), (3, 2)}
    assert f"| 2 | 3 | {diff[(3, 2)]['diff']:+.3f} |" in text and "finetuned - dynunet" in text
    merged = list(csv.DictReader(open(out / "results.csv")))
    assert len(merged) == len(a + b + c + d)
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # one curve over both seeds
    cfg = json.loads((out / "cases.json").read_text())["config"]
    assert cfg["seeds"] == [0, 1] and cfg["baseline_size"] == 64 and cfg["methods"] == ["retrieved", "finetuned",
                                                                                          "dynunet"]
    # a setting every method reads differs: refused, naming it
    _run_folder(tmp_path / "other", 2, ["retrieved"], rng, max_regions=5)
    with pytest.raises(RagsegError, match="max_regions"):
        merge_runs([tmp_path / "s0", tmp_path / "other"], tmp_path / "m2")
    # a baseline setting differs between two runs that both trained the baseline: refused
    _run_folder(tmp_path / "base2", 2, ["dynunet"], rng, baseline_size=128)
    with pytest.raises(RagsegError, match="baseline_size"):
        merge_runs([tmp_path / "base", tmp_path / "base2"], tmp_path / "m3")
    # the same cases twice (seed 0 run again): refused rather than counted twice
    _run_folder(tmp_path / "again", 0, ["retrieved"], rng)
    with pytest.raises(RagsegError, match="in both"):
        merge_runs([tmp_path / "s0", tmp_path / "again"], tmp_path / "m4")
    # ... unless the later run is meant to replace those rows (a method re-run after a fix)
    assert main(["evaluate-merge", str(tmp_path / "s0"), str(tmp_path / "again"), "--replace",
                 "--out", str(tmp_path / "m6")]) == 0
    redone = list(csv.DictReader(open(tmp_path / "m6" / "results.csv")))
    again = list(csv.DictReader(open(tmp_path / "again" / "results.csv")))

    def dice(rows, method):
        return sorted((r["case"], r["class"], round(float(r["dice"]), 9)) for r in rows if r["method"] == method)

    assert len(redone) == len(a)  # finetuned from s0, retrieved from the re-run, nothing twice
    assert dice(redone, "retrieved") == dice(again, "retrieved") != dice(a, "retrieved")
    assert dice(redone, "finetuned") == dice(a, "finetuned")
    assert "(12 of its rows replaced by a later run's)" in (tmp_path / "m6" / "summary.md").read_text()
    with pytest.raises(RagsegError, match="not an evaluation run"):
        merge_runs([tmp_path / "s0", tmp_path / "nowhere"], tmp_path / "m5")
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m4").exists()  # nothing written on refusal


def test_merge_reads_a_run_that_kept_only_its_table(tmp_path, capsys):
    """A run kept as results.csv + summary.md (docs/results) merges with a full run folder: its
    settings come from the command on the summary's first line, parsed by the CLI, so a setting
    that differs is still refused; without the parser such a folder is refused."""
    from ragseg.cli import main
    from ragseg.evaluate import merge_runs, summarize

    rng = np.random.default_rng(1)

    def cmd(seed, methods="retrieved,finetuned", *extra):
        return (f"ragseg evaluate /data/ds --classes x=1,y=2 --mode cross --n-support 1,2 --k 3 --methods {methods} "
                f"--seeds {seed} --no-figures --out {tmp_path / f's{seed}'} " + " ".join(extra)).strip()

    a = _run_folder(tmp_path / "s0", 0, ["retrieved", "finetuned"], rng, command=cmd(0))
    b = _run_folder(tmp_path / "s1", 1, ["retrieved", "finetuned"], rng, command=cmd(1))
    (tmp_path / "s0" / "cases.json").unlink()  # as the table is kept in docs/results
    with pytest.raises(RagsegError, match="missing cases.json"):
        merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m0")
    out = tmp_path / "merged"
    assert main(["evaluate-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out), "--no-figures"]) == 0
    text = (out / "summary.md").read_text()
    assert "seeds [0, 1], 12 cases" in text
    for (m, k, n), e in summarize(a + b, ["x", "y"]).items():
        assert e["mean"]["patients"] == 3
        assert f"| {m} | {n} | {k} |" in text and f"{e['mean']['dice_mean']:.3f} ± {e['mean']['dice_ci95']:.3f} |" in text
    # the table's command ran with another setting than the full run: refused, naming it
    _run_folder(tmp_path / "s2", 2, ["retrieved"], rng, command=cmd(2, "retrieved", "--max-regions", "5"))
    (tmp_path / "s2" / "cases.json").unlink()
    assert main(["evaluate-merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m1")]) != 0
    assert "max_regions 5 vs 1" in capsys.readouterr().err and not (tmp_path / "m1").exists()


def test_merge_refuses_runs_whose_fine_tunings_differ(tmp_path):
    """Settings such as `--image-branch auto` resolve per pool, and a table-only folder's command is
    read with today's defaults: merging also compares what the fine-tunings did (epochs, augmented
    copies, image branch, decoders averaged), from cases.json or from the summary's fine-tuning line, and refuses
    runs that differ, whichever of the two records it has."""
    from ragseg.cli import config_from_command
    from ragseg.evaluate import merge_runs

    rng = np.random.default_rng(2)
    rec = {"best_metric": 0.8, "epochs": 50, "train_s": 1.0, "encode_s": 0.0, "exclusive": False,
           "augmented_copies": 1, "image_branch": True, "precision": "bf16"}
    def cmd(seed):
        return (f"ragseg evaluate /data/ds --classes x=1,y=2 --mode cross --n-support 1,2 --k 3 "
                f"--methods finetuned --seeds {seed} --no-figures --out {tmp_path / f's{seed}'}")

    _run_folder(tmp_path / "s0", 0, ["finetuned"], rng, command=cmd(0), finetune=rec)
    _run_folder(tmp_path / "s1", 1, ["finetuned"], rng, command=cmd(1), finetune=rec)
    merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "same")  # the same fine-tuning: merged
    assert "an image branch" in (tmp_path / "same" / "summary.md").read_text()
    old = {k: v for k, v in rec.items() if k != "image_branch"}  # a record from before the branch existed
    _run_folder(tmp_path / "s2", 2, ["finetuned"], rng, command=cmd(2), finetune=old)
    with pytest.raises(RagsegError, match="image_branch False vs True"):
        merge_runs([tmp_path / "s0", tmp_path / "s2"], tmp_path / "m0")
    # the same, with the earlier run kept as a table only: read from its summary's fine-tuning line
    _run_folder(tmp_path / "s3", 3, ["finetuned"], rng, command=cmd(3), finetune={**old, "epochs": 20})
    (tmp_path / "s3" / "cases.json").unlink()
    with pytest.raises(RagsegError, match="epochs 20 vs 50, image_branch False vs True"):
        merge_runs([tmp_path / "s0", tmp_path / "s3"], tmp_path / "m1", config_of=config_from_command)
    # three decoders averaged against one
    _run_folder(tmp_path / "s4", 4, ["finetuned"], rng, command=cmd(4), finetune={**rec, "members": 3})
    assert "3 decoders averaged" in (tmp_path / "s4" / "summary.md").read_text()
    with pytest.raises(RagsegError, match="members 3 vs 1"):
        merge_runs([tmp_path / "s0", tmp_path / "s4"], tmp_path / "m2")
    assert not any((tmp_path / m).exists() for m in ("m0", "m1", "m2"))


def test_evaluate_refuses_a_decoder_it_would_not_use(tmp_path, capsys):
    """`--decoder` belongs to infer / label-all: evaluate trains its own per pool, so it says so
    instead of reporting numbers that silently came from another model."""
    from ragseg.cli import main

    assert main(["evaluate", str(tmp_path), "--classes", "a=1", "--out", str(tmp_path / "o"),
                 "--decoder", str(tmp_path)]) == 2
    assert "does not take --decoder" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_evaluate_passes_its_model_flags_to_the_models_it_builds(tmp_path):
    """--sam2, --dinov2, --pooling, --device and --memory-cache reach the ModelSet the harness
    builds (they used to be parsed and dropped, so a run said nothing of the models it skipped)."""
    from ragseg.cli import _eval_config, build_parser
    from ragseg.evaluate import Harness

    a = build_parser().parse_args(["evaluate", str(tmp_path), "--classes", "a=1", "--out", str(tmp_path / "o"),
                                   "--backend", "litemedsam", "--sam2", "/ckpt/sam2.pt", "--dinov2", "dinov2-base",
                                   "--pooling", "mean", "--device", "cpu", "--memory-cache", str(tmp_path / "m")])
    m = Harness(_eval_config(a)).models.cfg
    assert (m.sam2, m.dinov2, m.pooling, m.device, m.memory_cache) == \
        ("/ckpt/sam2.pt", "dinov2-base", "mean", "cpu", str(tmp_path / "m"))
    a.pooling = "max"  # invalid values are refused before anything loads
    with pytest.raises(RagsegError, match="pooling"):
        Harness(_eval_config(a))
