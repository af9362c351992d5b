"""Evaluation harness: few-shot segmentation quality as numbers from a command.

``ragseg evaluate IMAGES LABELS --classes liver=5,spleen=1 --mode intra|loso --out DIR``

Protocols:

* ``intra``: per volume, ``n_support`` slices of each class are "labeled" (one per equal-width
  bin of the class's slice range, chosen by the seed; on a labeled slice every evaluated class
  is labeled, as an annotator would); every other slice is segmented from them.
* ``loso``: leave one patient out; the labeled slices of ``n_support`` other patients (chosen
  by the seed) are the pool; every slice of each volume of the held-out patient is segmented.
  Volumes are grouped into patients by ``group_pattern`` (default: ``patient001_frame01`` and
  ``patient001_frame12`` are one patient), so two volumes of one heart are never on both sides.
* ``cross``: held-out patients: per seed, ``n_support`` random patients are labeled (nested over
  a learning curve's n) and the patients outside the largest pool are segmented; a model trained
  on a pool (fine-tuned decoder, UNets) is trained once and serves all of that pool's queries.

``n_support`` may list several values (a learning curve). Confidence intervals are over
patients: a patient's cases (its volumes, seeds) are averaged first.

Methods (each on the same cases and seeds):

* ``retrieved``: the product path: the pool is written as label files (only its labeled slices
  carry labels, as an annotator leaves them), indexed with :class:`ragseg.index.SliceIndex`
  (:func:`ragseg.pipeline.sync_index`) and segmented by :class:`ragseg.pipeline.Segmenter`, the
  code the server's infer task runs; so a number here is what the server gives for the same
  labeled slices;
* ``random``: the same backend with k supports drawn at random from the pool (baseline a);
* ``finetuned``: LiteMedSAM with a prototype decoder fine-tuned on the pool, through the same
  index and Segmenter;
* ``gt-box``: the decoder prompted with the ground truth's boxes (one per connected component;
  baseline b, the ceiling of a box-prompted decoder);
* ``unet`` and ``dynunet``: supervised networks trained on the pool slices only (baselines c and
  d; :mod:`ragseg.baselines`: class-balanced, augmented, early-stopped on held-out pool
  patients, time-capped).

Per case and class: Dice and 95% Hausdorff distance (MONAI metrics, mm, on the evaluated
slices; HD95 is NaN when the prediction or the truth is empty). Writes ``results.csv``,
``summary.md`` and PNG figures (Dice by k; overlays of the best and worst cases), and with
``save_predictions`` the predicted label maps (canonical slices, ``predictions/*.npz``).
:func:`merge_runs` (``ragseg evaluate-merge``) reports several runs of one data set as one, so a
second seed or the baselines can run in another session.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import defaults, layout
from .engine import Support
from .errors import RagsegError
from .pipeline import (
    LabeledVolume,
    Preprocess,
    Segmenter,
    discover_pairs,
    logits_to_labels,
    open_index,
    patient_of,
    sync_index,
)
from .volume import Volume, load_image, load_label, save_label, slice_spacing, slices_to_volume

logger = logging.getLogger(__name__)

MODES = ("intra", "loso", "cross")
METHODS = ("retrieved", "random", "finetuned", "gt-box", "unet", "dynunet")
DEFAULT_GROUP_PATTERN = defaults.PATIENT_PATTERN  # ACDC: patientNNN_frameXX -> patientNNN
K_FREE = ("gt-box", "unet", "dynunet")  # methods that use no supports (k reported as 0)
CSV_COLUMNS = ("case", "subject", "patient", "n_support", "seed", "method", "k", "class", "label", "dice", "hd95",
               "gt_voxels", "pred_voxels", "query_slices", "seconds")


@dataclass
class EvalConfig:
    """Options of one evaluation run (the CLI flags one to one)."""

    images: str
    labels: str | None
    out: str
    classes: dict[str, int]
    mode: str = "intra"
    # labeled slices per class (intra) or labeled patients (loso); several values: a learning curve
    n_support: list[int] = field(default_factory=lambda: [3])
    ks: list[int] = field(default_factory=lambda: [1, 3])
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    modality: str = "auto"
    ct_window: str = defaults.DEFAULT_CT_WINDOW
    axis: str = "axial"
    backend: str = "litemedsam"
    retrieval: str = "auto"
    location_prior: int | None = defaults.LOCATION_PRIOR
    max_regions: int = defaults.MAX_REGIONS
    area_cap: float | None = defaults.REGION_AREA_CAP
    region_score: str = defaults.REGION_SCORE  # box prompts' cell score: prototype / linear (ragseg.cellscore)
    finetune_epochs: int = defaults.FINETUNE_EPOCHS
    finetune_retrieved: float = defaults.FINETUNE_RETRIEVED  # share of retrieved-like training episodes
    finetune_augment: int = defaults.FINETUNE_AUGMENT  # augmented copies of each pool slice for fine-tuning
    finetune_precision: str = defaults.FINETUNE_PRECISION  # auto / bf16 / float32 (ragseg.precision)
    finetune_image_branch: str | bool = defaults.FINETUNE_IMAGE_BRANCH  # decoder reads the slice: auto / True / False
    finetune_members: int = defaults.FINETUNE_MEMBERS  # fine-tunings per pool averaged into one decoder
    keep_largest: bool = defaults.KEEP_LARGEST_COMPONENT  # one-structure labels: largest 3D component only
    baseline_iters: int = defaults.BASELINE_MAX_ITERS  # unet / dynunet: iteration cap
    baseline_time_s: float = defaults.BASELINE_TIME_LIMIT_S  # unet / dynunet: wall-clock cap per training
    baseline_size: int | None = defaults.BASELINE_SIZE  # unet / dynunet: slices resized to this side (None: pool's)
    save_predictions: bool = False
    figures: bool = True
    feature_cache: str | None = None  # folder keeping LiteMedSAM slice embeddings across runs
    image_size: int = defaults.SAM2_IMAGE_SIZE  # SAM 2 input size (rag-sam2 backend)
    random_weights: bool = False  # TESTS ONLY: same architectures, random weights (CI smoke of rag-sam2)
    sam2_variant: str = "hiera_t"  # with random_weights
    sam2: str = "sam2.1-hiera-tiny"  # SAM 2.1 registry name or checkpoint path (rag-sam2 backend)
    dinov2: str = "dinov2-small"  # DINOv2 registry name, hub id or folder (dinov2 retrieval)
    pooling: str = "cls"  # DINOv2 pooling: cls / mean
    device: str = "auto"  # auto / cpu / cuda[:n]
    memory_cache: str | None = None  # folder of cached SAM 2 support memories (rag-sam2 backend)
    image_suffix: str = ""
    label_suffix: str = ""
    subjects: list[str] = field(default_factory=list)  # only these ids (default: all)
    # regex on a volume id whose first group names its patient (loso never splits a patient)
    group_pattern: str = DEFAULT_GROUP_PATTERN

    def validate(self) -> None:
        if self.mode not in MODES:
            raise RagsegError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise RagsegError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        if not self.classes:
            raise RagsegError("name the classes to evaluate, e.g. --classes liver=5,spleen=1")
        if isinstance(self.n_support, int):
            self.n_support = [self.n_support]
        if not self.n_support or min(self.n_support) < 1 or any(k < 1 for k in self.ks):
            raise RagsegError("n_support and every k must be >= 1")
        from .baselines import check_size

        check_size(self.baseline_size)  # fail before any encoding, not at the baselines
        try:
            if re.compile(self.group_pattern).groups < 1:
                raise RagsegError(f"group pattern {self.group_pattern!r} needs a capture group (the patient)")
        except re.error as e:
            raise RagsegError(f"group pattern {self.group_pattern!r}: {e}") from None


@dataclass
class Subject:
    id: str
    slices: np.ndarray  # [n, H, W] in [0, 1], canonical
    labels: np.ndarray  # [n, H, W] int, canonical
    spacing: tuple[float, float, float]  # mm, in the [n, H, W] order of the slices
    image: Volume | None = None  # the image as loaded (its path and grid), for the pool's label files
    group: str = ""  # the patient this volume belongs to (see EvalConfig.group_pattern)


@dataclass
class Case:
    """One evaluation unit: a query subject, its query slices, and the labeled pool."""

    name: str
    seed: int
    query: Subject
    query_slices: list[int]
    pool: list[tuple[Subject, int]]  # (subject, slice) labeled for every evaluated class
    n_support: int = 0  # labeled slices per class (intra) or labeled patients (loso)

    @property
    def pool_key(self) -> str:
        """Identifies the labeled pool: cases with the same pool share its index and trained models."""
        import hashlib

        return hashlib.sha1("|".join(f"{s.id}:{z}" for s, z in self.pool).encode()).hexdigest()[:16]


def _load_subjects(cfg: EvalConfig, pre: Preprocess, progress: bool = False) -> list[Subject]:
    items = discover_pairs(cfg.images, cfg.labels, image_suffix=cfg.image_suffix, label_suffix=cfg.label_suffix)
    if cfg.subjects:
        items = [it for it in items if it.image_id in cfg.subjects]
    if not items:
        raise RagsegError(f"no image in {cfg.images} has a label of the same name in {cfg.labels}")
    out = []
    for it in tqdm(items, desc="loading volumes", unit="vol", disable=not progress):
        img = load_image(it.image_path)
        lab = load_label(it.label_path, like=img)
        sp = slice_spacing(img.affine, pre.axis_index)
        group = patient_of(it.image_id, cfg.group_pattern)
        out.append(Subject(it.image_id, pre.slices(img), pre.label_slices(lab).astype(np.int32), sp, img, group))
    return out


def _intra_cases(subjects: list[Subject], cfg: EvalConfig) -> list[Case]:
    cases = []
    for subj in subjects:
        for n in cfg.n_support:
            for seed in cfg.seeds:
                rng = np.random.default_rng(seed)
                pool: set[int] = set()
                for v in cfg.classes.values():
                    zs = np.nonzero((subj.labels == v).any((1, 2)))[0]
                    if len(zs) == 0:
                        continue
                    bins = np.array_split(zs, min(n, len(zs)))
                    pool.update(int(rng.choice(b)) for b in bins)
                if not pool:
                    continue
                q = [z for z in range(len(subj.slices)) if z not in pool]
                cases.append(Case(f"{subj.id}-n{n}-s{seed}", seed, subj, q, [(subj, z) for z in sorted(pool)], n))
    return cases


def _groups(subjects: list[Subject], cfg: EvalConfig) -> dict[str, list[Subject]]:
    groups: dict[str, list[Subject]] = {}
    for s in subjects:
        groups.setdefault(s.group or s.id, []).append(s)
    if len(groups) < 2:
        raise RagsegError(f"a {cfg.mode} evaluation needs labeled volumes of at least two patients "
                          f"(grouped by {cfg.group_pattern!r})")
    return groups


def _labeled_slices(subjects: Sequence[Subject], vals: list[int]) -> list[tuple[Subject, int]]:
    """Every slice of these volumes that carries an evaluated class (an annotated patient)."""
    return [(s, int(z)) for s in subjects for z in np.nonzero(np.isin(s.labels, vals).any((1, 2)))[0]]


def _cross_cases(subjects: list[Subject], cfg: EvalConfig) -> list[Case]:
    """Held-out patients: per seed one random order of the patients; the first n are labeled (the
    pools of a learning curve are nested) and the patients after the largest n are the queries,
    the same queries for every n. A model trained on a pool serves all its queries."""
    groups = _groups(subjects, cfg)
    names = sorted(groups)
    nmax = max(cfg.n_support)
    if nmax >= len(names):
        raise RagsegError(f"--mode cross with n = {nmax} labeled patients needs more than {nmax} patients; "
                          f"{len(names)} found")
    vals = list(cfg.classes.values())
    cases = []
    for seed in cfg.seeds:
        order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
        queries = sorted(order[nmax:])
        for n in cfg.n_support:
            pool = _labeled_slices([s for g in sorted(order[:n]) for s in groups[g]], vals)
            for g in queries:
                for subj in groups[g]:
                    cases.append(Case(f"{subj.id}-n{n}-s{seed}", seed, subj, list(range(len(subj.slices))), pool, n))
    return cases


def _loso_cases(subjects: list[Subject], cfg: EvalConfig) -> list[Case]:
    """Leave one patient out; per seed the labeled patients are the first n of one random order
    of the others, so the pools of a learning curve are nested (n=2 holds n=1's patient)."""
    groups = _groups(subjects, cfg)
    names = sorted(groups)
    vals = list(cfg.classes.values())
    cases = []
    for g in names:
        others = [n for n in names if n != g]
        for seed in cfg.seeds:
            order = np.random.default_rng(seed).permutation(len(others))  # the same for every volume of g
            for n in cfg.n_support:
                pick = sorted(order[:min(n, len(others))].tolist())
                pool = _labeled_slices([s for j in pick for s in groups[others[j]]], vals)
                for subj in groups[g]:
                    cases.append(Case(f"{subj.id}-n{n}-s{seed}", seed, subj, list(range(len(subj.slices))), pool, n))
    return cases


# --- metrics -------------------------------------------------------------------------------------
def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary arrays (1.0 when both are empty)."""
    p, g = pred.astype(bool), gt.astype(bool)
    s = p.sum() + g.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(p, g).sum() / s)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95% Hausdorff distance in mm (MONAI); NaN when either mask is empty."""
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not gt.any():
        return float("nan")
    p = torch.from_numpy(pred.astype(np.float32))[None, None]
    g = torch.from_numpy(gt.astype(np.float32))[None, None]
    return float(compute_hausdorff_distance(p, g, percentile=95, spacing=list(spacing))[0, 0])


# --- methods ---------------------------------------------------------------------------------------
class Harness:
    """Runs the methods on cases; models are built once and shared (embeddings cached)."""

    def __init__(self, cfg: EvalConfig):
        from .factory import ModelConfig, ModelSet

        cfg.validate()
        self.cfg = cfg
        self.pre = Preprocess(axis=cfg.axis, modality=cfg.modality, ct_window=cfg.ct_window)
        self.models = ModelSet(ModelConfig(backend=cfg.backend, retrieval=cfg.retrieval,
                                           location_prior=cfg.location_prior, max_regions=cfg.max_regions,
                                           area_cap=cfg.area_cap, region_score=cfg.region_score,
                                           image_size=cfg.image_size, random_weights=cfg.random_weights,
                                           sam2_variant=cfg.sam2_variant, feature_cache=cfg.feature_cache,
                                           sam2=cfg.sam2, dinov2=cfg.dinov2, pooling=cfg.pooling,
                                           device=cfg.device, memory_cache=cfg.memory_cache,
                                           # every slice of a data set stays in RAM once encoded (2 MB each)
                                           feature_cache_bytes=8 << 30))
        self.embedder = self.models.embedder()
        self.engine = self.models.engine()
        # pool key -> (labels that are one 3D structure there, (inner, outer) label pairs enclosed there)
        self._layout: dict[str, tuple[set[int], set[tuple[int, int]]]] = {}
        self.labels = list(cfg.classes.values())
        self.names = {v: k for k, v in cfg.classes.items()}
        self.case_info: dict[str, dict] = {}
        self._pool: tuple[str, object, Path] | None = None  # (pool key, its SliceIndex, its folder)
        self._trained: dict[str, tuple[object, dict, float]] = {}  # method -> (model, info, seconds) for that pool
        self._trained_pool = ""  # the pool key those models were trained on

    # supports ------------------------------------------------------------------------------------
    @staticmethod
    def _support(subj: Subject, z: int, v: int) -> Support:
        return Support(f"eval|{subj.id}|{z}|{v}", lambda: (subj.slices[z], subj.labels[z] == v))

    def random_supports(self, case: Case, k: int) -> list[list[list[Support]]]:
        """supports[l][i] for query slice i of the case: k drawn at random from the pool (baseline)."""
        rng = np.random.default_rng([case.seed, k, 7])
        out = []
        for v in self.labels:
            cand = [(s, z) for s, z in case.pool if (s.labels[z] == v).any()]
            if not cand:
                out.append([[] for _ in case.query_slices])
                continue
            kk = min(k, len(cand))
            out.append([[self._support(*cand[j], v) for j in rng.choice(len(cand), kk, replace=False)]
                        for _ in case.query_slices])
        return out

    def encode(self, subjects: list[Subject], progress: bool = True, chunk: int = 8) -> dict:
        """Encode every slice once up front (the slow stage on a CPU), with a progress bar in slices/s.

        Embeddings land in the models' content-keyed caches, so the cases reuse them. Returns the
        timing of the slices that were encoded fresh (not found in the feature cache), per chunk.
        """
        lite_too = self.models.backend == "litemedsam" and not hasattr(self.embedder, "lite")
        fc = self.models.lite().features if self.models.backend == "litemedsam" else None
        total = sum(len(s.slices) for s in subjects)
        fresh, fresh_s = 0, 0.0
        with tqdm(total=total, desc="encoding slices", unit="slice", disable=not progress) as bar:
            for s in subjects:
                for a in range(0, len(s.slices), chunk):
                    part = s.slices[a:a + chunk]
                    miss0, t = (fc.misses if fc else 0), time.perf_counter()
                    self.embedder.embed(part)
                    if lite_too:
                        self.models.lite().embeddings(part)
                    if fc is None or fc.misses > miss0:  # timed only where the encoder ran
                        fresh += len(part) if fc is None else min(len(part), fc.misses - miss0)
                        fresh_s += time.perf_counter() - t
                    bar.update(len(part))
        return {"total_slices": total, "encoded_slices": fresh, "encode_s": round(fresh_s, 2)}

    # the product path ----------------------------------------------------------------------------
    def pool_index(self, case: Case):
        """The case's pool as a datastore would hold it, indexed: partial label files + SliceIndex.

        Each pool subject gets a label file on its image's grid in which only its pool slices
        carry the evaluated classes. Built once per case (kept for every k and method).
        """
        if self._pool is not None and self._pool[0] == case.pool_key:
            return self._pool[1]
        self._drop_index()
        root = Path(tempfile.mkdtemp(prefix=f".pool-{case.pool_key}-", dir=self.cfg.out))
        by_subject: dict[str, tuple[Subject, list[int]]] = {}
        for subj, z in case.pool:
            by_subject.setdefault(subj.id, (subj, []))[1].append(z)
        items = []
        for sid, (subj, zs) in by_subject.items():
            part = np.zeros_like(subj.labels)
            keep = np.isin(subj.labels[zs], self.labels)
            part[zs] = np.where(keep, subj.labels[zs], 0)
            path = root / "labels" / f"{sid}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_label(path, slices_to_volume(part, subj.image.affine, self.pre.axis_index), subj.image,
                       dtype="uint16" if max(self.labels) > 255 else "uint8")
            items.append(LabeledVolume(sid, subj.image.path, str(path)))
        index = open_index(root / "index", self.embedder, self.pre)
        rep = sync_index(index, self.embedder, self.pre, items)
        if rep.failed:
            raise RagsegError(f"{case.name}: indexing the pool failed: {rep.failed}")
        self._pool = (case.pool_key, index, root)
        return index

    def _drop_index(self) -> None:
        if self._pool is not None:
            shutil.rmtree(self._pool[2], ignore_errors=True)
            self._pool = None

    def _drop_pool(self) -> None:
        """Forget the pool: its index (and folder) and the models trained on it."""
        self._drop_index()
        self._trained.clear()
        self._trained_pool = ""

    def trained(self, case: Case, method: str, train: Callable[[], tuple[object, dict]]) -> tuple[object, dict, bool]:
        """The model ``method`` trained on the case's pool: trained once per pool, then reused.
        Returns (model, info, whether it was trained now)."""
        if self._trained_pool != case.pool_key:  # a new pool: earlier pools' models are done with
            self._trained.clear()
            self._trained_pool = case.pool_key
        if method in self._trained:
            m, info, _ = self._trained[method]
            return m, info, False
        t = time.perf_counter()
        m, info = train()
        self._trained[method] = (m, info, time.perf_counter() - t)
        return m, info, True

    def predict_served(self, engine, case: Case, k: int) -> np.ndarray:
        """The server's path: index search + Segmenter (per-query self-exclusion, same label rule)."""
        seg = Segmenter(engine, self.embedder, self.pool_index(case), self.pre, k=k,
                        allow_same_image=self.cfg.mode == "intra", keep_largest=self.cfg.keep_largest)
        res = seg.segment_slices(case.query.slices, image_id=case.query.id, labels=self.labels,
                                 slices=case.query_slices)
        return res.labels

    # predictions ----------------------------------------------------------------------------------
    def _to_labels(self, logits: torch.Tensor, case: Case) -> np.ndarray:
        """The served label rule on logits made outside the Segmenter (same pool evidence)."""
        enclosed = self.pool_layout(case)[1] if defaults.NESTED_WINS else ()
        return logits_to_labels(logits, self.labels, nested=enclosed)

    def predict_engine(self, engine, case: Case, k: int, how: str) -> np.ndarray:
        if how == "retrieved":
            return self.predict_served(engine, case, k)
        q = case.query.slices[case.query_slices]
        kw = {}
        if getattr(engine, "fits_on_pool", False):  # the same pool the served path passes
            kw["pool"] = [[self._support(s, z, v) for s, z in case.pool if (s.labels[z] == v).any()]
                          for v in self.labels]
        logits = engine.segment_queries(q, self.random_supports(case, k), labels=self.labels, **kw)
        return self.keep_largest(case, self._to_labels(logits, case))

    def pool_layout(self, case: Case) -> tuple[set[int], set[tuple[int, int]]]:
        """What the case's labeled pool says about its labels (:mod:`ragseg.layout`), from the label
        slices pool_index writes (pool slices only): one-structure labels and enclosed pairs."""
        if case.pool_key not in self._layout:
            vols: dict[str, tuple[Subject, list[int]]] = {}
            for subj, z in case.pool:
                vols.setdefault(subj.id, (subj, []))[1].append(z)
            fr, outlines = [], []
            for subj, zs in vols.values():
                part = np.zeros_like(subj.labels)
                part[zs] = np.where(np.isin(subj.labels[zs], self.labels), subj.labels[zs], 0)
                fr.append(layout.structure_fractions(part))
                outlines.append(layout.outline_counts(part))
            self._layout[case.pool_key] = (layout.single_structures(fr), layout.enclosed_pairs(outlines))
        return self._layout[case.pool_key]

    def keep_largest(self, case: Case, pred: np.ndarray) -> np.ndarray:
        """The served label rule's last step for predictions made outside the Segmenter (random
        supports, baselines): labels the pool shows as one 3D structure keep their largest component."""
        if not self.cfg.keep_largest or case.query_slices != list(range(case.query_slices[0],
                                                                        case.query_slices[-1] + 1)):
            return pred
        return layout.keep_largest(pred, sorted(self.pool_layout(case)[0] & set(self.labels)))

    def predict_gt_box(self, case: Case) -> np.ndarray:
        from scipy import ndimage

        from .litemedsam import IMAGE_SIZE, LiteMedSAM
        from .volume import resize_logits

        lite = self.models.lite()
        q = case.query.slices[case.query_slices]
        gt = case.query.labels[case.query_slices]
        n, H, W = q.shape
        logits = torch.full((n, len(self.labels), H, W), -1024.0)
        for i in range(n):
            boxes, owners = [], []
            for li, v in enumerate(self.labels):
                lab, m = ndimage.label(gt[i] == v)
                for c in range(1, m + 1):
                    rows, cols = np.nonzero(lab == c)
                    boxes.append(LiteMedSAM.box_to_model((rows.min(), cols.min(), rows.max(), cols.max()), (H, W)))
                    owners.append(li)
            if not boxes:
                continue
            emb = lite.embeddings(q[i:i + 1])
            low = torch.full((len(self.labels), 1, IMAGE_SIZE, IMAGE_SIZE), -1024.0)
            lg = lite.decode_boxes(emb.expand(len(boxes), -1, -1, -1), torch.stack(boxes)).float()
            for j, li in enumerate(owners):
                low[li] = torch.maximum(low[li], lg[j])
            logits[i] = resize_logits(low, (H, W))[:, 0]
        return self._to_labels(logits, case)

    def _finetune_info(self, case: Case) -> tuple[object, dict]:
        t = time.perf_counter()
        eng, tr = self.train_finetuned(case)
        return eng, {"best_metric": tr.best_metric, "epochs": len(tr.history),
                     "train_s": round(time.perf_counter() - t, 1), "encode_s": tr.encode_s,
                     "exclusive": eng.decoder.exclusive, "augmented_copies": self.cfg.finetune_augment,
                     "image_branch": eng.decoder.image_branch is not None,
                     "prior_shift": eng.decoder.prior_shift, "prior_shift_iou": tr.prior_shift_iou or
                     (tr.members[0].prior_shift_iou if tr.members else {}),
                     "precision": tr.precision, "members": max(1, len(tr.members))}

    def train_finetuned(self, case: Case):
        from .augment import with_augmented_copies
        from .engine import SupportMemoryCache
        from .fewshot import (
            LiteMedSamAdapter,
            PrototypeDecoder,
            build_training_set,
            finetune_members,
            resolve_image_branch,
        )
        from .litemedsam import LiteMedSamEngine, SupportEmbedding

        adapter = LiteMedSamAdapter(self.models.lite())
        pool_sl = [s.slices[z] for s, z in case.pool]  # any in-plane sizes
        pool_lb = [s.labels[z] for s, z in case.pool]
        branch = resolve_image_branch(self.cfg.finetune_image_branch, pool_sl, adapter.input_size)

        def make(seed: int):  # one member: its copies and training set drawn with its seed
            sl, lb, groups = with_augmented_copies(pool_sl, pool_lb, [s.group or s.id for s, _ in case.pool],
                                                   self.cfg.finetune_augment, seed)
            ts = build_training_set(adapter, sl, lb, self.labels, groups=groups)
            return PrototypeDecoder(adapter, location_prior=self.cfg.location_prior, area_cap=self.cfg.area_cap,
                                    image_branch=branch, prior_shift=defaults.FINETUNE_PRIOR_SHIFT), ts

        res = finetune_members(make, self.cfg.finetune_members, seed=case.seed, epochs=self.cfg.finetune_epochs,
                               retrieved=self.cfg.finetune_retrieved, precision=self.cfg.finetune_precision)
        dec = res.decoder
        logger.info("%s: fine-tuned decoder, best train Dice %.3f at epoch %d (%.1f s/epoch)", case.name,
                    res.best_metric, res.best_epoch, np.mean([h["seconds"] for h in res.history]))
        eng = LiteMedSamEngine(self.models.lite(), cache=SupportMemoryCache(item_type=SupportEmbedding), decoder=dec,
                               location_prior=self.cfg.location_prior, max_regions=self.cfg.max_regions,
                               area_cap=self.cfg.area_cap, region_score=self.cfg.region_score)
        return eng, res

    def baseline(self, case: Case, arch: str) -> np.ndarray:
        """UNet / DynUNet trained on the case's pool (once per pool), predicting the query slices."""
        from .baselines import BaselineConfig, predict_baseline, train_baseline

        def train():
            m = train_baseline([(s.slices[z], s.labels[z]) for s, z in case.pool], self.labels,
                               groups=[s.group or s.id for s, _ in case.pool], seed=case.seed,
                               cfg=BaselineConfig(arch=arch, max_iters=self.cfg.baseline_iters, size=self.cfg.baseline_size,
                                                  time_limit_s=self.cfg.baseline_time_s))
            return m, m.info

        model, info, _ = self.trained(case, arch, train)
        self.case_info[case.name][arch] = info
        return self.keep_largest(case, predict_baseline(model, case.query.slices[case.query_slices]))

    # running ------------------------------------------------------------------------------------------
    def run(self, cases: list[Case], progress: bool = True) -> list[dict]:
        rows: list[dict] = []
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        for case in tqdm(cases, desc="cases", disable=not progress, unit="case"):
            self.case_info[case.name] = {"subject": case.query.id, "seed": case.seed, "n_support": case.n_support,
                                         "query_slices": case.query_slices,
                                         "pool": [[s.id, z] for s, z in case.pool]}
            runs: list[tuple[str, int, Callable[[], np.ndarray] | None]] = []
            for m in self.cfg.methods:
                if m in ("retrieved", "random"):
                    runs += [(m, k, lambda c=case, k=k, m=m: self.predict_engine(self.engine, c, k, m)) for k in self.cfg.ks]
                elif m == "finetuned":
                    runs.append((m, -1, None))  # trained lazily below, then evaluated for every k
                elif m == "gt-box":
                    runs.append((m, 0, lambda c=case: self.predict_gt_box(c)))
                elif m in ("unet", "dynunet"):
                    runs.append((m, 0, lambda c=case, m=m: self.baseline(c, m)))
            try:
                rows += self._run_case(case, runs)
            except BaseException:
                self._drop_pool()
                raise
        self._drop_pool()
        return rows

    def _run_case(self, case: Case, runs: list) -> list[dict]:
        rows: list[dict] = []
        for m, k, fn in runs:
            if m == "finetuned":
                eng, info, _ = self.trained(case, m, lambda c=case: self._finetune_info(c))
                self.case_info[case.name]["finetune"] = info
                for kk in self.cfg.ks:
                    t = time.perf_counter()
                    pred = self.predict_engine(eng, case, kk, "retrieved")
                    rows += self._score(case, m, kk, pred, time.perf_counter() - t)
                continue
            t = time.perf_counter()
            pred = fn()
            rows += self._score(case, m, k, pred, time.perf_counter() - t)
            logger.info("%s %s k=%d: %.1f s", case.name, m, k, time.perf_counter() - t)
        return rows

    def _score(self, case: Case, method: str, k: int, pred: np.ndarray, seconds: float) -> list[dict]:
        gt = case.query.labels[case.query_slices]
        rows = []
        for name, v in self.cfg.classes.items():
            p, g = pred == v, gt == v
            rows.append({"case": case.name, "subject": case.query.id, "patient": case.query.group or case.query.id,
                         "n_support": case.n_support, "seed": case.seed, "method": method, "k": k,
                         "class": name, "label": v, "dice": dice_score(p, g), "hd95": hd95(p, g, case.query.spacing),
                         "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum()),
                         "query_slices": len(case.query_slices), "seconds": round(seconds, 3)})
        if self.cfg.save_predictions:
            d = Path(self.cfg.out) / "predictions"
            d.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(d / f"{case.name}__{method}__k{k}.npz", pred=pred.astype(np.int16),
                                query_slices=np.asarray(case.query_slices))
        return rows


