"""The app's ``--conf key value`` options, parsed once into a typed, validated dataclass.

MONAI Label passes every ``--conf`` value as a string. :func:`AppConfig.from_conf` converts each
known key to its type, checks it, and raises :class:`ConfigError` naming the key on a bad value
or an unknown key (a typo must not be silently ignored). Keys MONAI Label itself reads
(``server_mode``, ``preload``...) are passed through untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import defaults
from ..errors import RagsegError
from ..prototypes import parse_area_cap

# keys MONAI Label or its endpoints read from conf; accepted and left to them
PASSTHROUGH_KEYS = {"server_mode", "preload", "skip_trainers", "skip_strategies", "skip_scoring", "epistemic_enabled"}


class ConfigError(RagsegError):
    """A ``--conf`` value is invalid; the message names the key."""


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(v: object) -> bool:
    """true/false in the spellings --conf and request params accept; ValueError otherwise."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in TRUE_WORDS:
        return True
    if s in FALSE_WORDS:
        return False
    raise ValueError(f"expected true/false, got {v!r}")


def _bool(key: str, v: str) -> bool:
    try:
        return parse_bool(v)
    except ValueError as e:
        raise ConfigError(f"--conf {key}: {e}") from None


def _number(key: str, v: str, lo: float, hi: float, typ: type = int):
    try:
        x = typ(v)
    except ValueError:
        raise ConfigError(f"--conf {key}: expected {'an integer' if typ is int else 'a number'}, got {v!r}") from None
    if not lo <= x <= hi:
        raise ConfigError(f"--conf {key}: must be between {lo} and {hi}, got {x}")
    return x


def _choice(key: str, v: str, options: tuple[str, ...]) -> str:
    if v not in options:
        raise ConfigError(f"--conf {key}: must be one of {', '.join(options)}, got {v!r}")
    return v


def _labels(key: str, v: str) -> dict[str, int]:
    """'liver=1,spleen=2' or a JSON object {"liver": 1}."""
    v = v.strip()
    try:
        d = json.loads(v) if v.startswith("{") else dict(p.split("=", 1) for p in v.split(",") if p.strip())
        out = {str(k).strip(): int(x) for k, x in d.items()}
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--conf {key}: expected 'name=value,...' or a JSON object, got {v!r} ({e})") from None
    if any(x <= 0 or x > 255 for x in out.values()):
        raise ConfigError(f"--conf {key}: label values must be in 1..255")
    if len(set(out.values())) != len(out):
        raise ConfigError(f"--conf {key}: two names share a label value")
    return out


