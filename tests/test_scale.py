"""Ray scale-out on a real local Ray cluster: two nodes (a head and a worker node process) on
loopback, random-weight models.

The cluster lives in this module's own temp dir (``RAY_TMPDIR``); it is stopped through the
handles that started it, and any process still running from that dir is killed by PID - never
``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ragseg import cli, defaults
from ragseg.factory import ModelConfig, ModelSet
from ragseg.label_all import label_local, local_segmenter_factory
from ragseg.pipeline import Preprocess, discover_pairs, open_index, sync_index
from ragseg.scale import RayOptions, label_ray
from ragseg.synthetic import make_dataset

from .server_utils import Server

pytestmark = [pytest.mark.slow]

SHAPE = (48, 44, 12)
K = 2
CLI_MODEL = ["--random-weights-for-testing", "--image-size", "128"]
ROOT = Path(__file__).resolve().parents[1]


def model_cfg() -> ModelConfig:
    return ModelConfig(random_weights=True, image_size=128)


PRE = Preprocess()


def _pids_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@contextlib.contextmanager
def ray_sandbox():
    """Point every Ray process started from here (and from subprocesses) at a temp dir of our own;
    at the end kill, by PID, whatever still runs from it."""
    tmp = tempfile.mkdtemp(prefix="rgray", dir="/tmp")  # short: Ray's socket paths have a length limit
    (Path(tmp) / "ray").mkdir()
    env = {"RAY_TMPDIR": tmp,
           # Ray turns a 127.0.0.1 address into the host's outward IP unless single-host mode is on:
           # with it, drivers (this process, CLI and server subprocesses) stay on loopback
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import ray._private.ray_constants as rc

    rc.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set
    try:
        yield tmp
    finally:
        end = time.time() + 20
        while _pids_mentioning(tmp) and time.time() < end:
            time.sleep(0.5)
        for pid in _pids_mentioning(tmp):  # by PID, only processes of this sandbox
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        rc.ENABLE_RAY_CLUSTER = True


@pytest.fixture(scope="module")
def cluster():
    """A head node and one more node (1 CPU each) on 127.0.0.1, in a temp dir of our own."""
    with ray_sandbox() as tmp:
        import ray
        from ray.cluster_utils import Cluster

        node = dict(num_cpus=1, object_store_memory=128 << 20, node_ip_address="127.0.0.1")
        c = Cluster(initialize_head=True, head_node_args=dict(node, temp_dir=f"{tmp}/ray", include_dashboard=False))
        try:
            c.add_node(**node)
            c.wait_for_nodes()
            yield c
        finally:
            if ray.is_initialized():
                ray.shutdown()
            c.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """6 subjects, 2 with final labels: 4 to label."""
    root = tmp_path_factory.mktemp("scale") / "ds"
    make_dataset(root, n_subjects=6, n_labeled=2, shape=SHAPE)
    return root


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """Single-process label-all (1 torch thread, as each actor below): image id -> label map."""
    ds = copy_ds(base, tmp_path_factory.mktemp("ref") / "ds")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = label_local(ds, local_segmenter_factory(ds, model_cfg(), PRE, K), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(rep.done) == 4 and not rep.failed
    return read_labels(ds)


def copy_ds(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".ragseg", "original"))
    return dst


def read_labels(ds: Path) -> dict[str, np.ndarray]:
    return {p.name.removesuffix(".nii.gz"): np.asarray(nib.load(p).dataobj)
            for p in (ds / "labels" / "original").glob("*.nii.gz")}


def assert_complete(ds: Path, reference: dict[str, np.ndarray]) -> None:
    """Every image has exactly one complete original label, equal to the single-process one."""
    orig = ds / "labels" / "original"
    assert sorted(p.name for p in orig.iterdir()) == sorted(f"{i}.nii.gz" for i in reference), \
        "a partial file or a missing/extra label"
    got = read_labels(ds)
    for iid, want in reference.items():
        # identical voxels: same models, same thread count (1) per process, same snapshot
        assert np.array_equal(got[iid], want), f"{iid}: {(got[iid] != want).sum()} voxels differ"


def opts(cluster, **kw) -> RayOptions:
    return RayOptions(**dict(dict(address=cluster.address, actors=2, threads=1, progress=False), **kw))


def test_label_all_ray_matches_single_process_and_skips_corrupt(cluster, base, reference, tmp_path):
    ds = copy_ds(base, tmp_path / "ds")
    (ds / "subject_99.nii.gz").write_bytes(b"\x1f\x8b not really a volume")
    final = ds / "labels" / "final"
    hidden = tmp_path / "final-hidden"

    def hide_supports(pool):
        # The snapshot (index + support slices) is published before the actors start: with the
        # labeled volumes gone, workers must still segment from it alone.
        final.rename(hidden)

    try:
        rep = label_ray(ds, model_cfg(), PRE, k=K, opts=opts(cluster), on_ready=hide_supports)
    finally:
        hidden.rename(final)
    assert sorted(rep.done) == sorted(reference)
    assert set(rep.failed) == {"subject_99"} and rep.failed["subject_99"], rep.failed  # with its reason
    assert rep.run["mode"] == "ray" and rep.run["actors"] == 2 and rep.run["nodes"] == 2
    assert len(rep.run["volumes_per_worker"]) == 2, rep.run  # both nodes' actors did work
    assert rep.slices == 4 * SHAPE[2] and not rep.retried
    corrupt = ds / "subject_99.nii.gz"
    corrupt.unlink()  # reported and skipped; the rest is complete and identical
    assert_complete(ds, reference)
    # a re-run has nothing left to do
    again = label_ray(ds, model_cfg(), PRE, k=K, opts=opts(cluster))
    assert again.done == [] and sorted(again.skipped) == sorted(reference)


def test_worker_killed_mid_volume_is_retried(cluster, base, reference, tmp_path):
    ds = copy_ds(base, tmp_path / "ds")
    killed: dict = {}

    def start_killer(pool):
        def killer():
            end = time.time() + 120
            while time.time() < end and not killed:
                for info in pool.info():
                    if info["busy"] and info["busy_s"] > 0.3:  # a volume takes seconds: surely mid-volume
                        os.kill(info["pid"], signal.SIGKILL)
                        killed.update(info)
                        return
                time.sleep(0.05)

        threading.Thread(target=killer, daemon=True).start()

    rep = label_ray(ds, model_cfg(), PRE, k=K, opts=opts(cluster), on_ready=start_killer)
    assert killed, "no worker was seen busy"
    assert rep.retried == {killed["busy"]: 1}, (killed, rep.retried)
    assert sorted(rep.done) == sorted(reference) and not rep.failed
    assert_complete(ds, reference)


def _cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{ROOT / 'lib'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def test_driver_interrupted_then_resumed(cluster, base, reference, tmp_path):
    ds = copy_ds(base, tmp_path / "ds")
    orig = ds / "labels" / "original"
    cmd = [sys.executable, "-m", "ragseg.cli", "--threads", "1", "label-all", str(ds), "-k", str(K),
           "--ray", cluster.address, "--actors", "1", "--threads-per-actor", "1", *CLI_MODEL]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_cli_env())
    end = time.time() + 300
    # a finished label, not a worker's temp file (.partial-*: pathlib's glob matches dotfiles)
    while time.time() < end and p.poll() is None and not [q for q in orig.glob("*.nii.gz") if q.name[0] != "."]:
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()[0]
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out
    first = {q.name: (q.stat().st_ino, q.stat().st_mtime_ns) for q in orig.glob("*.nii.gz")}
    assert 1 <= len(first) < 4, out
    summ = json.loads((ds / ".ragseg" / "label-all-summary.json").read_text())
    assert summ["interrupted"] and sorted(f"{i}.nii.gz" for i in summ["done"]) == sorted(first)
    for q in orig.glob("*.nii.gz"):  # whatever exists is complete
        np.asarray(nib.load(q).dataobj)

    r = subprocess.run(cmd, capture_output=True, text=True, env=_cli_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    summ = json.loads((ds / ".ragseg" / "label-all-summary.json").read_text())
    assert sorted(f"{i}.nii.gz" for i in summ["skipped"]) == sorted(first)  # nothing done twice
    assert not set(f"{i}.nii.gz" for i in summ["done"]) & set(first)
    assert {q.name: (q.stat().st_ino, q.stat().st_mtime_ns) for q in orig.glob("*.nii.gz") if q.name in first} == first
    assert_complete(ds, reference)


def test_index_build_ray_same_ids_and_vectors(cluster, tmp_path, monkeypatch, capsys):
    root = tmp_path / "all"
    make_dataset(root, n_subjects=5, n_labeled=5, shape=SHAPE)
    labels = root / "labels" / "final"
    shutil.copy(labels / "subject_00.nii.gz", labels / "subject_99.nii.gz")
    (root / "subject_99.nii.gz").write_bytes(b"corrupt")  # a labeled pair whose image is unreadable
    items = discover_pairs(root, labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        emb = ModelSet(model_cfg()).embedder()
        single = open_index(tmp_path / "single", emb, PRE)
        srep = sync_index(single, emb, PRE, items)
        # merge every 2 volumes: results arriving out of order are held until their turn
        monkeypatch.setattr(defaults, "RAY_INDEX_FLUSH", 2)
        rc = cli.main(["--threads", "1", "index", "build", str(root), str(labels), "--index", str(tmp_path / "ray"),
                       "--ray", cluster.address, "--actors", "2", "--threads-per-actor", "1", *CLI_MODEL])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert rc == 1 and "failed subject_99" in err, err  # reported, the rest indexed
    assert set(srep.failed) == {"subject_99"}
    summ = json.loads((tmp_path / "ray" / "build-summary.json").read_text())
    assert summ["run"]["mode"] == "ray" and summ["run"]["actors"] == 2 and set(summ["failed"]) == {"subject_99"}
    assert sorted(summ["added"]) == sorted(f"subject_{i:02d}" for i in range(5))
    ray_idx = open_index(tmp_path / "ray", emb, PRE)
    assert len(single) == len(ray_idx) > 0
    np.testing.assert_array_equal(single.ids(), ray_idx.ids())
    key = [(r.image_id, r.slice_index, r.labels, r.label_checksum, r.image_checksum) for r in single.records()]
    assert key == [(r.image_id, r.slice_index, r.labels, r.label_checksum, r.image_checksum)
                   for r in ray_idx.records()]
    np.testing.assert_allclose(single.vectors(), ray_idx.vectors(), rtol=0, atol=1e-6)
    # nothing changed: a second Ray build embeds nothing and keeps the ids
    rc = cli.main(["--threads", str(threads), "index", "build", str(root), str(labels), "--index",
                   str(tmp_path / "ray"), "--ray", cluster.address, "--actors", "2", "--threads-per-actor", "1",
                   *CLI_MODEL])
    torch.set_num_threads(threads)
    assert "unchanged 5" in capsys.readouterr().out
    np.testing.assert_array_equal(open_index(tmp_path / "ray", emb, PRE).ids(), single.ids())


@pytest.mark.server
def test_app_batch_infer_on_ray(cluster, base, reference, tmp_path):
    """--conf ray_address: POST /batch/infer/ragseg?images=unlabeled runs on the cluster's actors."""
    ds = copy_ds(base, tmp_path / "ds")
    conf = {"random_weights_for_testing": "true", "image_size": "128", "k": str(K), "reconcile_interval": "0.5",
            "ray_address": cluster.address, "ray_actors": "2", "ray_threads": "1", "embed_unlabeled": "false"}
    # inherits the cluster's RAY_* variables; one torch thread, as the reference's index was built
    # with (random weights: embeddings from another thread count can tip a near-tied voxel)
    srv = Server(ds, tmp_path / "server.log", conf, env={"OMP_NUM_THREADS": "1"}).start()
    try:
        srv.wait_for(lambda i: i["ragseg"].get("index", {}).get("slices", 0) > 0, timeout=180)
        status, body, _ = srv.request("POST", "/batch/infer/ragseg?images=unlabeled",
                                      json_body={"device": "cpu", "multi_gpu": False, "max_workers": 1})
        assert status == 200, body
        summary = ds / ".ragseg" / "batch-ray-summary.json"
        end = time.time() + 600
        while time.time() < end and not summary.exists():
            time.sleep(1)
        assert summary.exists(), srv.tail(80)
        s = json.loads(summary.read_text())
        assert s["run"]["mode"] == "ray" and s["run"]["nodes"] == 2 and len(s["run"]["volumes_per_worker"]) == 2, s
        assert sorted(s["done"]) == sorted(reference) and not s["failed"]
        assert_complete(ds, reference)  # the app's path labels exactly as label-all does
        # the batch subprocess refreshed datastore.json; the server's own view catches up on its
        # next reconcile (every 0.5 s here), so poll rather than race it
        end, seen = time.time() + 60, set()
        while time.time() < end:
            objs = json.loads(srv.get("/datastore/?output=all")[1])["objects"]
            seen = {i for i, o in objs.items() if "original" in o.get("labels", {})}
            if seen == set(reference):
                break
            time.sleep(0.5)
        assert seen == set(reference), srv.tail(40)
    finally:
        srv.stop()


def test_bench_scale_quick(tmp_path):
    """`ragseg bench scale --quick`: single process and 2 local Ray actors in one run."""
    out = tmp_path / "scale.json"
    with ray_sandbox():
        r = subprocess.run([sys.executable, "-m", "ragseg.cli", "bench", "scale", "--quick", "--json", str(out)],
                           capture_output=True, text=True, env=_cli_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vs single" in r.stdout
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(x["mode"], x["actors"]) for x in rows] == [("single process", 0), ("ray", 2)]
    assert [x["threads"] for x in rows] == [res["cores"], max(1, res["cores"] // 2)]
    for x in rows:  # every configuration labelled every volume
        assert x["volumes"] == res["n_volumes"] and x["slices"] == res["n_volumes"] * res["shape"][2]
        assert x["run_s"] > 0 and x["speedup_vs_single"] > 0 and x["overhead_s_per_volume"] >= 0
    assert rows[0]["speedup_vs_single"] == 1.0