# --- reporting -------------------------------------------------------------------------------------
def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% t-interval of the mean of ``values`` (NaN for fewer than two)."""
    from scipy import stats

    v = np.asarray([x for x in values if x == x], float)
    if v.size < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))


def per_patient(rows: list[dict], classes: Sequence[str]) -> dict[tuple[str, int, int], dict[str, float]]:
    """(method, k, n_support) -> patient -> Dice averaged over classes and that patient's cases
    (its volumes and seeds): the unit of the confidence intervals, since cases of one patient
    are not independent."""
    acc: dict[tuple[str, int, int], dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        key = (r["method"], int(r["k"]), int(r["n_support"]))
        acc.setdefault(key, {}).setdefault(str(r["patient"]), {}).setdefault(r["class"], []).append(float(r["dice"]))
    return {key: {p: float(np.mean([np.mean(per[c]) for c in classes if c in per])) for p, per in pats.items()}
            for key, pats in acc.items()}


def summarize(rows: list[dict], classes: Sequence[str]) -> dict:
    """Per (method, k, n_support): per class mean/std Dice over cases, its 95% CI over patients,
    HD95; and over classes (``mean``)."""
    groups: dict[tuple[str, int, int], dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["method"], int(r["k"]), int(r["n_support"])), {}).setdefault(r["class"], []).append(r)
    pp = per_patient(rows, classes)
    out = {}
    for key, per in groups.items():
        entry = {}
        for c in classes:
            rs = per.get(c, [])
            d = np.array([x["dice"] for x in rs], float)
            h = np.array([x["hd95"] for x in rs], float)
            by_pat: dict[str, list[float]] = {}
            for x in rs:
                by_pat.setdefault(str(x["patient"]), []).append(float(x["dice"]))
            entry[c] = {"dice_mean": float(d.mean()) if d.size else float("nan"),
                        "dice_std": float(d.std()) if d.size else float("nan"),
                        "dice_ci95": ci95([np.mean(v) for v in by_pat.values()]),
                        "hd95_mean": float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"),
                        "hd95_nan": int(np.isnan(h).sum()), "n": int(d.size)}
        pats = list(pp.get(key, {}).values())
        entry["mean"] = {"dice_mean": float(np.mean([entry[c]["dice_mean"] for c in classes])),
                         "dice_ci95": ci95(pats), "patients": len(pats)}
        out[key] = entry
    return out


def paired_difference(rows: list[dict], classes: Sequence[str], a: str = "retrieved",
                      b: str = "random") -> dict[tuple[int, int], dict[str, float]]:
    """Per (k, n_support): mean over patients of (Dice of ``a`` - Dice of ``b``), class-averaged,
    with its 95% CI and the number of patients where ``a`` is better; same cases for both. A ``b``
    without supports (a baseline, :data:`K_FREE`) is compared with ``a`` at each of its k."""
    pp = per_patient(rows, classes)
    out = {}
    for (m, k, n), pa in pp.items():
        pb = pp.get((b, 0 if b in K_FREE else k, n)) if m == a else None
        if not pb:
            continue
        d = [pa[p] - pb[p] for p in pa if p in pb]
        out[(k, n)] = {"diff": float(np.mean(d)), "ci95": ci95(d), "patients": len(d),
                       "wins": int(sum(x > 0 for x in d))}
    return out


def _fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def _order(key: tuple[str, int, int]) -> tuple:
    return (METHODS.index(key[0]), key[2], key[1])


def write_reports(rows: list[dict], cfg: EvalConfig, case_info: dict, command: str, elapsed: float,
                  models: str = "", timing: dict | None = None, sources: Sequence[str] = ()) -> dict:
    """Write ``results.csv``, ``summary.md``, ``cases.json`` and the figures into ``cfg.out``;
    ``sources``: the commands of the runs a merged report was made from (:func:`merge_runs`)."""
    out = Path(cfg.out)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_COLUMNS})
    classes = list(cfg.classes)
    summ = summarize(rows, classes)
    keys = sorted(summ, key=_order)
    unit = "slices per class" if cfg.mode == "intra" else "patients"
    n_pat = len({r["patient"] for r in rows})
    lines = [f"Command: `{command}`", "",
             f"Mode `{cfg.mode}`, n = labeled {unit} ({', '.join(map(str, cfg.n_support))}), "
             f"{models or 'backend ' + cfg.backend}; seeds {cfg.seeds}, {len(case_info)} cases, "
             f"{n_pat} query patients; {_fmt(elapsed / 60, 1)} min" + (" over the runs." if sources else "."), "",
             *([f"Merged from {len(sources)} runs:", *[f"- `{c}`" for c in sources], ""] if sources else []),
             "Dice, mean ± std over cases (k = supports per query slice; 0 = no supports used); the last column "
             "is the mean over classes with the half-width of its 95% t-interval over patients (a patient's "
             "cases, i.e. volumes x seeds, averaged first):", "",
             "| method | n | k | " + " | ".join(classes) + " | mean ± 95% CI |", "|---|---|---|" + "---|" * (len(classes) + 1)]
    for key in keys:
        e = summ[key]
        lines.append(f"| {key[0]} | {key[2]} | {key[1]} | "
                     + " | ".join(f"{_fmt(e[c]['dice_mean'])} ± {_fmt(e[c]['dice_std'])}" for c in classes)
                     + f" | {_fmt(e['mean']['dice_mean'])} ± {_fmt(e['mean']['dice_ci95'])} |")
    diff = paired_difference(rows, classes)
    if diff:
        lines += ["", "Retrieved minus random supports (same cases), class-mean Dice per patient; mean over "
                      "patients with its 95% CI, and patients where retrieved is better:", "",
                  "| n | k | retrieved - random | 95% CI | better / patients |", "|---|---|---|---|---|"]
        for (k, n), d in sorted(diff.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            lo, hi = d["diff"] - d["ci95"], d["diff"] + d["ci95"]
            lines.append(f"| {n} | {k} | {d['diff']:+.3f} | [{_fmt(lo)}, {_fmt(hi)}] | {d['wins']} / {d['patients']} |")
    for b in ("unet", "dynunet"):
        bd = paired_difference(rows, classes, "finetuned", b)
        if bd:
            lines += ["", f"Fine-tuned decoder minus the {b} baseline (same cases), class-mean Dice per patient; mean "
                          "over patients with its 95% CI, and patients where the fine-tuned decoder is better:", "",
                      f"| n | k | finetuned - {b} | 95% CI | better / patients |", "|---|---|---|---|---|"]
            for (k, n), d in sorted(bd.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                lo, hi = d["diff"] - d["ci95"], d["diff"] + d["ci95"]
                lines.append(f"| {n} | {k} | {d['diff']:+.3f} | [{_fmt(lo)}, {_fmt(hi)}] | {d['wins']} / {d['patients']} |")
    lines += ["", "HD95 in mm, mean over cases where both masks are non-empty (cases excluded as empty):", "",
              "| method | n | k | " + " | ".join(classes) + " |", "|---|---|---|" + "---|" * len(classes)]
    for key in keys:
        e = summ[key]
        lines.append(f"| {key[0]} | {key[2]} | {key[1]} | "
                     + " | ".join(f"{_fmt(e[c]['hd95_mean'], 1)} ({e[c]['hd95_nan']})" for c in classes) + " |")
    lines += _timing_lines(rows, case_info, timing)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "cases.json").write_text(json.dumps({"config": asdict(cfg), "cases": case_info, "timing": timing or {},
                                                "command": command, "elapsed_s": round(elapsed, 1), "models": models,
                                                **({"merged_from": list(sources)} if sources else {})},
                                               indent=1, default=str))
    if cfg.figures:
        _figures(rows, cfg, summ)
    return summ


def _iou_pair(iou: dict | None) -> str:
    """``choose_prior_shift``'s two measurements as "0.512 / 0.547" ("-" when not measured)."""
    if not iou:
        return "-"
    return f"{iou.get('box_iou_in_place', float('nan')):.3f} / {iou.get('box_iou_moved', float('nan')):.3f}"


