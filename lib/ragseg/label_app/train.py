"""The train task: fine-tune the prototype decoder on the datastore's final labels.

MONAI Label runs ``POST /train/<name>`` in a subprocess (a fresh app instance), while ``/info``
is answered by the server process. So the subprocess writes its progress to
``<index_dir>/decoders/<name>/train_stats.json`` after every epoch (temp file + rename), and
:meth:`DecoderTrainTask.stats` in the server reads it: ``epoch``, ``total_epochs``,
``best_metric`` (training-episode Dice), and ``total_time`` once finished (what 3D Slicer's
MONAI Label module shows). The decoder folder is replaced atomically at the end, and the
server's infer task picks the new decoder up on its next request.

Request params (JSON body of ``POST /train/<name>``): ``epochs``, ``lr``, ``k``, ``use_box``,
``max_episodes``, ``seed``, ``retrieved_episodes`` (share of episodes with retrieval-like supports,
0..1), ``augment_copies`` (augmented copies of each labeled slice framed by background, 0..8), ``precision`` (auto, bf16 or
float32: the arithmetic of the decoder's forward passes), ``image_branch`` (auto, true or false: the
decoder also reads the slice itself, ``ragseg.fewshot.ImageBranch``; auto: for small slices),
``decoders`` (1..8: fine-tunings with seeds seed, seed + 100, ... served as the mean of their
logits, ``ragseg.fewshot.DecoderEnsemble``; the stats count every member's epochs), ``labels`` (names or values; default all
labeled).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.train import TrainTask

from .. import defaults
from ..atomic import atomic_write
from ..errors import RagsegError
from .components import DECODER_TASK, Components, ModelUnavailable

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, default=str)


def _branch(v: Any) -> str | bool:
    """"auto", a JSON boolean, or a boolean spelled as a string ("true" / "false", "on" / "off")."""
    if isinstance(v, bool):
        return v
    t = str(v).strip().lower()
    if t == "auto":
        return t
    if t in ("true", "on", "1"):
        return True
    if t in ("false", "off", "0"):
        return False
    raise ValueError(f"image_branch: auto, true or false, not {v!r}")


class DecoderTrainTask(TrainTask):
    """Few-shot decoder fine-tuning (LiteMedSAM backbone) as a MONAI Label train task."""

    def __init__(self, components: Components, label_names, name: str = DECODER_TASK):
        super().__init__("Fine-tune the prototype-prompted LiteMedSAM mask decoder on your labeled slices "
                         "(encoder frozen, embeddings cached)")
        self.c = components
        self.name = name
        self.label_names = label_names
        self.out_dir = components.index_dir / "decoders" / name

    def config(self) -> dict[str, Any]:
        return {"epochs": defaults.FINETUNE_EPOCHS, "lr": defaults.FINETUNE_LR, "k": defaults.DEFAULT_K,
                "use_box": True, "max_episodes": defaults.FINETUNE_MAX_EPISODES, "seed": 0,
                "retrieved_episodes": defaults.FINETUNE_RETRIEVED, "augment_copies": defaults.FINETUNE_AUGMENT,
                "precision": defaults.FINETUNE_PRECISION, "image_branch": defaults.FINETUNE_IMAGE_BRANCH,
                "decoders": defaults.FINETUNE_MEMBERS}

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads((self.out_dir.parent / f"{self.name}.{STATS_FILE}").read_text())
        except (OSError, ValueError):
            return {}

    def _write_stats(self, st: dict) -> None:
        _write_json(self.out_dir.parent / f"{self.name}.{STATS_FILE}", st)

    def _labels(self, v: Any) -> list[int] | None:
        if v in (None, "", []):
            return None
        names = self.label_names()
        out = []
        for x in (v if isinstance(v, list) else str(v).split(",")):
            x = str(x).strip()
            if x.isdigit():
                out.append(int(x))
            elif x in names:
                out.append(names[x])
            else:
                raise HTTPException(422, f"param labels: unknown label {x!r}")
        return out

    def __call__(self, request: dict, datastore) -> dict[str, Any]:
        from ..fewshot import LiteMedSamAdapter
        from ..training import train_decoder
        from .reindex import Reindexer

        cfg = {**self.config(), **{k: v for k, v in request.items() if k in self.config()}}
        try:
            epochs, k, max_ep = int(cfg["epochs"]), int(cfg["k"]), int(cfg["max_episodes"])
            lr, seed, use_box = float(cfg["lr"]), int(cfg["seed"]), bool(cfg["use_box"])
            retrieved = float(cfg["retrieved_episodes"])
            augment = int(cfg["augment_copies"])
            precision = str(cfg["precision"])
            image_branch = _branch(cfg["image_branch"])
            members = int(cfg["decoders"])
        except (TypeError, ValueError) as e:
            raise HTTPException(422, f"bad train parameter: {e}") from None
        if not (1 <= epochs <= 1000 and 1 <= k <= defaults.MAX_K and max_ep >= 1 and 0 < lr < 1
                and 0 <= retrieved <= 1 and 0 <= augment <= defaults.FINETUNE_MAX_AUGMENT
                and 1 <= members <= defaults.FINETUNE_MAX_MEMBERS):
            raise HTTPException(422, "train parameters out of range (epochs 1..1000, k 1..16, 0 < lr < 1, "
                                     f"0 <= retrieved_episodes <= 1, 0 <= augment_copies <= {defaults.FINETUNE_MAX_AUGMENT}, "
                                     f"1 <= decoders <= {defaults.FINETUNE_MAX_MEMBERS})")
        if precision not in defaults.FINETUNE_PRECISIONS:
            raise HTTPException(422, f"param precision: one of {', '.join(defaults.FINETUNE_PRECISIONS)}, not {precision!r}")
        labels = self._labels(request.get("labels"))
        if self.c.backend != "litemedsam" and self.c.cfg.backend != "litemedsam":
            logger.warning("backend is %s; the decoder is trained on LiteMedSAM and used when the backend is "
                           "litemedsam", self.c.backend)
        items = Reindexer(self.c, datastore).labeled_items()
        if not items:
            raise HTTPException(422, "no final label in the datastore to train on")
        t0 = time.time()
        st = {"name": self.name, "epoch": 0, "total_epochs": epochs * members, "best_metric": 0.0,
              "start_ts": int(t0), "state": "running", "pid": os.getpid()}
        self._write_stats(st)

        def on_epoch(ep: int, s: dict) -> None:  # ep restarts with each member; the stats count on
            st.update(epoch=st["epoch"] + 1, best_metric=max(st["best_metric"], s["dice"]), loss=s["loss"],
                      epoch_seconds=round(s["seconds"], 3), episodes=s["episodes"])
            self._write_stats(st)

        try:
            lite = self.c.models.lite()
        except RagsegError as e:
            raise ModelUnavailable(f"LiteMedSAM unavailable: {e}") from e
        tmp = Path(tempfile.mkdtemp(dir=str(self.out_dir.parent), prefix=f".{self.name}."))
        try:
            res = train_decoder(items, LiteMedSamAdapter(lite), self.c.pre, tmp, labels=labels,
                                names={v: n for n, v in self.label_names().items()}, epochs=epochs, lr=lr, k=k,
                                use_box=use_box, seed=seed, max_episodes=max_ep, on_epoch=on_epoch,
                                location_prior=self.c.cfg.location_prior, area_cap=self.c.cfg.area_cap,
                                retrieved=retrieved, augment=augment, precision=precision,
                                image_branch=image_branch, members=members)
            # swap the folder in: the infer side watches manifest.json, written last inside tmp
            old = self.out_dir.with_name(f".{self.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if self.out_dir.exists():
                os.replace(self.out_dir, old)
            os.replace(tmp, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        except RagsegError as e:
            st.update(state="failed", error=str(e), total_time=round(time.time() - t0, 2))
            self._write_stats(st)
            raise HTTPException(422, f"training failed: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        st.update(state="done", best_metric=res.best_metric, best_metric_epoch=res.best_epoch,
                  total_time=round(time.time() - t0, 2), images=len(items), encode_s=round(res.encode_s, 2),
                  decoder=str(self.out_dir))
        self._write_stats(st)
        logger.info("decoder trained: best Dice %.3f at epoch %d, %.1f s", res.best_metric, res.best_epoch,
                    st["total_time"])
        return st
