"""Smoke runs of every evaluation protocol on small real data (CI): the commands that make
docs/results.md, cut down to minutes. The numbers are not checked here; that every part of the
protocol runs and reports is (learning curve, intervals over patients, paired difference,
baselines trained and timed, the RAG-SAM 2 backend through the same harness)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from .integration import acdc_slab, needs, shared_missing

ACDC_3 = "patient001_frame01,patient001_frame12,patient002_frame01,patient002_frame12,"\
         "patient021_frame01,patient021_frame13"


def _evaluate(tmp_path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAGSEG_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "ragseg.cli", "evaluate", *args], capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
@needs(shared_missing("acdc-sample/patient021_frame13_gt.nii.gz"))
def test_cross_patient_learning_curve_on_acdc(tmp_path):
    """--mode cross with a learning curve over labeled patients, every method, ACDC's mixed sizes."""
    acdc = acdc_slab(tmp_path / "acdc-slab", ACDC_3)  # 4 mid-ventricular slices per heart, each with RV, MYO, LV
    out = tmp_path / "acdc"
    _evaluate(tmp_path, str(acdc), "--label-suffix", "_gt", "--subjects", ACDC_3, "--classes", "RV=1,MYO=2,LV=3",
              "--mode", "cross", "--n-support", "1,2", "--k", "1", "--seeds", "0",
              "--methods", "retrieved,random,finetuned,gt-box,unet,dynunet", "--finetune-epochs", "1",
              "--augment-copies", "0",  # copies are tested elsewhere; here each would be a real encode
              "--baseline-iters", "2", "--baseline-size", "64",  # a DynUNet iteration at 256 px is ~10 s here
              "--feature-cache", str(tmp_path / "fc"), "--out", str(out))
    rows = list(csv.DictReader(open(out / "results.csv")))
    # 1 query patient (both frames) x 2 pool sizes x 3 classes x 6 methods
    assert len(rows) == 2 * 2 * 3 * 6
    assert {r["n_support"] for r in rows} == {"1", "2"}
    queried = {r["patient"] for r in rows}
    pools = json.loads((out / "cases.json").read_text())["cases"]
    for c in pools.values():
        assert not {p.split("_frame")[0] for p, _ in c["pool"]} & queried  # no patient on both sides
    summary = (out / "summary.md").read_text()
    assert "retrieved - random" in summary and "mean ± 95% CI" in summary
    assert "| finetuned - unet |" in summary and "| finetuned - dynunet |" in summary
    assert "- unet: 2 training(s) at 64 px" in summary and "- dynunet: 2 training(s) at 64 px" in summary
    assert "- fine-tuning:" in summary
    assert "s per slice" in summary  # encoding was timed (fresh cache)
    for f in ("learning_curve.png", "dice_by_k.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    # one training per pool, reused for every query of that pool
    ft = {json.dumps(c["finetune"], sort_keys=True) for c in pools.values() if c["n_support"] == 2}
    assert len(ft) == 1
    # the ventricles lie apart in every pool (their regions compete); the myocardium borders both
    assert {json.dumps(c["finetune"]["exclusive"]) for c in pools.values()} == {"[[1, 3]]"}
    assert "augmented copies of each labeled slice" in summary
    from ragseg.precision import resolve

    want = resolve("auto")  # the default: what this machine multiplies natively
    assert {c["finetune"]["precision"] for c in pools.values()} == {want}
    assert f"{want} arithmetic" in summary
    # a re-run reads every embedding from the feature cache instead of encoding
    out2 = tmp_path / "again"
    _evaluate(tmp_path, str(acdc), "--label-suffix", "_gt", "--subjects", ACDC_3, "--classes", "RV=1,MYO=2,LV=3",
              "--mode", "cross", "--n-support", "1", "--k", "1", "--methods", "retrieved",
              "--feature-cache", str(tmp_path / "fc"), "--out", str(out2))
    assert "came from the feature cache" in (out2 / "summary.md").read_text()
    # the same pool for n = 1 (the seed's patient order); with a largest n of 1 one more patient is queried
    again = {(r["case"], r["class"]): r["dice"] for r in csv.DictReader(open(out2 / "results.csv"))}
    first = {(r["case"], r["class"]): r["dice"] for r in rows if r["method"] == "retrieved" and r["n_support"] == "1"}
    assert len(again) == len(first) + 2 * 3 and {k: again[k] for k in first} == first


@pytest.mark.slow
def test_rag_sam2_backend_runs_the_same_protocol(tmp_path):
    """With SAM 2 weights present the RAG-SAM 2 backend goes through the same harness; here with
    random weights (the numbers mean nothing; that it runs end to end does)."""
    from ragseg.synthetic import make_dataset

    root = tmp_path / "ds"
    make_dataset(root, n_subjects=3, n_labeled=3, shape=(48, 48, 6), seed=5)
    out = tmp_path / "eval"
    r = _evaluate(tmp_path, str(root), str(root / "labels" / "final"), "--classes", "liver=1,spleen=2",
                  "--mode", "cross", "--n-support", "1,2", "--k", "1,2", "--methods", "retrieved,random",
                  "--backend", "rag-sam2", "--random-weights-for-testing", "--image-size", "256",
                  "--modality", "CT", "--out", str(out))
    assert "RANDOM weights" in r.stderr
    summary = (out / "summary.md").read_text()
    assert "backend rag-sam2" in summary and "| retrieved | 2 | 2 |" in summary
    assert (out / "learning_curve.png").exists()