def _timing_lines(rows: list[dict], case_info: dict, timing: dict | None) -> list[str]:
    """What labeling a new patient costs: encoding its slices, then each method's segmentation."""
    lines = ["", "Time on this machine:"]
    t = timing or {}
    if t.get("encoded_slices"):
        lines.append(f"- encoding: {t['encode_s'] / t['encoded_slices']:.2f} s per slice "
                     f"({t['encoded_slices']} slices encoded fresh in {t['encode_s']:.0f} s)")
    elif t.get("total_slices"):
        lines.append(f"- encoding: all {t['total_slices']} slices came from the feature cache (no fresh encode timed)")
    per: dict[tuple[str, int], dict[str, tuple[float, int]]] = {}
    for r in rows:
        per.setdefault((r["method"], int(r["k"])), {}).setdefault(r["case"], (float(r["seconds"]), int(r["query_slices"])))
    for (m, k), cs in sorted(per.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        sec = sum(v[0] for v in cs.values())
        nsl = sum(v[1] for v in cs.values())
        lines.append(f"- {m} k={k}: {sec / max(nsl, 1):.3f} s per query slice after encoding"
                     + (" (training included, spread over the queries of its pool)" if m in ("unet", "dynunet")
                        else ""))
    ft = list({json.dumps(v["finetune"], sort_keys=True): v["finetune"] for v in case_info.values()
               if "finetune" in v}.values())
    if ft:
        lines.append(f"- fine-tuning: {len(ft)} training(s), {np.mean([f['train_s'] for f in ft]):.1f} s each "
                     f"({ft[0]['epochs']} epochs, {ft[0].get('augmented_copies', 0)} augmented copies of each "
                     f"labeled slice framed by background, {' / '.join(sorted({f.get('precision', 'float32') for f in ft}))} arithmetic, "
                     f"{'an image branch, ' if any(f.get('image_branch') for f in ft) else ''}"
                     f"{str(ft[0]['members']) + ' decoders averaged, ' if ft[0].get('members', 1) > 1 else ''}"
                     "embeddings cached), best training Dice "
                     f"{np.mean([f['best_metric'] for f in ft]):.3f}; exclusive regions (label pairs lying "
                     f"apart) in {sum(bool(f.get('exclusive')) for f in ft)} of {len(ft)} pool(s): "
                     f"{', '.join(sorted({json.dumps(f.get('exclusive')) for f in ft}))}; location prior moved "
                     f"onto the query in {sum(bool(f.get('prior_shift')) for f in ft)} of {len(ft)} pool(s) "
                     f"(pool box IoU in place / moved: "
                     f"{', '.join(_iou_pair(f.get('prior_shift_iou')) for f in ft)})")
    for name in ("unet", "dynunet"):
        tr = [v[name] for v in case_info.values() if name in v]
        if tr:
            uniq = list({json.dumps(x, sort_keys=True): x for x in tr}.values())  # one training per pool
            why = ", ".join(sorted({x["stopped"] for x in uniq}))
            lines.append(f"- {name}: {len(uniq)} training(s) at {uniq[0].get('size', '?')} px, "
                         f"{np.mean([x['train_s'] for x in uniq]):.1f} s and "
                         f"{np.mean([x['iters'] for x in uniq]):.0f} iterations each (stopped by: {why}), "
                         f"best validation Dice {np.mean([x['best_val'] for x in uniq]):.3f}"
                         + "".join(f"; {n} {what}" for n, what in (
                             (sum(x.get("over_cap_s", 0) > 0 for x in uniq),
                              "trained past the cap until a state found every class"),
                             (sum(x.get("every_class_found") is False for x in uniq), "kept a state that misses a class"),
                             (sum(x.get("skipped_steps", 0) > 0 for x in uniq), "skipped non-finite losses")) if n))
    return lines


def _figures(rows: list[dict], cfg: EvalConfig, summ: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.out)
    classes = list(cfg.classes)
    panels = classes + ["mean"]
    nmax = max(n for _, _, n in summ)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), sharey=True)
    for ax, c in zip(np.atleast_1d(axes), panels):
        for m in METHODS:
            ks = sorted(k for mm, k, n in summ if mm == m and n == nmax)
            if not ks:
                continue
            ys = [summ[(m, k, nmax)][c]["dice_mean"] for k in ks]
            if m in K_FREE:
                ax.axhline(ys[0], ls="--", lw=1, label=m)
            else:
                ax.plot(ks, ys, marker="o", label=m)
        ax.set_title(c)
        ax.set_xlabel("k")
    np.atleast_1d(axes)[0].set_ylabel(f"Dice (n = {nmax})")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_by_k.png", dpi=100)
    plt.close(fig)
    if len({n for _, _, n in summ}) > 1:
        _learning_curve(summ, cfg, plt)
    if cfg.save_predictions:
        _overlays(rows, cfg)


