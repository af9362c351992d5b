"""Registry of official checkpoints, checksum-verified download, and path resolution.

Nothing in this package downloads implicitly: models load from explicit paths or from the weights
cache directory, and :func:`fetch` (the ``ragseg weights fetch NAME`` command) is the only code
that touches the network. When a file is missing, :class:`WeightsMissingError` names the file and
the command that fetches it.

Size and SHA-256: the registry holds the size and digest of every official SAM 2.1 checkpoint
and of the DINOv2 weights files, as published and cross-checked by independent projects that
verify their own downloads against them (micro-sam ``micro_sam/v2/util.py``, geti-instant-learn
``utils/constants.py``, SlicerSegmentWithSAM). A download is checked for its size first, then its
digest; a mismatch deletes it and says which of the two failed. ``dinov2-small`` is fetched from a
pinned hub revision, so all three of its files have known digests; the other DINOv2 entries come
from ``main`` and only their weights file has a known digest: their small config files are pinned
on first fetch (``pins.json`` beside the weights; said in the output). For files outside the
registry's knowledge (the with-registers variants) ``fetch`` refuses unless the user passes the
digest they trust (``--sha256``) or ``--pin`` (trust on first use, recorded in ``pins.json``).

Sites with an internal mirror set ``RAGSEG_WEIGHTS_MIRROR`` (files at ``<mirror>/<name>/<file>``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .atomic import atomic_path, atomic_write
from .errors import ChecksumError, RagsegError, WeightsMissingError

logger = logging.getLogger(__name__)

SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
HF_BASE_URL = "https://huggingface.co"


@dataclass(frozen=True)
class WeightFile:
    """One file of a checkpoint."""

    filename: str
    url: str
    sha256: str | None = None  # None: not known to this registry (see module docstring)
    size: int | None = None  # bytes, checked before the digest


@dataclass(frozen=True)
class WeightSpec:
    """A named official checkpoint."""

    name: str  # the name users type: `ragseg weights fetch <name>`
    kind: str  # 'sam2' or 'dinov2'
    files: tuple[WeightFile, ...]
    config: str = ""  # sam2: Hydra config inside the sam2 package; dinov2: the hub id
    description: str = ""


# (size in bytes, SHA-256) of the official files; see the module docstring for the sources
SAM2_DIGESTS = {
    "sam2.1_hiera_tiny": (156008466, "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"),
    "sam2.1_hiera_small": (184416285, "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38"),
    "sam2.1_hiera_base_plus": (323606802, "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5"),
    "sam2.1_hiera_large": (898083611, "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318"),
}
DINOV2_SMALL_REVISION = "ed25f3a31f01632728cabb09d1542f84ab7b0056"
DINOV2_DIGESTS = {  # hub id -> file -> (size, sha256); dinov2-small at DINOV2_SMALL_REVISION
    "facebook/dinov2-small": {
        "config.json": (547, "1809f83e3bdb1609a501a610ad4a742f4fd8ae44d72ca4aa0df52d1f2ac8628d"),
        "preprocessor_config.json": (436, "14e780d86fa1861f8751f868d7f45425b5feb55c38ca26f152ca5097ab30f828"),
        "model.safetensors": (88249960, "ae1e99fcefd534ed978cdeb8326f08030c96e28b7a81ffcbc98a857c84d14be1"),
    },
    "facebook/dinov2-base": {
        "model.safetensors": (346345912, "d73036b56966966d07975d696bde331762f37297e2f095de8cea0040c3aa0841")},
    "facebook/dinov2-large": {
        "model.safetensors": (1217522888, "399fba97a95f22c36834418bc69373364a99af3a1153da1c0fb31db567c92e23")},
    "facebook/dinov2-giant": {
        "model.safetensors": (4546005432, "917d3c470db999d32a312f8542149be91c7cbac61ee8fb4b67ae3d82b79ce21f")},
}
DINOV2_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


def _sam2(name: str, stem: str, config: str, desc: str) -> WeightSpec:
    size, digest = SAM2_DIGESTS[stem]
    return WeightSpec(name, "sam2", (WeightFile(f"{stem}.pt", f"{SAM2_BASE_URL}/{stem}.pt", digest, size),),
                      config, desc)


def _dino(name: str, hub_id: str, desc: str, revision: str = "main") -> WeightSpec:
    known = DINOV2_DIGESTS.get(hub_id, {})
    files = tuple(WeightFile(f, f"{HF_BASE_URL}/{hub_id}/resolve/{revision}/{f}",
                             known.get(f, (None, None))[1], known.get(f, (None, None))[0]) for f in DINOV2_FILES)
    return WeightSpec(name, "dinov2", files, hub_id, desc)


REGISTRY: dict[str, WeightSpec] = {s.name: s for s in (
    _sam2("sam2.1-hiera-tiny", "sam2.1_hiera_tiny", "configs/sam2.1/sam2.1_hiera_t.yaml", "SAM 2.1 Hiera-T, 39 M params"),
    _sam2("sam2.1-hiera-small", "sam2.1_hiera_small", "configs/sam2.1/sam2.1_hiera_s.yaml", "SAM 2.1 Hiera-S, 46 M"),
    _sam2("sam2.1-hiera-base-plus", "sam2.1_hiera_base_plus", "configs/sam2.1/sam2.1_hiera_b+.yaml", "SAM 2.1 Hiera-B+, 81 M"),
    _sam2("sam2.1-hiera-large", "sam2.1_hiera_large", "configs/sam2.1/sam2.1_hiera_l.yaml", "SAM 2.1 Hiera-L, 224 M"),
    _dino("dinov2-small", "facebook/dinov2-small", "DINOv2 ViT-S/14, 22 M", revision=DINOV2_SMALL_REVISION),
    _dino("dinov2-base", "facebook/dinov2-base", "DINOv2 ViT-B/14, 86 M"),
    _dino("dinov2-large", "facebook/dinov2-large", "DINOv2 ViT-L/14, 300 M"),
    _dino("dinov2-giant", "facebook/dinov2-giant", "DINOv2 ViT-g/14, 1.1 B"),
    _dino("dinov2-with-registers-small", "facebook/dinov2-with-registers-small", "DINOv2-reg ViT-S/14"),
    _dino("dinov2-with-registers-base", "facebook/dinov2-with-registers-base", "DINOv2-reg ViT-B/14"),
    _dino("dinov2-with-registers-large", "facebook/dinov2-with-registers-large", "DINOv2-reg ViT-L/14"),
    _dino("dinov2-with-registers-giant", "facebook/dinov2-with-registers-giant", "DINOv2-reg ViT-g/14"),
)}

SAM2_VARIANTS = {"hiera_t": "sam2.1-hiera-tiny", "hiera_s": "sam2.1-hiera-small",
                 "hiera_b+": "sam2.1-hiera-base-plus", "hiera_l": "sam2.1-hiera-large"}


def weights_dir() -> Path:
    """Where fetched weights live: $RAGSEG_WEIGHTS_DIR, else ~/.cache/ragseg/weights."""
    return Path(os.environ.get("RAGSEG_WEIGHTS_DIR", Path.home() / ".cache" / "ragseg" / "weights"))


def _url(spec: WeightSpec, wf: WeightFile) -> str:
    """The file's URL, or its place on a site mirror ($RAGSEG_WEIGHTS_MIRROR/<name>/<file>)."""
    mirror = os.environ.get("RAGSEG_WEIGHTS_MIRROR")
    return f"{mirror.rstrip('/')}/{spec.name}/{wf.filename}" if mirror else wf.url


