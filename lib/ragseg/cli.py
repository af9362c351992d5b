"""Command line: ``ragseg weights|index|segment|sample-data``.

Errors a user can cause are printed as one line (``error: ...``) with exit status 2; nothing is
written on failure (labels and the index are replaced atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__, defaults
from .errors import RagsegError

_PRECISION_HELP = ("fine-tuning arithmetic: bf16 autocast (weights and loss stay float32), float32, or auto: "
                   "bf16 where the CPU (AVX512-BF16 / AMX) or GPU multiplies it natively (default: %(default)s)")
_IMAGE_BRANCH_HELP = ("fine-tuning: give the decoder the slice itself through a small trained convolutional branch "
                      "into its dense prompt, beside the frozen embedding; auto: for pools of small slices (median "
                      f"long side <= {defaults.IMAGE_BRANCH_MAX_SIDE} px) (default: %(default)s)")

_DECODERS_HELP = ("fine-tuning: train N decoders of the pool with seeds seed, seed + "
                  f"{defaults.FINETUNE_MEMBER_SEED_STEP}, ... and serve the mean of their logits; N times the "
                  "fine-tuning time (default: %(default)s)")

logger = logging.getLogger("ragseg")


def _share(v: str) -> float:
    x = float(v)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, not {v}")
    return x


def _count(v: str) -> int:
    try:
        x = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number >= 0, not {v}") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"a whole number >= 0, not {v}")
    return x


def _members(v: str) -> int:
    x = _count(v)
    if not 1 <= x <= defaults.FINETUNE_MAX_MEMBERS:
        raise argparse.ArgumentTypeError(f"between 1 and {defaults.FINETUNE_MAX_MEMBERS}, not {v}")
    return x


def _baseline_size(v: str) -> int | None:
    if str(v).strip().lower() in ("auto", "none", ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a multiple of 32 or 'auto', got {v!r}") from None


def _area_cap(v: str):
    from .prototypes import parse_area_cap

    try:
        return parse_area_cap(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--backend", choices=("auto", "rag-sam2", "litemedsam"), default="auto",
                   help="auto: rag-sam2 when the SAM 2.1 checkpoint is on disk, else litemedsam (default)")
    g.add_argument("--retrieval", choices=("auto", "dinov2", "litemedsam"), default="auto",
                   help="retrieval embedding; auto: DINOv2 when its weights load, else LiteMedSAM's (default)")
    g.add_argument("--decoder", default=None, help="fine-tuned prototype decoder folder (litemedsam backend)")
    g.add_argument("--location-prior", type=int, default=defaults.LOCATION_PRIOR,
                   help="litemedsam: grid cells (4 px at 256) a region may lie from the supports' structure; "
                        "-1 disables (default: %(default)s)")
    g.add_argument("--area-cap", type=_area_cap, default=defaults.REGION_AREA_CAP,
                   help="litemedsam: a region keeps at most this multiple of the supports' structure area "
                        "(most foreground-like cells first; e.g. 1.5); 'none' or 0: off (default: %(default)s)")
    g.add_argument("--max-regions", type=int, default=defaults.MAX_REGIONS,
                   help="litemedsam: box prompts per label and slice (more for lesions; default: %(default)s)")
    g.add_argument("--region-score", choices=("prototype", "linear"), default=defaults.REGION_SCORE,
                   help="litemedsam: what scores query cells for the box prompts: cosine to the supports' "
                        "prototypes, or a logistic regression fitted on the supports' cells (embedding + "
                        "intensity; for small bright structures such as lesions; default: %(default)s)")
    g.add_argument("--sam2", default="sam2.1-hiera-tiny",
                   help="SAM 2.1 registry name or path to an official .pt (default: %(default)s)")
    g.add_argument("--dinov2", default="dinov2-small",
                   help="DINOv2 registry name, hub id or local directory (default: %(default)s)")
    g.add_argument("--pooling", choices=("cls", "mean"), default="cls", help="DINOv2 pooling")
    g.add_argument("--image-size", type=int, default=defaults.SAM2_IMAGE_SIZE, help="SAM 2 input size")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--memory-cache", default=None, help="directory for cached support memories")
    # Tests and benchmarks only: same architectures, random weights. Hidden, and loud when used.
    g.add_argument("--random-weights-for-testing", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--sam2-variant", default="hiera_t", help=argparse.SUPPRESS)
    p2 = p.add_argument_group("slicing")
    p2.add_argument("--axis", default="axial", help="axial, coronal, sagittal or 0/1/2 (default: axial)")
    p2.add_argument("--modality", default="auto", choices=("auto", "CT", "MR"), help="intensity normalisation")
    p2.add_argument("--ct-window", default=defaults.DEFAULT_CT_WINDOW, choices=sorted(defaults.CT_WINDOWS))


def _model_config(a: argparse.Namespace):
    from .factory import ModelConfig

    if a.random_weights_for_testing:
        print("WARNING: --random-weights-for-testing: models have RANDOM weights; output is meaningless",
              file=sys.stderr)
    return ModelConfig(backend=a.backend, retrieval=a.retrieval, decoder=a.decoder,
                       location_prior=None if a.location_prior < 0 else a.location_prior,
                       max_regions=a.max_regions, area_cap=a.area_cap, region_score=a.region_score, sam2=a.sam2, dinov2=a.dinov2, pooling=a.pooling, image_size=a.image_size,
                       device=a.device, memory_cache=a.memory_cache, random_weights=a.random_weights_for_testing,
                       sam2_variant=a.sam2_variant)


def _preprocess(a: argparse.Namespace):
    from .pipeline import Preprocess

    return Preprocess(axis=a.axis, modality=a.modality, ct_window=a.ct_window)


# -- weights ---------------------------------------------------------------------------------------
def cmd_weights(a: argparse.Namespace) -> int:
    from . import weights

    root = Path(a.dir) if a.dir else None
    if a.action == "list":
        print(f"{'name':30s} {'kind':7s} {'state':20s} digest")
        for r in weights.list_weights(root):
            print(f"{r['name']:30s} {r['kind']:7s} {r['state']:20s} {r['digest']}")
        print(f"(in {root or weights.weights_dir()})")
        return 0
    if not a.name:
        raise RagsegError(f"weights {a.action}: name a checkpoint (see `ragseg weights list`)")
    if a.action == "fetch":
        d = weights.fetch(a.name, root=root, sha256=a.sha256, pin=a.pin, force=a.force)
        print(f"{a.name}: verified in {d}")
    else:
        print(json.dumps(weights.verify(a.name, root), indent=1))
    return 0


# -- index -----------------------------------------------------------------------------------------
def _ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray scale-out (see README: Scale out)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: alone, a local runtime; or 'auto', HOST:PORT, ray://HOST:10001 to join a cluster")
    g.add_argument("--actors", type=int, default=0, help="worker actors (default: as many as the CPUs/GPUs allow)")
    g.add_argument("--threads-per-actor", type=int, default=0,
                   help="torch threads (and CPUs reserved) per actor (default: node CPUs / actors per node, max "
                        f"{defaults.RAY_MAX_THREADS})")
    g.add_argument("--gpus-per-actor", type=float, default=-1, help="default: 1 when the cluster has GPUs, else 0")
    g.add_argument("--max-retries", type=int, default=defaults.RAY_MAX_RETRIES,
                   help="resubmissions of a volume whose worker died (default: %(default)s)")


def _ray_options(a: argparse.Namespace):
    from .scale import RayOptions

    return RayOptions(address=a.ray, actors=a.actors, threads=a.threads_per_actor, gpus_per_actor=a.gpus_per_actor,
                      max_retries=a.max_retries)


def cmd_index_build(a: argparse.Namespace) -> int:
    from .pipeline import discover_pairs, open_index, sync_index

    t0 = time.time()
    items = discover_pairs(a.images, a.labels)
    if not items:
        raise RagsegError(f"no image in {a.images} has a label of the same name in {a.labels}")
    cfg = _model_config(a)
    if a.ray is not None:
        from .scale import sync_index_ray

        index, rep = sync_index_ray(a.index, cfg, _preprocess(a), items, kind=a.kind, opts=_ray_options(a),
                                    remove_missing=not a.keep_missing)
    else:
        from .factory import ModelSet

        emb = ModelSet(cfg).embedder()
        index = open_index(a.index, emb, _preprocess(a), kind=a.kind)
        rep = sync_index(index, emb, _preprocess(a), items, remove_missing=not a.keep_missing, progress=True)
    print(f"index {a.index}: {len(index)} slices from {len(index.images())} images ({rep})")
    _write_json(Path(a.summary) if a.summary else Path(a.index) / "build-summary.json",
                dict(asdict(rep), seconds=round(time.time() - t0, 3), run=rep.run or {"mode": "local"}))
    for k, v in rep.failed.items():
        print(f"  failed {k}: {v}", file=sys.stderr)
    return 1 if rep.failed else 0


def _write_json(path: Path, obj: dict) -> None:
    from .atomic import atomic_write

    with atomic_write(path, "w", suffix=".json") as fh:
        json.dump(obj, fh, indent=1)
    print(f"summary: {path}")


def _supports_index(a: argparse.Namespace, emb, pre):
    """--supports DIR: an index directory, or a dataset folder (images + labels[/final])."""
    from .pipeline import discover_pairs, index_id, open_index, sync_index

    d = Path(a.supports)
    if (d / "index.npz").exists():
        idx = open_index(d, emb, pre)
        if idx.stale_reason:
            raise RagsegError(f"{d}: {idx.stale_reason}; rebuild it with `ragseg index build`")
        return idx
    labels = next((p for p in (d / "labels" / "final", d / "labels") if p.is_dir()), None)
    if labels is None:
        raise RagsegError(f"{d}: neither an index directory (index.npz) nor a dataset with a labels/ folder")
    import hashlib

    sub = hashlib.sha256(index_id(emb, pre).encode()).hexdigest()[:12]
    idx = open_index(d / ".ragseg" / f"index-{sub}", emb, pre)
    rep = sync_index(idx, emb, pre, discover_pairs(d, labels), progress=True)
    logger.info("support index %s", rep)
    return idx


def cmd_segment(a: argparse.Namespace) -> int:
    from .factory import ModelSet
    from .pipeline import Segmenter
    from .volume import image_id_of, load_image, save_label

    cfg = _model_config(a)
    pre = _preprocess(a)
    img = load_image(a.image)  # fail fast on a bad input, before loading models
    out = Path(a.output) if a.output else Path(a.image).with_name(f"{image_id_of(a.image)}_seg.nii.gz")
    models = ModelSet(cfg)
    logger.info("backend %s (%s)", models.backend, models.backend_reason)
    emb = models.embedder()
    eng = models.engine()
    index = _supports_index(a, emb, pre)
    if len(index) == 0:
        raise RagsegError(f"{a.supports}: no labeled slice to use as support")
    seg = Segmenter(eng, emb, index, pre, k=a.k, allow_same_image=not a.exclude_same_image, propagate=a.propagate)
    labels = [int(x) for x in a.labels.split(",")] if a.labels else None
    res = seg.segment_volume(img, image_id=image_id_of(a.image), labels=labels, progress=True)
    save_label(out, res.label_map, img, dtype="uint8" if res.label_map.max() < 256 else "uint16")
    for v in res.missing_labels:
        print(f"warning: label {v} has no labeled slice in the support pool; not segmented", file=sys.stderr)
    counts = {int(v): int((res.label_map == v).sum()) for v in sorted(res.supports)}
    print(json.dumps({"output": str(out), "voxels_per_label": counts, "missing_labels": res.missing_labels}))
    return 0


def cmd_sample_data(a: argparse.Namespace) -> int:
    from .synthetic import make_dataset

    ids = make_dataset(a.dir, n_subjects=a.subjects, n_labeled=a.labeled, seed=a.seed,
                       partial_slices=a.partial_slices)
    print(f"wrote {len(ids)} subjects to {a.dir} ({a.labeled} with labels in labels/final)")
    return 0


def cmd_label_all(a: argparse.Namespace) -> int:
    from . import label_all

    if a.target.startswith(("http://", "https://")) and a.ray is not None:
        raise RagsegError("--ray runs on a local datastore folder; for a server, start it with "
                          "--conf ray_address ADDRESS and use --batch")
    if a.target.startswith(("http://", "https://")) and a.batch:
        rep = label_all.label_server_batch(a.target, model=a.model, redo=a.redo, params={"k": a.k} if a.k else None)
    elif a.target.startswith(("http://", "https://")):
        rep = label_all.label_server(a.target, model=a.model, redo=a.redo, limit=a.limit,
                                     params={"k": a.k} if a.k else None)
    else:
        root = Path(a.target)
        if not root.is_dir():
            raise RagsegError(f"{root}: not a datastore folder (or give a server URL)")
        if a.ray is not None:
            from .scale import label_ray

            rep = label_ray(root, _model_config(a), _preprocess(a), k=a.k or defaults.DEFAULT_K, opts=_ray_options(a),
                            redo=a.redo, limit=a.limit)
        else:
            factory = label_all.local_segmenter_factory(root, _model_config(a), _preprocess(a),
                                                        a.k or defaults.DEFAULT_K)
            rep = label_all.label_local(root, factory, redo=a.redo, limit=a.limit)
        summary = Path(a.summary) if a.summary else root / ".ragseg" / "label-all-summary.json"
        rep.write(summary)
        print(f"summary: {summary}")
    print(rep.summary())
    for k, v in rep.failed.items():
        print(f"  failed {k}: {v}", file=sys.stderr)
    if rep.interrupted:
        return 130
    return 1 if rep.failed else 0


def _classes(spec: str) -> dict[str, int]:
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, val = part.partition("=")
        if not val.strip().isdigit():
            raise RagsegError(f"--classes: expected name=value pairs like liver=5, got {part!r}")
        out[name.strip()] = int(val)
    return out


def _ints(flag: str, spec: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise RagsegError(f"{flag}: expected comma-separated integers, got {spec!r}") from None


def _eval_config(a: argparse.Namespace):
    """The EvalConfig of parsed ``ragseg evaluate`` arguments."""
    from .evaluate import EvalConfig

    return EvalConfig(images=a.images, labels=a.labels, out=a.out, classes=_classes(a.classes), mode=a.mode,
                     n_support=_ints("--n-support", a.n_support), ks=_ints("--k", a.k), seeds=_ints("--seeds", a.seeds),
                     methods=[m.strip() for m in a.methods.split(",") if m.strip()], modality=a.modality,
                     ct_window=a.ct_window, axis=a.axis, backend=a.backend, retrieval=a.retrieval,
                     location_prior=None if a.location_prior < 0 else a.location_prior, max_regions=a.max_regions,
                     area_cap=a.area_cap, region_score=a.region_score,
                     finetune_epochs=a.finetune_epochs, finetune_retrieved=a.retrieved_episodes,
                     finetune_augment=a.augment_copies, finetune_precision=a.precision,
                     finetune_image_branch=a.image_branch, finetune_members=a.decoders,
                     baseline_iters=a.baseline_iters,
                     baseline_time_s=a.baseline_time, baseline_size=a.baseline_size, keep_largest=not a.no_keep_largest,
                     save_predictions=a.save_predictions, figures=not a.no_figures, image_suffix=a.image_suffix,
                     feature_cache=a.feature_cache, image_size=a.image_size,
                     random_weights=a.random_weights_for_testing, sam2_variant=a.sam2_variant,
                     sam2=a.sam2, dinov2=a.dinov2, pooling=a.pooling, device=a.device, memory_cache=a.memory_cache,
                     label_suffix=a.label_suffix, subjects=[x for x in a.subjects.split(",") if x],
                     **({"group_pattern": a.group_by} if a.group_by else {}))


def config_from_command(command: str):
    """The EvalConfig a printed ``ragseg evaluate ...`` command line ran with (options it left out
    take today's defaults): how ``evaluate-merge`` reads a run that kept only its table."""
    import shlex

    argv = shlex.split(command)
    if argv[:2] != ["ragseg", "evaluate"]:
        raise ValueError("not a ragseg evaluate command")
    return _eval_config(build_parser().parse_args(argv[1:]))


def cmd_evaluate(a: argparse.Namespace) -> int:
    import shlex

    from .evaluate import run_evaluation

    if a.decoder:  # it would be silently unused: the harness trains its decoders on each case's pool
        raise RagsegError("evaluate trains a decoder on each case's labeled pool (method finetuned) and does not "
                          "take --decoder; a decoder trained elsewhere may have seen the query patients")
    if a.random_weights_for_testing:
        print("WARNING: --random-weights-for-testing: models have RANDOM weights; numbers are meaningless",
              file=sys.stderr)
    cfg = _eval_config(a)
    summ = run_evaluation(cfg, command="ragseg " + " ".join(shlex.quote(x) for x in sys.argv[1:]))
    print((Path(a.out) / "summary.md").read_text())
    print(f"wrote {a.out}/results.csv, summary.md, cases.json" + (", dice_by_k.png" if cfg.figures else ""))
    return 0 if summ else 1


def cmd_evaluate_merge(a: argparse.Namespace) -> int:
    import shlex

    from .evaluate import merge_runs

    command = "ragseg evaluate-merge " + " ".join(shlex.quote(x) for x in [*a.runs, "--out", a.out]) \
        + (" --replace" if a.replace else "") + (" --no-figures" if a.no_figures else "")
    summ = merge_runs(a.runs, a.out, command=command, figures=not a.no_figures, config_of=config_from_command,
                      replace=a.replace)
    print((Path(a.out) / "summary.md").read_text())
    print(f"wrote {a.out}/results.csv, summary.md, cases.json and figures")
    return 0 if summ else 1


def cmd_finetune(a: argparse.Namespace) -> int:
    from .factory import ModelSet
    from .fewshot import LiteMedSamAdapter, Sam2Adapter
    from .pipeline import discover_pairs
    from .training import train_decoder

    cfg = _model_config(a)
    items = discover_pairs(a.images, a.labels, image_suffix=a.image_suffix, label_suffix=a.label_suffix)
    if not items:
        raise RagsegError(f"no image in {a.images} has a label of the same name in {a.labels or a.images}")
    models = ModelSet(cfg)
    if a.backbone == "sam2":
        from .factory import load_engine

        adapter = Sam2Adapter(load_engine(cfg))
    else:
        adapter = LiteMedSamAdapter(models.lite())
    res = train_decoder(items, adapter, _preprocess(a), a.out, labels=_ints("--classes", a.classes) or None,
                        epochs=a.epochs, lr=a.lr, k=a.k, use_box=not a.no_box, seed=a.seed, progress=True,
                        location_prior=cfg.location_prior, area_cap=cfg.area_cap, retrieved=a.retrieved_episodes,
                        augment=a.augment_copies, precision=a.precision, image_branch=a.image_branch,
                        members=a.decoders)
    per_epoch = np.mean([h["seconds"] for h in res.history])
    print(json.dumps({"output": a.out, "epochs": len(res.history), "best_epoch": res.best_epoch,
                      "best_metric": round(res.best_metric, 4), "averaged_epochs": res.averaged, "first_loss": round(res.history[0]["loss"], 4),
                      "last_loss": round(res.history[-1]["loss"], 4), "encode_s": round(res.encode_s, 2),
                      "epoch_s": round(float(per_epoch), 3), "precision": res.precision,
                      "decoders": max(1, len(res.members))}))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import main_bench, main_index

    if a.section == "index":
        return main_index(a.slices, a.slice_size, not a.no_memories, a.json)
    if a.section == "scale":
        from .bench import main_scale

        if a.quick:  # CI smoke: one Ray configuration (each one starts its actors, ~10 s)
            return main_scale(3, (48, 44, 8), (2,), True, a.json)
        return main_scale(a.volumes, (a.slice_size, a.slice_size, a.slices), tuple(_ints("--actors", a.actors)),
                          a.random_weights_for_testing, a.json)
    if a.section == "litemedsam":
        from .bench import main_litemedsam

        return main_litemedsam(2 if a.quick else 6, 4 if a.quick else a.slices, a.json)
    if a.quick:  # CI smoke size
        a.slices, a.slice_size, a.image_size, a.naive_slices = 4, 64, 128, 2
        a.retrieval_sizes = "1000,5000"
    sections = ("volume", "retrieval") if a.section == "all" else (a.section,)
    return main_bench(sections, n_slices=a.slices, size=a.slice_size, sam2_size=a.image_size,
                      ks=tuple(int(x) for x in a.k.split(",")), naive_slices=a.naive_slices,
                      retrieval_sizes=tuple(int(float(x)) for x in a.retrieval_sizes.split(",")),
                      json_path=a.json, quick=a.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ragseg", description="Few-shot segmentation with retrieval-augmented SAM 2")
    p.add_argument("--version", action="version", version=f"ragseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads in this process (default: every core)")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("weights", help="list, fetch (with SHA-256 check) or verify official checkpoints")
    w.add_argument("action", choices=("list", "fetch", "verify"))
    w.add_argument("name", nargs="?")
    w.add_argument("--dir", help="weights directory (default $RAGSEG_WEIGHTS_DIR or ~/.cache/ragseg/weights)")
    w.add_argument("--sha256", help="expected digest, for files whose digest the registry lacks")
    w.add_argument("--pin", action="store_true", help="trust the first download and record its digest")
    w.add_argument("--force", action="store_true", help="download again even if verified")
    w.set_defaults(func=cmd_weights)

    ix = sub.add_parser("index", help="build the labeled-slice index")
    ixs = ix.add_subparsers(dest="index_command", required=True)
    b = ixs.add_parser("build", help="index every labeled slice of IMAGES with labels in LABELS")
    b.add_argument("images")
    b.add_argument("labels")
    b.add_argument("--index", required=True, help="index directory")
    b.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf", "hnsw"))
    b.add_argument("--keep-missing", action="store_true", help="keep indexed images that have no label now")
    b.add_argument("--summary", default=None, metavar="FILE", help="summary JSON (default: INDEX/build-summary.json)")
    _ray_args(b)
    _model_args(b)
    b.set_defaults(func=cmd_index_build)

    s = sub.add_parser("segment", help="segment IMAGE from labeled supports; writes a label file")
    s.add_argument("image")
    s.add_argument("--supports", required=True, help="index directory, or dataset folder with labels/")
    s.add_argument("-o", "--output", help="label file to write (.nii.gz or .nrrd; default IMAGE_seg.nii.gz)")
    s.add_argument("-k", type=int, default=defaults.DEFAULT_K, help="supports per label (default %(default)s)")
    s.add_argument("--labels", help="comma-separated label values (default: all in the pool)")
    s.add_argument("--propagate", action="store_true", help="3D consistency: track through neighbouring slices")
    s.add_argument("--exclude-same-image", action="store_true",
                   help="never use labeled slices of IMAGE itself as supports")
    _model_args(s)
    s.set_defaults(func=cmd_segment)

    sd = sub.add_parser("sample-data", help="write a small synthetic dataset (MONAI Label layout)")
    sd.add_argument("dir")
    sd.add_argument("--subjects", type=int, default=6)
    sd.add_argument("--labeled", type=int, default=2)
    sd.add_argument("--partial-slices", type=int, default=0)
    sd.add_argument("--seed", type=int, default=0)
    sd.set_defaults(func=cmd_sample_data)
    la = sub.add_parser("label-all", help="segment every unlabeled image of a datastore folder or server")
    la.add_argument("target", help="local datastore folder, or MONAI Label server URL")
    la.add_argument("--model", default="ragseg", help="server model name (server mode)")
    la.add_argument("-k", type=int, default=None, help="supports per label")
    la.add_argument("--redo", action="store_true", help="recompute images that already have an original label")
    la.add_argument("--limit", type=int, default=None, help="label at most this many images")
    la.add_argument("--batch", action="store_true",
                    help="server mode: one POST /batch/infer/<model> (server-side subprocess) instead of per-image calls")
    _model_args(la)
    la.add_argument("--summary", default=None, metavar="FILE",
                    help="summary JSON (local datastore; default: TARGET/.ragseg/label-all-summary.json)")
    _ray_args(la)
    la.set_defaults(func=cmd_label_all)

    ev = sub.add_parser("evaluate", help="few-shot evaluation (Dice, HD95) against baselines; CSV, table, figures")
    ev.add_argument("images", help="image folder")
    ev.add_argument("labels", nargs="?", default=None, help="label folder (default: the image folder)")
    ev.add_argument("--image-suffix", default="", help="image ids end with this (removed to pair), e.g. _flair")
    ev.add_argument("--label-suffix", default="", help="label ids end with this (removed to pair), e.g. _labels")
    ev.add_argument("--subjects", default="", help="only these subject ids, comma-separated")
    ev.add_argument("--group-by", default=None, metavar="REGEX",
                    help="loso: regex whose first group is a volume's patient; volumes of one patient are never "
                         r"split between pool and queries (default: '^(.+?)(?:_frame\d+)?$', ACDC's naming)")
    ev.add_argument("--classes", required=True, help="name=value pairs to evaluate, e.g. liver=5,spleen=1")
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--mode", choices=("intra", "loso", "cross"), default="intra",
                    help="intra: n labeled slices per class of each volume; loso: leave one patient out; "
                         "cross: n random labeled patients per seed, the patients outside the largest pool queried")
    ev.add_argument("--n-support", default="3",
                    help="labeled slices per class (intra) or patients (loso); several, comma-separated, give a "
                         "learning curve (learning_curve.png), e.g. 1,2,4,8 (default: %(default)s)")
    ev.add_argument("--k", default="1,3", help="supports per query slice, comma-separated (default: %(default)s)")
    ev.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    ev.add_argument("--methods", default="retrieved,random,finetuned,gt-box,unet,dynunet",
                    help="default: %(default)s")
    ev.add_argument("--finetune-epochs", type=int, default=defaults.FINETUNE_EPOCHS)
    ev.add_argument("--retrieved-episodes", type=_share, default=defaults.FINETUNE_RETRIEVED, metavar="SHARE",
                    help="share of fine-tuning episodes whose supports are the pool slices most like the query, "
                         "as retrieval serves them (the rest random; default: %(default)s)")
    ev.add_argument("--augment-copies", type=_count, default=defaults.FINETUNE_AUGMENT, metavar="N",
                    help="fine-tuning: augmented copies of each pool slice framed by background encoded with it "
                         "(rotation, scale, shift, intensity; tissue-to-the-edge crops get none; 0: none; "
                         "default: %(default)s)")
    ev.add_argument("--precision", choices=defaults.FINETUNE_PRECISIONS, default=defaults.FINETUNE_PRECISION,
                    help=_PRECISION_HELP)
    ev.add_argument("--image-branch", choices=defaults.FINETUNE_IMAGE_BRANCHES, default=defaults.FINETUNE_IMAGE_BRANCH,
                    help=_IMAGE_BRANCH_HELP)
    ev.add_argument("--decoders", type=_members, default=defaults.FINETUNE_MEMBERS, metavar="N", help=_DECODERS_HELP)
    ev.add_argument("--baseline-iters", type=int, default=defaults.BASELINE_MAX_ITERS,
                    help="unet/dynunet: iteration cap (early stopping usually ends sooner; default: %(default)s)")
    ev.add_argument("--baseline-time", type=float, default=defaults.BASELINE_TIME_LIMIT_S, metavar="SECONDS",
                    help="unet/dynunet: wall-clock cap per training (default: %(default)s)")
    ev.add_argument("--baseline-size", type=_baseline_size, default=defaults.BASELINE_SIZE, metavar="PX|auto",
                    help="unet/dynunet: every slice resized to PX x PX, a multiple of 32; auto: the labeled "
                         f"slices' median long side rounded up to one, at most {defaults.BASELINE_MAX_SIZE} "
                         "(default: auto)")
    ev.add_argument("--no-keep-largest", action="store_true",
                    help="keep every connected component of labels the pool shows as one 3D structure "
                         "(ablation of the served label rule; applies to every method but gt-box)")
    ev.add_argument("--save-predictions", action="store_true", help="also write predictions/ and overlay PNGs")
    ev.add_argument("--no-figures", action="store_true")
    ev.add_argument("--feature-cache", default=None, metavar="DIR",
                    help="keep LiteMedSAM slice embeddings in DIR (2 MB per slice) so a re-run does not re-encode")
    _model_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    em = sub.add_parser("evaluate-merge", help="report several evaluate runs of one data set as one "
                        "(other seeds, baselines run apart): table, intervals, learning curve")
    em.add_argument("runs", nargs="+", metavar="RUN", help="evaluate --out folders (results.csv + cases.json; a folder holding only "
                    "results.csv and summary.md, as docs/results keeps them, is read with the settings of the "
                    "command on the summary's first line)")
    em.add_argument("--out", required=True, help="folder for the merged results.csv, summary.md and figures")
    em.add_argument("--replace", action="store_true", help="a later RUN's rows replace an earlier one's for the same "
                    "case, method and k (a method re-run after a fix) instead of being refused")
    em.add_argument("--no-figures", action="store_true")
    em.set_defaults(func=cmd_evaluate_merge)

    ft = sub.add_parser("finetune", help="fine-tune a prototype-prompted mask decoder on labeled slices")
    ft.add_argument("images", help="image folder")
    ft.add_argument("labels", nargs="?", default=None, help="label folder (default: the image folder)")
    ft.add_argument("--image-suffix", default="")
    ft.add_argument("--label-suffix", default="")
    ft.add_argument("--out", required=True, help="decoder folder to write (decoder.pt + manifest.json)")
    ft.add_argument("--backbone", choices=("litemedsam", "sam2"), default="litemedsam")
    ft.add_argument("--classes", default="", help="label values to train (default: all present)")
    ft.add_argument("--epochs", type=int, default=defaults.FINETUNE_EPOCHS)
    ft.add_argument("--lr", type=float, default=defaults.FINETUNE_LR)
    ft.add_argument("--k", type=int, default=defaults.DEFAULT_K, help="supports per training episode")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--no-box", action="store_true", help="prototype tokens only (no coarse-region box)")
    ft.add_argument("--retrieved-episodes", type=_share, default=defaults.FINETUNE_RETRIEVED, metavar="SHARE",
                    help="share of fine-tuning episodes whose supports are the pool slices most like the query, "
                         "as retrieval serves them (the rest random; default: %(default)s)")
    ft.add_argument("--augment-copies", type=_count, default=defaults.FINETUNE_AUGMENT, metavar="N",
                    help="augmented copies of each labeled slice framed by background encoded with it (rotation, "
                         "scale, shift, intensity; tissue-to-the-edge crops get none; 0: none; default: %(default)s)")
    ft.add_argument("--precision", choices=defaults.FINETUNE_PRECISIONS, default=defaults.FINETUNE_PRECISION,
                    help=_PRECISION_HELP)
    ft.add_argument("--image-branch", choices=defaults.FINETUNE_IMAGE_BRANCHES, default=defaults.FINETUNE_IMAGE_BRANCH,
                    help=_IMAGE_BRANCH_HELP)
    ft.add_argument("--decoders", type=_members, default=defaults.FINETUNE_MEMBERS, metavar="N", help=_DECODERS_HELP)
    _model_args(ft)
    ft.set_defaults(func=cmd_finetune)

    be = sub.add_parser("bench", help="benchmarks (random weights; prints tables, --json writes them)")
    be.add_argument("section", nargs="?", default="all", choices=("all", "volume", "retrieval", "index", "litemedsam", "scale"),
                    help="volume: per-stage time vs naive; retrieval: index scale; index: label save -> indexed; "
                         "litemedsam: encoder variants and a fine-tuning epoch (real LiteMedSAM weights); "
                         "scale: label-all throughput, single process vs 1, 2, ... Ray actors (LiteMedSAM; "
                         "--volumes, --slices, --slice-size, --actors)")
    be.add_argument("--slices", type=int, default=100, help="slices in the volume")
    be.add_argument("--slice-size", type=int, default=512, help="in-plane size of the volume")
    be.add_argument("--image-size", type=int, default=512, help="SAM 2 input size")
    be.add_argument("-k", default="1,3,7", help="comma-separated support counts")
    be.add_argument("--naive-slices", type=int, default=8, help="query slices measured on the naive path per k")
    be.add_argument("--retrieval-sizes", default="1e3,1e4,1e5,1e6")
    be.add_argument("--no-memories", action="store_true", help="index: skip support-memory pre-computation")
    be.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test)")
    be.add_argument("--json", help="also write the results here")
    be.add_argument("--volumes", type=int, default=8, help="scale: volumes to label")
    be.add_argument("--actors", default="1,2", help="scale: Ray actor counts to compare, comma-separated")
    be.add_argument("--random-weights-for-testing", action="store_true",
                    help="scale: RAG-SAM 2 with random weights instead of LiteMedSAM")
    be.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        from .factory import set_threads

        set_threads(a.threads or None)
        return int(a.func(a) or 0)
    except RagsegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