def curve_styles(summ: dict) -> dict[tuple[str, int], tuple[str, str, str]]:
    """(method, k) -> (colour, line style, marker) for the learning curve: one colour per method,
    one line style per k. With 3 k values and 5 methods the default 10-colour cycle gave two
    series the same colour."""
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    out = {}
    for i, m in enumerate(METHODS):
        for j, k in enumerate(sorted({k for mm, k, _ in summ if mm == m})):
            out[(m, k)] = (f"C{i % 10}", *styles[j % len(styles)])
    return out


def _learning_curve(summ: dict, cfg: EvalConfig, plt) -> None:
    """Mean Dice over classes against the number of labeled patients (slices), 95% CI shaded."""
    unit = "labeled slices per class" if cfg.mode == "intra" else "labeled patients"
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for (m, k), (colour, ls, mk) in curve_styles(summ).items():
        ns = sorted(n for mm, kk, n in summ if mm == m and kk == k)
        y = np.array([summ[(m, k, n)]["mean"]["dice_mean"] for n in ns])
        ci = np.array([summ[(m, k, n)]["mean"]["dice_ci95"] for n in ns])
        line = ax.plot(ns, y, ls=ls, marker=mk, color=colour, label=m if m in K_FREE else f"{m} k={k}")[0]
        if np.isfinite(ci).any():
            ax.fill_between(ns, y - np.nan_to_num(ci), y + np.nan_to_num(ci), alpha=0.15, color=line.get_color())
    ax.set_xscale("log", base=2)
    ns_all = sorted({n for _, _, n in summ})
    ax.set_xticks(ns_all, [str(n) for n in ns_all])
    ax.set_xlabel(unit)
    ax.set_ylabel("Dice, mean over classes (95% CI over patients)")
    ax.set_title(Path(cfg.images).name)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the curves fill the axes
    fig.tight_layout()
    fig.savefig(Path(cfg.out) / "learning_curve.png", dpi=100)
    plt.close(fig)


