"""CI smoke test of `ragseg bench` at a tiny size: it runs and its JSON has every field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "ragseg.cli", "bench", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "threads" in p.stdout and "naive/ours" in p.stdout and "recall@k" in p.stdout
    res = json.loads(out.read_text())
    vol, ret = res["volume"], res["retrieval"]
    assert {"device", "threads", "dtype"} <= set(vol["env"])
    assert [r["k"] for r in vol["rows"]] == [1, 3, 7]
    for r in vol["rows"]:
        assert set(r["stages_s"]) == {"load", "embed", "retrieval", "supports", "encode", "decode", "write"}
        assert r["total_s"] > 0 and r["naive_s_per_slice"] > 0 and r["naive_over_ours"] > 0
        assert r["total_over_unavoidable"] >= 1.0  # the total includes the unavoidable stages
        assert abs(r["slices_per_s"] - vol["n_slices"] / r["total_s"]) < 1e-6
    assert vol["peak_rss_mb"] > 0
    assert [r["n"] for r in ret["rows"]] == [1000, 5000]
    for r in ret["rows"]:
        assert 0 <= r["ivf"]["recall_at_k"] <= 1 and r["flat"]["median_ms"] > 0 and r["flat"]["memory_mb"] > 0


@pytest.mark.slow
def test_bench_litemedsam_quick(tmp_path):
    out = tmp_path / "lite.json"
    p = subprocess.run([sys.executable, "-m", "ragseg.cli", "bench", "litemedsam", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    rows = {r["variant"]: r for r in res["encoder"]["rows"]}
    assert "+ malloc thresholds 1 GiB (ours)" in rows and rows["package: no_grad, contiguous, batch 1"]["speedup_vs_package"] == 1
    # every variant computes the same embedding (memory format and batching change speed only)
    assert all(r["max_abs_diff"] < 1e-3 for r in rows.values()), rows
    ft = res["finetune"]
    assert ft["episodes"] == 4 and ft["epoch_cached_s"] > 0 and ft["ratio"] > 1
    assert ft["epoch_bf16_s"] > 0 and ft["bf16_speedup"] > 0 and ft["auto_precision"] in ("bf16", "float32")
