"""Benchmarks that print numbers (``ragseg bench``). Random weights: cost does not depend on them.

Section ``engine``: per-query-slice time of the RAG-SAM 2 engine for k supports, with support
memories cached (the product path: memories computed when the label was saved) and uncached
(every support's image encoded and its memory computed for the query, as a video-predictor
pipeline would do), measured side by side in one run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .engine import RagSam2Engine, Support, SupportMemoryCache
from .sam2_model import build_sam2


@dataclass
class EngineTiming:
    k: int
    cached_s_per_slice: float
    uncached_s_per_slice: float

    @property
    def ratio(self) -> float:
        return self.uncached_s_per_slice / self.cached_s_per_slice


def _supports(rng: np.random.Generator, k: int, size: int, tag: str) -> list[Support]:
    out = []
    for i in range(k):
        img = rng.random((size, size)).astype(np.float32)
        m = np.zeros((size, size), bool)
        m[size // 4: size // 2 + i, size // 4: 3 * size // 4] = True
        out.append(Support(f"{tag}-{i}", (lambda img=img, m=m: (img, m))))
    return out


def engine_timing(image_size: int = 512, ks: tuple[int, ...] = (1, 3, 7), n_queries: int = 4,
                  repeats: int = 3, variant: str = "hiera_t") -> dict:
    """Median seconds per query slice, cached vs uncached supports, for each k."""
    torch.manual_seed(0)
    model = build_sam2(variant, image_size=image_size, random_weights=True)
    rng = np.random.default_rng(0)
    queries = rng.random((n_queries, image_size, image_size)).astype(np.float32)
    rows = []
    with torch.inference_mode():
        for k in ks:
            cached_t, uncached_t = [], []
            for r in range(repeats):
                # uncached: a fresh cache every query, so every support is encoded for it
                t0 = time.perf_counter()
                for qi in range(n_queries):
                    eng = RagSam2Engine(model, model_id="bench", cache=SupportMemoryCache())
                    mems = eng.support_memories(_supports(rng, k, image_size, f"u{r}-{qi}"))
                    f = eng.encode_images(eng.prepare_images(queries[qi:qi + 1]))
                    eng.segment(f, [mems])
                uncached_t.append((time.perf_counter() - t0) / n_queries)
                # cached: memories computed once beforehand (at label-save time in the product)
                eng = RagSam2Engine(model, model_id="bench", cache=SupportMemoryCache())
                sup = _supports(rng, k, image_size, f"c{r}")
                eng.support_memories(sup)
                t0 = time.perf_counter()
                f = eng.encode_images(eng.prepare_images(queries))
                eng.segment(f, [eng.support_memories(sup)] * n_queries)
                cached_t.append((time.perf_counter() - t0) / n_queries)
            rows.append(EngineTiming(k, statistics.median(cached_t), statistics.median(uncached_t)))
    return {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "model": f"sam2.1-{variant} (random weights)",
        "image_size": image_size,
        "n_queries": n_queries,
        "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
    }


def print_engine_table(res: dict) -> None:
    print(f"engine per query slice: {res['model']}, {res['image_size']} px, device {res['device']}, "
          f"{res['threads']} threads, {res['dtype']}")
    print(f"{'k':>3} {'cached s/slice':>15} {'uncached s/slice':>17} {'uncached/cached':>16}")
    for r in res["rows"]:
        print(f"{r['k']:>3} {r['cached_s_per_slice']:>15.3f} {r['uncached_s_per_slice']:>17.3f} {r['ratio']:>16.2f}")


def main_engine(image_size: int, ks: tuple[int, ...], n_queries: int, repeats: int, json_path: str | None) -> int:
    res = engine_timing(image_size, ks, n_queries, repeats)
    print_engine_table(res)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(res, fh, indent=1)
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