def _overlays(rows: list[dict], cfg: EvalConfig) -> None:
    """Best and worst (case, class) of the main method: image, truth (green), prediction (red)."""
    import matplotlib.pyplot as plt

    main = next((m for m in ("finetuned", "retrieved", "random", "gt-box", "unet") if m in cfg.methods), None)
    cand = [r for r in rows if r["method"] == main and r["gt_voxels"] > 0]
    if not cand:
        return
    kmax = max(r["k"] for r in cand)
    cand = [r for r in cand if r["k"] == kmax]
    pre = Preprocess(axis=cfg.axis, modality=cfg.modality, ct_window=cfg.ct_window)
    for tag, r in (("best", max(cand, key=lambda r: r["dice"])), ("worst", min(cand, key=lambda r: r["dice"]))):
        d = np.load(Path(cfg.out) / "predictions" / f"{r['case']}__{r['method']}__k{r['k']}.npz")
        items = {it.image_id: it for it in discover_pairs(cfg.images, cfg.labels, image_suffix=cfg.image_suffix,
                                                          label_suffix=cfg.label_suffix)}
        it = items[r["subject"]]
        img = load_image(it.image_path)
        sl = pre.slices(img)
        gt = pre.label_slices(load_label(it.label_path, like=img))
        qs = d["query_slices"]
        g = gt[qs] == r["label"]
        j = int(np.argmax(g.sum((1, 2))))
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(sl[qs[j]].T, cmap="gray", origin="lower")
        ax.contour(g[j].T, levels=[0.5], colors="lime", linewidths=1)
        if (d["pred"][j] == r["label"]).any():
            ax.contour((d["pred"][j] == r["label"]).T, levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{tag}: {r['case']} {r['class']} ({r['method']}, k={r['k']})\nDice {r['dice']:.3f}, slice {qs[j]}",
                     fontsize=8)
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(Path(cfg.out) / f"overlay_{tag}.png", dpi=100)
        plt.close(fig)


