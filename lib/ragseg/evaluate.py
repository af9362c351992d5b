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
* ``unet``: a small MONAI 2D UNet trained on the pool slices only (baseline c).

Per case and class: Dice and 95% Hausdorff distance (MONAI metrics, mm, on the evaluated
slices; HD95 is NaN when the prediction or the truth is empty). Writes ``results.csv``,
``summary.md`` and PNG figures (Dice by k; overlays of the best and worst cases), and with
``save_predictions`` the predicted label maps (canonical slices, ``predictions/*.npz``).
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
import torch.nn.functional as F
from tqdm import tqdm

from . import defaults
from .engine import Support
from .errors import RagsegError
from .pipeline import (
    LabeledVolume,
    Preprocess,
    Segmenter,
    discover_pairs,
    logits_to_labels,
    open_index,
    sync_index,
)
from .volume import Volume, load_image, load_label, save_label, slice_spacing, slices_to_volume

logger = logging.getLogger(__name__)

METHODS = ("retrieved", "random", "finetuned", "gt-box", "unet")
DEFAULT_GROUP_PATTERN = r"^(.+?)(?:_frame\d+)?$"  # ACDC: patientNNN_frameXX -> patientNNN
K_FREE = ("gt-box", "unet")  # methods that use no supports (k reported as 0)
CSV_COLUMNS = ("case", "subject", "seed", "method", "k", "class", "label", "dice", "hd95", "gt_voxels",
               "pred_voxels", "query_slices", "seconds")


@dataclass
class EvalConfig:
    """Options of one evaluation run (the CLI flags one to one)."""

    images: str
    labels: str | None
    out: str
    classes: dict[str, int]
    mode: str = "intra"
    n_support: int = 3
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
    finetune_epochs: int = defaults.FINETUNE_EPOCHS
    unet_iters: int = 400
    save_predictions: bool = False
    figures: bool = True
    image_suffix: str = ""
    label_suffix: str = ""
    subjects: list[str] = field(default_factory=list)  # only these ids (default: all)
    # regex on a volume id whose first group names its patient (loso never splits a patient)
    group_pattern: str = DEFAULT_GROUP_PATTERN

    def validate(self) -> None:
        if self.mode not in ("intra", "loso"):
            raise RagsegError(f"mode must be 'intra' or 'loso', got {self.mode!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise RagsegError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        if not self.classes:
            raise RagsegError("name the classes to evaluate, e.g. --classes liver=5,spleen=1")
        if self.n_support < 1 or any(k < 1 for k in self.ks):
            raise RagsegError("n_support and every k must be >= 1")
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
        m = re.match(cfg.group_pattern, it.image_id)
        group = (m.group(1) if m and m.group(1) else it.image_id)
        out.append(Subject(it.image_id, pre.slices(img), pre.label_slices(lab).astype(np.int32), sp, img, group))
    return out


def _intra_cases(subjects: list[Subject], cfg: EvalConfig) -> list[Case]:
    cases = []
    for subj in subjects:
        for seed in cfg.seeds:
            rng = np.random.default_rng(seed)
            pool: set[int] = set()
            for v in cfg.classes.values():
                zs = np.nonzero((subj.labels == v).any((1, 2)))[0]
                if len(zs) == 0:
                    continue
                bins = np.array_split(zs, min(cfg.n_support, len(zs)))
                pool.update(int(rng.choice(b)) for b in bins)
            if not pool:
                continue
            q = [z for z in range(len(subj.slices)) if z not in pool]
            cases.append(Case(f"{subj.id}-s{seed}", seed, subj, q, [(subj, z) for z in sorted(pool)]))
    return cases


def _loso_cases(subjects: list[Subject], cfg: EvalConfig) -> list[Case]:
    groups: dict[str, list[Subject]] = {}
    for s in subjects:
        groups.setdefault(s.group or s.id, []).append(s)
    names = sorted(groups)
    if len(names) < 2:
        raise RagsegError("leave-one-patient-out needs labeled volumes of at least two patients "
                          f"(grouped by {cfg.group_pattern!r})")
    vals = list(cfg.classes.values())
    cases = []
    for g in names:
        others = [n for n in names if n != g]
        for seed in cfg.seeds:
            rng = np.random.default_rng(seed)  # the same patients for every volume of g
            pick = sorted(rng.choice(len(others), size=min(cfg.n_support, len(others)), replace=False).tolist())
            pool = [(s, int(z)) for j in pick for s in groups[others[j]]
                    for z in np.nonzero(np.isin(s.labels, vals).any((1, 2)))[0]]
            for subj in groups[g]:
                cases.append(Case(f"{subj.id}-s{seed}", seed, subj, list(range(len(subj.slices))), pool))
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
        from .engine import FeatureCache
        from .factory import ModelConfig, ModelSet

        cfg.validate()
        self.cfg = cfg
        self.pre = Preprocess(axis=cfg.axis, modality=cfg.modality, ct_window=cfg.ct_window)
        self.models = ModelSet(ModelConfig(backend=cfg.backend, retrieval=cfg.retrieval,
                                           location_prior=cfg.location_prior, max_regions=cfg.max_regions))
        if self.models.backend == "litemedsam" or {"finetuned", "gt-box"} & set(cfg.methods):
            # every slice of a data set stays in RAM once encoded (float16, 2 MB each)
            self.models.lite().features = FeatureCache(max_bytes=8 << 30)
        self.embedder = self.models.embedder()
        self.engine = self.models.engine()
        self.labels = list(cfg.classes.values())
        self.names = {v: k for k, v in cfg.classes.items()}
        self.case_info: dict[str, dict] = {}
        self._pool: tuple[str, object, Path] | None = None  # (case name, its SliceIndex, its folder)

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

    def encode(self, subjects: list[Subject], progress: bool = True, chunk: int = 8) -> None:
        """Encode every slice once up front (the slow stage on a CPU), with a progress bar in slices/s.

        Embeddings land in the models' content-keyed caches, so the cases reuse them.
        """
        lite_too = self.models.backend == "litemedsam" and not hasattr(self.embedder, "lite")
        total = sum(len(s.slices) for s in subjects)
        with tqdm(total=total, desc="encoding slices", unit="slice", disable=not progress) as bar:
            for s in subjects:
                for a in range(0, len(s.slices), chunk):
                    part = s.slices[a:a + chunk]
                    self.embedder.embed(part)
                    if lite_too:
                        self.models.lite().embeddings(part)
                    bar.update(len(part))

    # the product path ----------------------------------------------------------------------------
    def pool_index(self, case: Case):
        """The case's pool as a datastore would hold it, indexed: partial label files + SliceIndex.

        Each pool subject gets a label file on its image's grid in which only its pool slices
        carry the evaluated classes. Built once per case (kept for every k and method).
        """
        if self._pool is not None and self._pool[0] == case.name:
            return self._pool[1]
        self._drop_pool()
        root = Path(tempfile.mkdtemp(prefix=f".pool-{case.name}-", dir=self.cfg.out))
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
        self._pool = (case.name, index, root)
        return index

    def _drop_pool(self) -> None:
        if self._pool is not None:
            shutil.rmtree(self._pool[2], ignore_errors=True)
            self._pool = None

    def predict_served(self, engine, case: Case, k: int) -> np.ndarray:
        """The server's path: index search + Segmenter (per-query self-exclusion, same label rule)."""
        seg = Segmenter(engine, self.embedder, self.pool_index(case), self.pre, k=k,
                        allow_same_image=self.cfg.mode == "intra")
        res = seg.segment_slices(case.query.slices, image_id=case.query.id, labels=self.labels,
                                 slices=case.query_slices)
        return res.labels

    # predictions ----------------------------------------------------------------------------------
    def _to_labels(self, logits: torch.Tensor) -> np.ndarray:
        return logits_to_labels(logits, self.labels)

    def predict_engine(self, engine, case: Case, k: int, how: str) -> np.ndarray:
        if how == "retrieved":
            return self.predict_served(engine, case, k)
        q = case.query.slices[case.query_slices]
        return self._to_labels(engine.segment_queries(q, self.random_supports(case, k)))

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
        return self._to_labels(logits)

    def train_finetuned(self, case: Case):
        from .engine import SupportMemoryCache
        from .fewshot import LiteMedSamAdapter, PrototypeDecoder, build_training_set, finetune
        from .litemedsam import LiteMedSamEngine, SupportEmbedding

        adapter = LiteMedSamAdapter(self.models.lite())
        sl = [s.slices[z] for s, z in case.pool]  # any in-plane sizes
        lb = [s.labels[z] for s, z in case.pool]
        ts = build_training_set(adapter, sl, lb, self.labels)
        dec = PrototypeDecoder(adapter, location_prior=self.cfg.location_prior)
        res = finetune(dec, ts, epochs=self.cfg.finetune_epochs, seed=case.seed)
        logger.info("%s: fine-tuned decoder, best train Dice %.3f at epoch %d (%.1f s/epoch)", case.name,
                    res.best_metric, res.best_epoch, np.mean([h["seconds"] for h in res.history]))
        eng = LiteMedSamEngine(self.models.lite(), cache=SupportMemoryCache(item_type=SupportEmbedding), decoder=dec,
                               location_prior=self.cfg.location_prior, max_regions=self.cfg.max_regions)
        return eng, res

    def predict_unet(self, case: Case) -> np.ndarray:
        return train_unet_predict([(s.slices[z], s.labels[z]) for s, z in case.pool],
                                  case.query.slices[case.query_slices], self.labels, iters=self.cfg.unet_iters,
                                  seed=case.seed)

    # running ------------------------------------------------------------------------------------------
    def run(self, cases: list[Case], progress: bool = True) -> list[dict]:
        rows: list[dict] = []
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        for case in tqdm(cases, desc="cases", disable=not progress, unit="case"):
            self.case_info[case.name] = {"subject": case.query.id, "seed": case.seed,
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
                elif m == "unet":
                    runs.append((m, 0, lambda c=case: self.predict_unet(c)))
            try:
                rows += self._run_case(case, runs)
            finally:
                self._drop_pool()
        return rows

    def _run_case(self, case: Case, runs: list) -> list[dict]:
        rows: list[dict] = []
        for m, k, fn in runs:
            if m == "finetuned":
                t = time.perf_counter()
                eng, tr = self.train_finetuned(case)
                train_s = time.perf_counter() - t
                self.case_info[case.name]["finetune"] = {"best_metric": tr.best_metric, "epochs": len(tr.history),
                                                         "train_s": train_s, "encode_s": tr.encode_s}
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
            rows.append({"case": case.name, "subject": case.query.id, "seed": case.seed, "method": method, "k": k,
                         "class": name, "label": v, "dice": dice_score(p, g), "hd95": hd95(p, g, case.query.spacing),
                         "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum()),
                         "query_slices": len(case.query_slices), "seconds": round(seconds, 3)})
        if self.cfg.save_predictions:
            d = Path(self.cfg.out) / "predictions"
            d.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(d / f"{case.name}__{method}__k{k}.npz", pred=pred.astype(np.int16),
                                query_slices=np.asarray(case.query_slices))
        return rows


# --- UNet baseline --------------------------------------------------------------------------------
def train_unet_predict(pool: list[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, labels: list[int], *,
                       iters: int = 400, size: int = 256, seed: int = 0, batch: int = 8) -> np.ndarray:
    """Train a small MONAI 2D UNet on the pool slices (Dice + CE, light augmentation), predict queries.

    Augmentation: random intensity scale/shift and translations of up to 10% (no flips: left and
    right organs differ).
    """
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from .volume import resize_slices

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # each slice to size x size on its own (pool slices of different patients differ in size)
    x = torch.cat([resize_slices(p[0][None], size) for p in pool])  # [n, 1, S, S]
    ys = []
    for _, lab in pool:
        y = np.zeros(lab.shape, np.int64)
        for i, v in enumerate(labels):
            y[lab == v] = i + 1
        ys.append(F.interpolate(torch.from_numpy(y)[None, None].float(), size=(size, size), mode="nearest").long())
    y = torch.cat(ys)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=len(labels) + 1, channels=(16, 32, 64, 128),
               strides=(2, 2, 2), num_res_units=1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    shift = size // 10
    for _ in range(iters):
        idx = rng.integers(0, len(x), batch)
        xb, yb = x[idx].clone(), y[idx].clone()
        xb = xb * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.05, 0.05))
        dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, 2))
        xb, yb = torch.roll(xb, (dy, dx), (2, 3)), torch.roll(yb, (dy, dx), (2, 3))
        loss = loss_fn(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    n, H, W = queries.shape
    out = np.zeros((n, H, W), np.int64)
    lv = np.asarray([0] + list(labels))
    with torch.no_grad():
        for s in range(0, n, 16):
            lg = net(resize_slices(queries[s:s + 16], size))
            lg = F.interpolate(lg, size=(H, W), mode="bilinear", align_corners=False)
            out[s:s + 16] = lv[lg.argmax(1).numpy()]
    return out


# --- reporting -------------------------------------------------------------------------------------
def summarize(rows: list[dict], classes: Sequence[str]) -> dict:
    """Mean/std Dice and HD95 per (method, k, class) and over classes."""
    groups: dict[tuple[str, int], dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        groups.setdefault((r["method"], int(r["k"])), {}).setdefault(r["class"], []).append((r["dice"], r["hd95"]))
    out = {}
    for (m, k), per in groups.items():
        entry = {}
        for c in classes:
            d = np.array([x[0] for x in per.get(c, [])], float)
            h = np.array([x[1] for x in per.get(c, [])], float)
            entry[c] = {"dice_mean": float(d.mean()) if d.size else float("nan"),
                        "dice_std": float(d.std()) if d.size else float("nan"),
                        "hd95_mean": float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"),
                        "hd95_nan": int(np.isnan(h).sum()), "n": int(d.size)}
        means = [entry[c]["dice_mean"] for c in classes]
        entry["mean"] = {"dice_mean": float(np.mean(means))}
        out[(m, k)] = entry
    return out


def _fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def write_reports(rows: list[dict], cfg: EvalConfig, case_info: dict, command: str, elapsed: float,
                  models: str = "") -> dict:
    out = Path(cfg.out)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_COLUMNS})
    classes = list(cfg.classes)
    summ = summarize(rows, classes)
    keys = sorted(summ, key=lambda mk: (METHODS.index(mk[0]), mk[1]))
    lines = [f"Command: `{command}`", "",
             f"Mode `{cfg.mode}`, {cfg.n_support} labeled {'slices per class' if cfg.mode == 'intra' else 'patients'}, "
             f"{models or 'backend ' + cfg.backend}; seeds {cfg.seeds}, {len(case_info)} cases; "
             f"{elapsed / 60:.1f} min.", "",
             "Dice, mean ± std over cases (k = supports per query slice; 0 = no supports used):", "",
             "| method | k | " + " | ".join(classes) + " | mean |", "|---|---|" + "---|" * (len(classes) + 1)]
    for m, k in keys:
        e = summ[(m, k)]
        lines.append(f"| {m} | {k} | " + " | ".join(f"{_fmt(e[c]['dice_mean'])} ± {_fmt(e[c]['dice_std'])}"
                                                    for c in classes) + f" | {_fmt(e['mean']['dice_mean'])} |")
    lines += ["", "HD95 in mm, mean over cases where both masks are non-empty (cases excluded as empty):", "",
              "| method | k | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for m, k in keys:
        e = summ[(m, k)]
        lines.append(f"| {m} | {k} | " + " | ".join(f"{_fmt(e[c]['hd95_mean'], 1)} ({e[c]['hd95_nan']})"
                                                    for c in classes) + " |")
    ft = [v["finetune"] for v in case_info.values() if "finetune" in v]
    if ft:
        lines += ["", f"Fine-tuning: {np.mean([f['train_s'] for f in ft]):.1f} s per case "
                      f"({ft[0]['epochs']} epochs, embeddings cached), best training Dice "
                      f"{np.mean([f['best_metric'] for f in ft]):.3f}."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "cases.json").write_text(json.dumps({"config": asdict(cfg), "cases": case_info}, indent=1, default=str))
    if cfg.figures:
        _figures(rows, cfg, summ)
    return summ


def _figures(rows: list[dict], cfg: EvalConfig, summ: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.out)
    classes = list(cfg.classes)
    fig, axes = plt.subplots(1, len(classes) + 1, figsize=(3.2 * (len(classes) + 1), 3), sharey=True)
    for ax, c in zip(np.atleast_1d(axes), classes + ["mean"]):
        for m in METHODS:
            ks = sorted(k for mm, k in summ if mm == m)
            if not ks:
                continue
            ys = [summ[(m, k)][c]["dice_mean"] for k in ks]
            if m in K_FREE:
                ax.axhline(ys[0], ls="--", lw=1, label=m, color="gray" if m == "gt-box" else "tab:brown")
            else:
                ax.plot(ks, ys, marker="o", label=m)
        ax.set_title(c)
        ax.set_xlabel("k")
    np.atleast_1d(axes)[0].set_ylabel("Dice")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_by_k.png", dpi=100)
    plt.close(fig)
    if cfg.save_predictions:
        _overlays(rows, cfg)


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
    cases = _intra_cases(subjects, cfg) if cfg.mode == "intra" else _loso_cases(subjects, cfg)
    if not cases:
        raise RagsegError("no evaluation case: no subject carries any of the classes")
    h.encode(subjects, progress=progress)
    rows = h.run(cases, progress=progress)
    m = h.models
    models = f"backend {m.backend} ({m.backend_reason}); retrieval {m.retrieval} ({m.retrieval_reason})"
    return write_reports(rows, cfg, h.case_info, command, time.perf_counter() - t0, models)
