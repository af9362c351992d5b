"""Scripted labelling: segment every unlabeled image of a datastore.

Two ways, same rules:
* a local MONAI Label datastore folder: in-process (index from ``labels/final``, results in
  ``labels/original``);
* a running MONAI Label server URL: through ``monailabel.client`` and ``POST /infer/<model>``
  with ``save_label`` and tag ``original``, so the server's datastore and index stay the truth.

Human ``final`` labels are never written. Images that already have an ``original`` label are
skipped, so an interrupted run resumes where it stopped (``--redo`` recomputes them).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_write
from .errors import RagsegError
from .volume import IMAGE_EXTS, image_id_of, load_image, save_label

logger = logging.getLogger(__name__)


@dataclass
class LabelAllReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already had an original label
    human: list[str] = field(default_factory=list)  # have a final label: never touched
    failed: dict[str, str] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)  # Ray: resubmissions after a worker died
    slices: int = 0  # slices segmented
    seconds: float = 0.0
    interrupted: bool = False
    run: dict = field(default_factory=dict)  # how it ran (Ray: address, nodes, actors, threads...)

    def summary(self) -> str:
        retried = f", {sum(self.retried.values())} retries" if self.retried else ""
        return (f"labelled {len(self.done)}, skipped {len(self.skipped)} already done, "
                f"{len(self.human)} with human labels untouched, {len(self.failed)} failed{retried}, "
                f"in {self.seconds:.1f} s" + (" (interrupted: re-run to resume)" if self.interrupted else ""))

    def to_json(self) -> dict:
        d = asdict(self)
        d["slices_per_s"] = round(self.slices / self.seconds, 3) if self.seconds > 0 else None
        return d

    def write(self, path: str | Path) -> Path:
        """The summary JSON, written atomically."""
        with atomic_write(path, "w", suffix=".json") as fh:
            json.dump(self.to_json(), fh, indent=1)
        return Path(path)


def label_volume(seg, path: Path, original: Path) -> int:
    """Segment one image and write its ``original`` label (temp file + rename); returns the number
    of slices segmented. The unit of work of every local path: :func:`label_local` and the Ray
    workers of :mod:`ragseg.scale`."""
    iid = image_id_of(path)
    vol = load_image(path)
    res = seg.segment_volume(vol, image_id=iid)
    save_label(original / f"{iid}.nii.gz", res.label_map, vol)
    return len(res.slices)


def datastore_plan(root: Path, redo: bool, limit: int | None) -> tuple[LabelAllReport, list[Path]]:
    """A local datastore's images split into human-labeled, already done and to do (paths)."""
    final, original = root / "labels" / "final", root / "labels" / "original"
    images = {image_id_of(p): p for p in root.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTS)}
    final_ids = {image_id_of(p) for p in final.iterdir()} if final.is_dir() else set()
    orig_ids = {image_id_of(p) for p in original.iterdir() if not p.name.startswith(".")} if original.is_dir() else set()
    rep, todo_ids = _plan(list(images), final_ids, orig_ids, redo, limit)
    return rep, [images[i] for i in todo_ids]


def _plan(ids: list[str], final: set[str], original: set[str], redo: bool, limit: int | None
          ) -> tuple[LabelAllReport, list[str]]:
    """Split image ids into human-labeled (never touched), already done (skipped) and to do."""
    rep = LabelAllReport()
    todo = []
    for iid in sorted(ids):
        if iid in final:
            rep.human.append(iid)
        elif iid in original and not redo:
            rep.skipped.append(iid)
        else:
            todo.append(iid)
    return rep, todo[:limit] if limit is not None else todo


def label_local(root: str | Path, segmenter_factory, *, redo: bool = False, limit: int | None = None,
                progress: bool = True) -> LabelAllReport:
    """Label a local datastore folder. ``segmenter_factory()`` -> a Segmenter on its final labels."""
    root = Path(root)
    original = root / "labels" / "original"
    rep, todo = datastore_plan(root, redo, limit)
    t0 = time.time()
    seg = segmenter_factory() if todo else None
    rep.run = {"mode": "local", "threads": torch.get_num_threads()}
    for p in tqdm(todo, desc="labelling", unit="img", disable=not progress):
        iid = image_id_of(p)
        try:
            rep.slices += label_volume(seg, p, original)
            rep.done.append(iid)
        except RagsegError as e:
            rep.failed[iid] = str(e)
            logger.warning("%s: %s", iid, e)
        except KeyboardInterrupt:
            rep.interrupted = True
            break
    rep.seconds = time.time() - t0
    return rep