def run_evaluation(cfg: EvalConfig, command: str = "", progress: bool = True) -> dict:
    """Load data, build cases, run every method, write the reports; returns the summary."""
    t0 = time.perf_counter()
    h = Harness(cfg)
    subjects = _load_subjects(cfg, h.pre, progress)
    cases = {"intra": _intra_cases, "loso": _loso_cases, "cross": _cross_cases}[cfg.mode](subjects, cfg)
    if not cases:
        raise RagsegError("no evaluation case: no subject carries any of the classes")
    # the supervised baselines read pixels only: a run of nothing else encodes nothing
    encoded = [m for m in cfg.methods if m not in ("unet", "dynunet")]
    timing = h.encode(subjects, progress=progress) if encoded else None
    rows = h.run(cases, progress=progress)
    m = h.models
    models = f"backend {m.backend} ({m.backend_reason}); retrieval {m.retrieval} ({m.retrieval_reason})"
    return write_reports(rows, cfg, h.case_info, command, time.perf_counter() - t0, models, timing)


# configuration fields runs may differ in and still be reported together: which seeds, pool sizes, k
# values and methods each ran, and where it kept its files. Anything else (data, classes, the methods'
# settings) must be equal, or the merged table would mix settings under one row.
MERGE_MAY_DIFFER = ("seeds", "n_support", "ks", "methods", "out", "feature_cache", "figures", "save_predictions")
# settings that only some methods read: they must agree only between runs that ran one of those methods
_BASELINE = ("unet", "dynunet")
SETTING_METHODS = {"baseline_iters": _BASELINE, "baseline_time_s": _BASELINE, "baseline_size": _BASELINE,
                   "finetune_epochs": ("finetuned",), "finetune_retrieved": ("finetuned",),
                   "finetune_augment": ("finetuned",), "finetune_precision": ("finetuned",),
                   "finetune_image_branch": ("finetuned",), "finetune_members": ("finetuned",)}