def fetch_command_for(name: str) -> str:
    spec = _lookup(name, strict=False)
    return f"ragseg weights fetch {spec.name if spec else name}"


def _lookup(name: str, strict: bool = True) -> WeightSpec | None:
    if name in REGISTRY:
        return REGISTRY[name]
    if name in SAM2_VARIANTS:
        return REGISTRY[SAM2_VARIANTS[name]]
    for spec in REGISTRY.values():  # accept the hub id for DINOv2
        if spec.kind == "dinov2" and spec.config == name:
            return spec
    if strict:
        raise RagsegError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}")
    return None


def spec_dir(spec: WeightSpec, root: Path | None = None) -> Path:
    return (root or weights_dir()) / spec.name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pins_path(root: Path) -> Path:
    return root / "pins.json"


def _read_pins(root: Path) -> dict[str, str]:
    p = _pins_path(root)
    return json.loads(p.read_text()) if p.exists() else {}


def _write_pins(root: Path, pins: dict[str, str]) -> None:
    with atomic_write(_pins_path(root), "w") as fh:
        json.dump(pins, fh, indent=1, sort_keys=True)


def expected_sha256(spec: WeightSpec, wf: WeightFile, root: Path | None = None) -> str | None:
    """The registry digest, else the digest pinned at first fetch, else None."""
    return wf.sha256 or _read_pins(root or weights_dir()).get(f"{spec.name}/{wf.filename}")