@dataclass
class AppConfig:
    """Every ``--conf`` key of the app (documented in apps/ragseg/README.md).

    Attributes mirror the keys one to one; see the README for meanings and defaults.
    """

    backend: str = "auto"
    retrieval: str = "auto"
    decoder: str = "auto"  # 'auto' (the app's trained decoder if any), 'none', or a decoder folder
    location_prior: int | None = defaults.LOCATION_PRIOR
    max_regions: int = defaults.MAX_REGIONS
    area_cap: float | None = defaults.REGION_AREA_CAP
    region_score: str = defaults.REGION_SCORE
    sam2_checkpoint: str = "sam2.1-hiera-tiny"
    sam2_variant: str = "hiera_t"
    dinov2: str = "dinov2-small"
    pooling: str = "cls"
    image_size: int = defaults.SAM2_IMAGE_SIZE
    k: int = defaults.DEFAULT_K
    axis: str = "axial"
    modality: str = "auto"
    ct_window: str = defaults.DEFAULT_CT_WINDOW
    device: str = "auto"
    index_dir: str = ""  # default: <studies>/.ragseg (local) or <app_dir>/.ragseg (remote)
    feature_cache: str = ""  # folder keeping LiteMedSAM slice embeddings on disk across restarts ('': RAM only)
    labels: dict[str, int] = field(default_factory=dict)
    same_image_supports: bool = True
    propagate: bool = False
    precompute_memories: bool = True
    reconcile_interval: float = 5.0
    embed_unlabeled: bool = True  # embed unlabeled images in the background for the diversity strategy
    infer_concurrency: int = 1  # segmentations run at once; more requests wait on worker threads
    pacs_attempts: int = defaults.PACS_ATTEMPTS  # DICOMweb: tries per request (1: no retry)
    pacs_retry_wait: float = defaults.PACS_RETRY_WAIT_S  # DICOMweb: first wait between tries, doubling
    ohif_seg_fix: bool = True  # undo the bundled OHIF's z-mirrored SEG export (see ragseg.seg)
    ray_address: str = ""  # batch infer of unlabeled images on Ray: 'local', 'auto', host:port, ray://host:10001
    ray_actors: int = 0  # Ray worker actors (0: as the cluster's CPUs/GPUs allow)
    ray_threads: int = 0  # torch threads per Ray actor (0: node CPUs / actors per node)
    random_weights_for_testing: bool = False

    @classmethod
    def from_conf(cls, conf: dict[str, str] | None) -> AppConfig:
        conf = dict(conf or {})
        cfg = cls()
        known = {f.name for f in fields(cls)}
        for key, raw in conf.items():
            if key in PASSTHROUGH_KEYS:
                continue
            if key not in known:
                raise ConfigError(f"--conf {key}: unknown key; known keys: {', '.join(sorted(known))}")
            v = str(raw)
            if key == "backend":
                val: object = _choice(key, v, ("auto", "rag-sam2", "litemedsam"))
            elif key == "retrieval":
                val = _choice(key, v, ("auto", "dinov2", "litemedsam"))
            elif key == "location_prior":
                n = _number(key, v, -1, 64)
                val = None if n < 0 else n
            elif key == "area_cap":
                try:
                    val = parse_area_cap(v)
                except ValueError as e:
                    raise ConfigError(f"--conf area_cap: {e}") from None
            elif key == "max_regions":
                val = _number(key, v, 1, 64)
            elif key == "region_score":
                val = _choice(key, v, ("prototype", "linear"))
            elif key == "sam2_variant":
                val = _choice(key, v, ("hiera_t", "hiera_s", "hiera_b+", "hiera_l"))
            elif key == "pooling":
                val = _choice(key, v, ("cls", "mean"))
            elif key == "image_size":
                val = _number(key, v, 64, 2048)
                if val % 32:
                    raise ConfigError(f"--conf image_size: must be a multiple of 32, got {val}")
            elif key == "k":
                val = _number(key, v, 1, defaults.MAX_K)
            elif key == "axis":
                val = _choice(key, v, ("axial", "coronal", "sagittal"))
            elif key == "modality":
                val = _choice(key, v, ("auto", "CT", "MR"))
            elif key == "ct_window":
                val = _choice(key, v, tuple(sorted(defaults.CT_WINDOWS)))
            elif key == "device":
                if not (v in ("auto", "cpu") or v.startswith("cuda")):
                    raise ConfigError(f"--conf device: must be auto, cpu or cuda[:N], got {v!r}")
                val = v
            elif key == "labels":
                val = _labels(key, v)
            elif key in ("ray_actors", "ray_threads"):
                val = _number(key, v, 0, 4096)
            elif key == "infer_concurrency":
                val = _number(key, v, 1, 64)
            elif key == "pacs_attempts":
                val = _number(key, v, 1, 10)
            elif key == "pacs_retry_wait":
                val = _number(key, v, 0.0, 60.0, float)
            elif key == "reconcile_interval":
                val = _number(key, v, 0.5, 3600.0, float)
            elif key in ("same_image_supports", "propagate", "precompute_memories", "random_weights_for_testing",
                         "ohif_seg_fix", "embed_unlabeled"):
                val = _bool(key, v)
            else:  # free strings: paths, names
                val = v
            setattr(cfg, key, val)
        return cfg

    def index_path(self, studies: str, app_dir: str) -> Path:
        if self.index_dir:
            return Path(self.index_dir).expanduser()
        if studies.startswith(("http://", "https://")) or not os.path.isdir(studies):
            return Path(app_dir) / ".ragseg"
        return Path(studies) / ".ragseg"