def _run_record(run: Path, config_of: Callable[[str], EvalConfig] | None = None) -> tuple[list[dict], dict]:
    """One run folder's rows (typed as the harness wrote them) and its ``cases.json``.

    ``config_of``: for a folder that kept only ``results.csv`` and ``summary.md`` (as the tables in
    docs/results do), the settings parsed from the command on the summary's first line (see
    :func:`_record_without_cases`); without it such a folder is refused."""
    try:
        if config_of is not None and not (run / "cases.json").exists() and (run / "summary.md").exists():
            info = _record_without_cases(run, config_of)
        else:
            info = json.loads((run / "cases.json").read_text())
        with open(run / "results.csv", newline="") as f:
            raw = list(csv.DictReader(f))
    except FileNotFoundError as e:
        raise RagsegError(f"{run}: not an evaluation run folder (missing {Path(e.filename).name})") from None
    except (json.JSONDecodeError, csv.Error) as e:
        raise RagsegError(f"{run}: unreadable run record: {e}") from None
    ints = ("n_support", "seed", "k", "label", "gt_voxels", "pred_voxels", "query_slices")
    rows = []
    for r in raw:
        try:
            rows.append({**r, **{c: int(r[c]) for c in ints},
                         **{c: float(r[c]) for c in ("dice", "hd95", "seconds")}})
        except (KeyError, ValueError) as e:
            raise RagsegError(f"{run}/results.csv: bad row {r.get('case', '?')}: {e}") from None
    if "command" not in info:  # runs from before cases.json kept these: read them from the summary
        lines = (run / "summary.md").read_text().splitlines() if (run / "summary.md").exists() else []
        info["command"] = lines[0].removeprefix("Command: ").strip("`") if lines else str(run)
        head = next((x for x in lines if x.startswith("Mode `")), "")
        m = re.search(r"\), (backend .*); seeds \[", head)
        info.setdefault("models", m.group(1) if m else "")
        m = re.search(r"; ([0-9.]+) min\.$", head)
        info.setdefault("elapsed_s", float(m.group(1)) * 60 if m else float("nan"))
    if info.get("cases") is None:  # no cases.json: the cases are the rows' (no fine-tuning records)
        info["cases"] = {r["case"]: {"subject": r["subject"], "seed": r["seed"], "n_support": r["n_support"]}
                         for r in rows}
    return rows, info