def label_server(url: str, *, model: str = "ragseg", redo: bool = False, limit: int | None = None,
                 progress: bool = True, params: dict | None = None) -> LabelAllReport:
    """Label every unlabeled image of a running server's datastore (tag ``original``)."""
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    client = MONAILabelClient(url)
    try:
        info = client.info()
        ds = client.datastore()
    except Exception as e:
        raise RagsegError(f"cannot reach MONAI Label server at {url}: {e}") from e
    if model not in info.get("models", {}):
        raise RagsegError(f"server {url} has no model {model!r}; it has {', '.join(info.get('models', {}))}")
    objs = ds.get("objects", {})
    rep, todo = _plan(list(objs), {i for i, o in objs.items() if "final" in o.get("labels", {})},
                      {i for i, o in objs.items() if "original" in o.get("labels", {})}, redo, limit)
    t0 = time.time()
    req = dict(params or {}, label_tag="original", save_label=True)
    for iid in tqdm(todo, desc="labelling", unit="img", disable=not progress):
        try:
            client.infer(model, iid, req)
            rep.done.append(iid)
        except MONAILabelClientException as e:
            rep.failed[iid] = str(e.msg)
            logger.warning("%s: %s", iid, e.msg)
    rep.seconds = time.time() - t0
    return rep


def label_server_batch(url: str, *, model: str = "ragseg", redo: bool = False, progress: bool = True,
                       params: dict | None = None, poll: float = 1.0, timeout: float = 24 * 3600) -> LabelAllReport:
    """The same through MONAI Label's batch endpoint (one server-side subprocess for all images).

    ``POST /batch/infer/<model>?images=unlabeled``; the app's batch task skips images that already
    have an original label, so a re-run resumes. Progress is read from the datastore.
    """
    import json as _json
    import urllib.error
    import urllib.request

    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(url)

    def counts():
        objs = client.datastore().get("objects", {})
        return ({i for i, o in objs.items() if "final" in o.get("labels", {})},
                {i for i, o in objs.items() if "original" in o.get("labels", {}) and "final" not in o.get("labels", {})},
                set(objs))

    human, before, ids = counts()
    todo = sorted(ids - human - (set() if redo else before))
    rep = LabelAllReport(human=sorted(human), skipped=[] if redo else sorted(before))
    if not todo:
        return rep
    # multi_gpu=False: with no GPU, MONAI Label 0.8.5 divides by a zero GPU count otherwise
    body = dict(params or {}, label_tag="original", save_label=True, device="cpu", multi_gpu=False, max_workers=1,
                redo=redo)
    req = urllib.request.Request(f"{url.rstrip('/')}/batch/infer/{model}?images=unlabeled", method="POST",
                                 data=_json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.time()
    try:
        urllib.request.urlopen(req, timeout=60).read()
    except urllib.error.HTTPError as e:
        raise RagsegError(f"batch infer refused by {url}: {e.code} {e.read()[:300]!r}") from e
    bar = tqdm(total=len(todo), desc="labelling (batch)", unit="img", disable=not progress)
    status = {}
    while time.time() - t0 < timeout:
        time.sleep(poll)
        _, now, _ = counts()
        bar.n = len((now - before) | (now & set(todo) if redo else set()))
        bar.refresh()
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/batch/infer/", timeout=60) as r:
                status = _json.loads(r.read())
        except urllib.error.HTTPError:
            continue
        if status.get("status") not in ("RUNNING", "SUBMITTED", None):
            break
    bar.close()
    _, after, _ = counts()
    rep.done = sorted((after - before) if not redo else (after & set(todo)))
    for i in todo:
        if i not in rep.done:
            rep.failed[i] = f"not labelled (batch status {status.get('status')})"
    rep.seconds = time.time() - t0
    return rep


def open_pool(root: Path, model_cfg, pre):
    """The models and the index of ``root/labels/final`` (synced): what labelling a local
    datastore learns from. Returns (ModelSet, embedder, index)."""
    from .factory import ModelSet
    from .pipeline import discover_pairs, open_index, sync_index

    models = ModelSet(model_cfg)
    emb = models.embedder()
    idx = open_index(root / ".ragseg" / "index", emb, pre)
    sync_index(idx, emb, pre, discover_pairs(root, root / "labels" / "final"), progress=True)
    if len(idx) == 0:
        raise RagsegError(f"{root}: no labeled slice in labels/final to learn from")
    return models, emb, idx


def pool_model_config(root: Path, model_cfg):
    """The datastore's support-memory cache unless the caller chose one."""
    if model_cfg.memory_cache is None:
        model_cfg.memory_cache = str(root / ".ragseg" / "memories")
    return model_cfg


def local_segmenter_factory(root: Path, model_cfg, pre, k: int):
    """Index ``root/labels/final`` and return a Segmenter on it (built only when there is work)."""

    def make():
        from .pipeline import Segmenter

        models, emb, idx = open_pool(root, pool_model_config(root, model_cfg), pre)
        return Segmenter(models.engine(), emb, idx, pre, k=k)

    return make