def verify(name: str, root: Path | None = None) -> dict[str, str]:
    """Check every file of ``name`` on disk against its digest -> {filename: 'ok'|'unpinned'}."""
    spec = _lookup(name)
    out = {}
    for wf in spec.files:
        p = spec_dir(spec, root) / wf.filename
        if not p.exists():
            raise WeightsMissingError(spec.name, p, fetch_command_for(spec.name))
        if wf.size is not None and p.stat().st_size != wf.size:
            raise ChecksumError(f"{p}: size {p.stat().st_size} bytes, expected {wf.size}; delete it and fetch again")
        want = expected_sha256(spec, wf, root)
        if want is None:
            out[wf.filename] = "unpinned"
            continue
        got = sha256_of(p)
        if got != want:
            raise ChecksumError(f"{p}: SHA-256 {got} does not match expected {want}; delete it and fetch again")
        out[wf.filename] = "ok"
    return out


def _is_weights(filename: str) -> bool:
    return filename.endswith((".pt", ".pth", ".safetensors", ".bin"))


def _download(url: str, dest: Path, size: int | None = None) -> str:
    """Stream ``url`` to a temp file beside ``dest``; return its SHA-256. No rename yet.

    With a known ``size``, a server announcing another length is refused before any byte is
    read, and a body of another length after it (size is checked before the digest).
    """
    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "ragseg-weights-fetch"})
    with urllib.request.urlopen(req, timeout=60) as r, open(dest, "wb") as fh:
        total = int(r.headers.get("Content-Length") or 0) or None
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{url}: size {total} bytes, expected {size}; not downloaded")
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name.lstrip(".")) as bar:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                fh.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    got = dest.stat().st_size
    if size is not None and got != size:
        raise ChecksumError(f"{url}: size {got} bytes, expected {size}; file discarded")
    return h.hexdigest()