# what a fine-tuning did, as its records keep it (`finetune` in cases.json) and as the summary's
# "fine-tuning:" line says it; fields missing from older records mean the feature did not exist yet
_FINETUNE_OUTCOME = {"epochs": (r"\((\d+) epochs", int, None),
                     "augmented_copies": (r"(\d+) augmented copies", int, 0),
                     "image_branch": (r"(an image branch)", bool, False),
                     "members": (r"(\d+) decoders averaged", int, 1)}


def _finetune_outcome(run: Path, info: dict) -> dict | None:
    """How a run's fine-tunings were done (epochs, augmented copies, image branch), from its
    records or else its summary; None when the run fine-tuned nothing or says nothing about it.
    Settings such as ``--image-branch auto`` resolve per pool, and a summary-only folder's command
    is read with today's defaults, so merging compares these outcomes as well as the settings."""
    ft = [c["finetune"] for c in (info.get("cases") or {}).values() if isinstance(c.get("finetune"), dict)]
    if ft:  # as the summary line reports them (write_reports): the first record's counts, any branch
        return {"epochs": ft[0].get("epochs"), "augmented_copies": ft[0].get("augmented_copies", 0),
                "image_branch": any(bool(f.get("image_branch", False)) for f in ft),
                "members": ft[0].get("members", 1)}
    summary = run / "summary.md"
    line = next((x for x in (summary.read_text().splitlines() if summary.exists() else [])
                 if x.startswith("- fine-tuning: ")), None)
    if line is None:
        return None
    out = {}
    for k, (pattern, cast, dflt) in _FINETUNE_OUTCOME.items():
        m = re.search(pattern, line)
        out[k] = cast(m.group(1)) if m else dflt
    return out


def _record_without_cases(run: Path, config_of: Callable[[str], EvalConfig]) -> dict:
    """A stand-in ``cases.json`` for a run that kept only its table: the settings are the command's
    (on the summary's first line) as ``config_of`` parses it, so options left at their defaults
    take today's defaults; the cases come from the rows (:func:`_run_record`)."""
    line = (run / "summary.md").read_text().splitlines()[:1]
    command = line[0].removeprefix("Command: ").strip("`") if line else ""
    if not command.startswith("ragseg evaluate "):
        raise RagsegError(f"{run}: no cases.json, and summary.md does not begin with the ragseg evaluate command")
    try:
        cfg = config_of(command)
    except (SystemExit, ValueError) as e:
        raise RagsegError(f"{run}: cannot read the settings from its command {command!r}: {e}") from None
    logger.warning("%s: no cases.json; its settings are read from its command, with today's defaults for the "
                   "options it left out, and it brings no fine-tuning or baseline records", run)
    return {"config": asdict(cfg), "cases": None, "timing": {}}


def merge_runs(runs: Sequence[str | Path], out: str | Path, command: str = "", figures: bool = True,
               config_of: Callable[[str], EvalConfig] | None = None, replace: bool = False) -> dict:
    """Report several ``ragseg evaluate`` runs of one data set as one: e.g. a second seed run in
    another session, or the baselines run apart from the few-shot methods. Their settings must agree
    except for :data:`MERGE_MAY_DIFFER`, and no (case, method, k) may be in two runs unless
    ``replace``: then a later run's rows replace an earlier one's for the same (case, method, k),
    as when one method is re-run after a fix. Writes the same files as :func:`run_evaluation` into
    ``out`` (the learning curve over every pool size) and returns the summary. ``config_of``: reads
    the settings of a run folder that kept only ``results.csv`` and ``summary.md`` from its command
    (the CLI passes its own parser)."""
    if len(runs) < 2:
        raise RagsegError("merging needs at least two run folders")
    records = [(Path(r), *_run_record(Path(r), config_of)) for r in runs]
    base = dict(records[0][2]["config"])
    for key, users in SETTING_METHODS.items():  # the value from the runs whose methods read it
        using = [info["config"] for _, _, info in records if set(info["config"]["methods"]) & set(users)]
        if using:
            base[key] = using[0].get(key)
    for run, _, info in records:
        cfg = info["config"]
        bad = sorted(k for k in set(base) | set(cfg) if k not in MERGE_MAY_DIFFER and base.get(k) != cfg.get(k)
                     and (k not in SETTING_METHODS or set(cfg["methods"]) & set(SETTING_METHODS[k])))
        if bad:
            raise RagsegError(f"{run} was run with other settings than {records[0][0]}: "
                              + ", ".join(f"{k} {cfg.get(k)!r} vs {base.get(k)!r}" for k in bad))
    done = [(run, o) for run, _, info in records if (o := _finetune_outcome(run, info)) is not None]
    for run, o in done[1:]:
        bad = sorted(k for k in o if o[k] != done[0][1][k])
        if bad:
            raise RagsegError(f"{run} fine-tuned otherwise than {done[0][0]}: "
                              + ", ".join(f"{k} {o[k]!r} vs {done[0][1][k]!r}" for k in bad))
    rows: list[dict] = []
    seen: dict[tuple, Path] = {}
    case_info: dict[str, dict] = {}
    timing = {"total_slices": 0, "encoded_slices": 0, "encode_s": 0.0}
    replaced: dict[Path, int] = {}
    for i, (run, rs, info) in enumerate(records):
        if replace:  # rows a later run has again are that run's to report
            later = {(r["case"], r["method"], r["k"], r["class"]) for _, rs2, _ in records[i + 1:] for r in rs2}
            kept = [r for r in rs if (r["case"], r["method"], r["k"], r["class"]) not in later]
            replaced[run], rs = len(rs) - len(kept), kept
        for r in rs:
            key = (r["case"], r["method"], r["k"], r["class"])
            if key in seen and seen[key] != run:
                raise RagsegError(f"case {r['case']}, {r['method']} k={r['k']} is in both {seen[key]} and {run}"
                                  " (--replace lets the later run's rows stand)")
            seen[key] = run
        rows += rs
        for name, ci in info["cases"].items():
            case_info.setdefault(name, {}).update(ci)
        t = info.get("timing") or {}
        timing["total_slices"] = max(timing["total_slices"], int(t.get("total_slices", 0)))
        timing["encoded_slices"] += int(t.get("encoded_slices", 0))
        timing["encode_s"] += float(t.get("encode_s", 0.0))
    union = {k: sorted({v for _, _, info in records for v in info["config"][k]}) for k in ("seeds", "n_support", "ks")}
    methods = {m for _, _, info in records for m in info["config"]["methods"]}
    cfg = EvalConfig(**{**base, **union, "methods": [m for m in METHODS if m in methods], "out": str(out),
                        "feature_cache": None, "save_predictions": False, "figures": figures})
    cfg.validate()
    Path(out).mkdir(parents=True, exist_ok=True)
    elapsed = sum(float(info.get("elapsed_s", float("nan"))) for _, _, info in records)
    models = records[0][2].get("models", "")
    return write_reports(rows, cfg, case_info, command, elapsed, models, timing,
                         sources=[info["command"] + (f" ({replaced[run]} of its rows replaced by a later run's)"
                                                     if replaced.get(run) else "") for run, _, info in records])