def fetch(name: str, *, root: Path | None = None, sha256: str | None = None, pin: bool = False,
          force: bool = False) -> Path:
    """Download and verify ``name`` into the weights directory; returns its folder.

    Args:
        sha256: digest to require for a single-file checkpoint whose digest the registry lacks.
        pin: accept an unknown digest once and record it (trust on first use).
        force: download again even when a verified copy exists.
    """
    spec = _lookup(name)
    root = root or weights_dir()
    d = spec_dir(spec, root)
    d.mkdir(parents=True, exist_ok=True)
    pins = _read_pins(root)
    weights_digest = sha256 is not None or any(f.sha256 for f in spec.files if _is_weights(f.filename))
    for wf in spec.files:
        key = f"{spec.name}/{wf.filename}"
        is_weights = _is_weights(wf.filename)
        want = wf.sha256 or (sha256 if is_weights else None) or pins.get(key)
        # metadata files (config.json) of a checkpoint whose weights digest is known are pinned on
        # first fetch: the weights file is what the digest must protect
        may_pin = pin or (weights_digest and not is_weights)
        dest = d / wf.filename
        if (dest.exists() and not force and want and (wf.size is None or dest.stat().st_size == wf.size)
                and sha256_of(dest) == want):
            logger.info("%s already present and verified", dest)
            continue
        if want is None and not may_pin:
            raise ChecksumError(
                f"no known SHA-256 for {key}: pass --sha256 <digest from the publisher> or --pin to "
                "record the digest of this download and verify against it from now on")
        with atomic_path(dest) as tmp:  # a refused or cut-off download leaves nothing behind
            url = _url(spec, wf)
            got = _download(url, Path(tmp), wf.size)
            if want is not None and got != want:
                raise ChecksumError(f"{url}: size right but SHA-256 {got} does not match expected {want}; "
                                    "file discarded")
        if wf.sha256 is None and pins.get(key) != got:
            pins[key] = got
            _write_pins(root, pins)
            logger.warning("%s has no published digest: pinned on first use to SHA-256 %s (later fetches and "
                           "loads are checked against it)", key, got)
        elif want is not None:
            logger.info("%s verified (%s SHA-256 %s)", key, "registry" if wf.sha256 else "given" if is_weights
                        and sha256 else "pinned", got)
    return d


def digest_status(spec: WeightSpec) -> str:
    """What the registry knows about ``spec``'s files, for ``weights list``."""
    known = [wf for wf in spec.files if wf.sha256]
    if len(known) == len(spec.files):
        return "known"
    if any(_is_weights(wf.filename) for wf in known):
        return "weights known; " + ", ".join(wf.filename for wf in spec.files if not wf.sha256) + " pinned on first use"
    return "unknown: fetch needs --sha256 DIGEST or --pin"


def list_weights(root: Path | None = None) -> list[dict[str, str]]:
    """One row per registry entry with its local state: 'verified', 'present', 'missing'."""
    rows = []
    for spec in REGISTRY.values():
        d = spec_dir(spec, root)
        present = all((d / wf.filename).exists() for wf in spec.files)
        state = "missing"
        if present:
            try:
                state = "verified" if set(verify(spec.name, root).values()) == {"ok"} else "present (unpinned)"
            except ChecksumError:
                state = "CHECKSUM MISMATCH"
        rows.append({"name": spec.name, "kind": spec.kind, "state": state, "digest": digest_status(spec),
                     "path": str(d), "description": spec.description})
    return rows


def resolve_sam2_checkpoint(name_or_path: str, root: Path | None = None) -> tuple[Path, str]:
    """Checkpoint path and Hydra config for a registry name/variant or an explicit .pt path.

    An explicit path must exist; its config is inferred from the file name (hiera_t/s/b+/l).
    """
    spec = _lookup(name_or_path, strict=False)
    if spec is not None and spec.kind == "sam2":
        p = spec_dir(spec, root) / spec.files[0].filename
        if not p.exists():
            raise WeightsMissingError(spec.name, p, fetch_command_for(spec.name))
        return p, spec.config
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise WeightsMissingError(name_or_path, p, "ragseg weights fetch sam2.1-hiera-tiny")
    for spec in REGISTRY.values():
        if spec.kind == "sam2" and spec.files[0].filename.removesuffix(".pt") in p.name:
            return p, spec.config
    raise RagsegError(f"cannot tell the SAM 2.1 variant of {p}; name it like sam2.1_hiera_tiny.pt "
                      "or pass a registry name")


def resolve_dinov2(name_or_path: str, root: Path | None = None) -> Path | None:
    """Local directory for a DINOv2 registry name, hub id, or path; None to use the HF cache."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    spec = _lookup(name_or_path, strict=False)
    if spec is not None and spec.kind == "dinov2":
        d = spec_dir(spec, root)
        if all((d / wf.filename).exists() for wf in spec.files):
            return d
        if name_or_path in REGISTRY:  # a registry name (not a hub id) has nowhere else to look
            raise WeightsMissingError(spec.name, d / "model.safetensors", fetch_command_for(spec.name))
    return None
