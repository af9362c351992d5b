"""Weights: registry, checksum-verified fetch (from a loopback mirror), strict loading, clear errors."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torch

from ragseg import weights
from ragseg.errors import ChecksumError, RagsegError, WeightsMissingError


@pytest.fixture()
def mirror(tmp_path, monkeypatch):
    """A loopback HTTP server acting as a site mirror (``<mirror>/<name>/<file>``); returns its folder."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("RAGSEG_WEIGHTS_MIRROR", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.setenv("RAGSEG_WEIGHTS_DIR", str(tmp_path / "weights"))
    yield root
    srv.shutdown()


def _serve(root, name: str, files: dict[str, bytes]) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    for f, data in files.items():
        (root / name / f).write_bytes(data)


def test_registry_has_all_official_checkpoints_with_digests():
    names = set(weights.REGISTRY)
    for n in ("sam2.1-hiera-tiny", "sam2.1-hiera-small", "sam2.1-hiera-base-plus", "sam2.1-hiera-large",
              "dinov2-small", "dinov2-base", "dinov2-large", "dinov2-giant", "dinov2-with-registers-small"):
        assert n in names
    assert weights.REGISTRY["sam2.1-hiera-large"].files[0].url.endswith("/092824/sam2.1_hiera_large.pt")
    hexd = set("0123456789abcdef")
    for spec in weights.REGISTRY.values():
        for wf in spec.files:
            assert wf.sha256 is None or (len(wf.sha256) == 64 and set(wf.sha256) <= hexd), (spec.name, wf)
            assert (wf.sha256 is None) == (wf.size is None), (spec.name, wf)
    for n in ("sam2.1-hiera-tiny", "sam2.1-hiera-small", "sam2.1-hiera-base-plus", "sam2.1-hiera-large",
              "dinov2-small"):
        assert all(wf.sha256 for wf in weights.REGISTRY[n].files), n  # every file known
        assert weights.digest_status(weights.REGISTRY[n]) == "known"
    for n in ("dinov2-base", "dinov2-large", "dinov2-giant"):
        sf = next(wf for wf in weights.REGISTRY[n].files if wf.filename == "model.safetensors")
        assert sf.sha256 and weights.digest_status(weights.REGISTRY[n]).startswith("weights known")
    # dinov2-small comes from the revision its digests belong to
    small = weights.REGISTRY["dinov2-small"]
    assert {wf.filename for wf in small.files} == {"config.json", "preprocessor_config.json", "model.safetensors"}
    assert all(f"/resolve/{weights.DINOV2_SMALL_REVISION}/" in wf.url for wf in small.files)
    rows = {r["name"]: r for r in weights.list_weights()}
    assert rows["sam2.1-hiera-tiny"]["digest"] == "known"
    assert rows["dinov2-with-registers-small"]["digest"].startswith("unknown")


def test_wrong_size_or_digest_from_the_mirror_is_refused_and_not_kept(mirror, tmp_path):
    dest = tmp_path / "weights" / "dinov2-small"
    cfg = next(wf for wf in weights.REGISTRY["dinov2-small"].files if wf.filename == "config.json")
    _serve(mirror, "dinov2-small", {"config.json": b"x" * (cfg.size - 1)})
    with pytest.raises(ChecksumError, match=r"size 546 bytes, expected 547"):
        weights.fetch("dinov2-small")
    assert list(dest.iterdir()) == []  # nothing kept, no temp file
    _serve(mirror, "dinov2-small", {"config.json": b"x" * cfg.size})  # right size, wrong bytes
    with pytest.raises(ChecksumError, match="size right but SHA-256"):
        weights.fetch("dinov2-small")
    assert list(dest.iterdir()) == []
    # a checkpoint of the wrong size is refused from the announced length, before its body is read
    _serve(mirror, "sam2.1-hiera-tiny", {"sam2.1_hiera_tiny.pt": b"not really a checkpoint"})
    with pytest.raises(ChecksumError, match="size 23 bytes, expected 156008466; not downloaded"):
        weights.fetch("sam2.1-hiera-tiny")
    assert list((tmp_path / "weights" / "sam2.1-hiera-tiny").iterdir()) == []
    # a file on disk of the wrong size is caught by verify, size first
    (dest / "config.json").write_bytes(b"{}")
    for f in ("preprocessor_config.json", "model.safetensors"):
        (dest / f).write_bytes(b"{}")
    with pytest.raises(ChecksumError, match="size 2 bytes, expected 547"):
        weights.verify("dinov2-small")


def test_unknown_digest_needs_sha256_or_pin(mirror, tmp_path):
    name = "dinov2-with-registers-small"
    payload = b"not really safetensors " * 1000
    _serve(mirror, name, {"config.json": b"{}", "preprocessor_config.json": b"{}", "model.safetensors": payload})
    digest = hashlib.sha256(payload).hexdigest()
    with pytest.raises(ChecksumError, match="no known SHA-256"):
        weights.fetch(name)
    with pytest.raises(ChecksumError, match="does not match"):
        weights.fetch(name, sha256="0" * 64)
    dest = tmp_path / "weights" / name
    assert not (dest / "model.safetensors").exists()
    d = weights.fetch(name, sha256=digest)  # weights by the given digest, configs pinned on first use
    assert weights.sha256_of(d / "model.safetensors") == digest
    # the given digest is remembered, so later loads are checked too
    assert weights.verify(name) == {"config.json": "ok", "preprocessor_config.json": "ok", "model.safetensors": "ok"}
    (d / "config.json").write_bytes(b'{"tampered": 1}')
    with pytest.raises(ChecksumError):
        weights.verify(name)
    rows = {r["name"]: r["state"] for r in weights.list_weights()}
    assert rows[name] == "CHECKSUM MISMATCH" and rows["dinov2-small"] == "missing"


def test_fetch_pin_trust_on_first_use(mirror):
    name = "dinov2-with-registers-base"
    payload = b"weights " * 100
    _serve(mirror, name, {"config.json": b"{}", "preprocessor_config.json": b"{}", "model.safetensors": payload})
    d = weights.fetch(name, pin=True)
    assert set(weights.verify(name).values()) == {"ok"}
    spec = weights.REGISTRY[name]
    sf = next(wf for wf in spec.files if wf.filename == "model.safetensors")
    assert weights.expected_sha256(spec, sf) == hashlib.sha256(payload).hexdigest()
    assert d.exists()


def test_missing_weights_name_file_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGSEG_WEIGHTS_DIR", str(tmp_path))
    from ragseg.sam2_model import build_sam2

    with pytest.raises(WeightsMissingError) as ei:
        build_sam2("hiera_t")  # no implicit download, no random fallback
    msg = str(ei.value)
    assert str(tmp_path / "sam2.1-hiera-tiny" / "sam2.1_hiera_tiny.pt") in msg
    assert "ragseg weights fetch sam2.1-hiera-tiny" in msg
    from ragseg.embedders import DinoV2Embedder

    with pytest.raises(WeightsMissingError, match="ragseg weights fetch dinov2-small"):
        DinoV2Embedder.from_pretrained("dinov2-small")


@pytest.mark.slow
def test_official_checkpoint_format_loads_strictly(tmp_path):
    """A checkpoint in the official layout ({'model': state_dict}) loads strictly and reproduces outputs."""
    from ragseg.sam2_model import build_sam2

    src = build_sam2("hiera_t", image_size=128, random_weights=True, seed=3)
    ckpt = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": src.state_dict()}, ckpt)
    loaded = build_sam2("hiera_t", checkpoint=ckpt, image_size=128)
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        a = src.forward_image(x)["vision_features"]
        b = loaded.forward_image(x)["vision_features"]
    assert torch.equal(a, b)
    sd = src.state_dict()
    sd.pop(next(iter(sd)))
    torch.save({"model": sd}, tmp_path / "broken_sam2.1_hiera_tiny.pt")
    with pytest.raises(RagsegError, match="1 missing keys"):
        build_sam2("hiera_t", checkpoint=tmp_path / "broken_sam2.1_hiera_tiny.pt", image_size=128)


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_from_local_directory(tmp_path, rng, registers):
    """Official loading path (transformers from_pretrained on a directory), incl. register variants."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from ragseg.embedders import DinoV2Embedder

    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14)
    model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw)) if registers
             else Dinov2Model(Dinov2Config(**kw)))
    model.save_pretrained(tmp_path / "dino")
    slices = rng.random((5, 40, 50)).astype(np.float32)
    for pooling in ("cls", "mean"):
        direct = DinoV2Embedder(model.eval(), name="x", pooling=pooling, image_size=56).embed(slices)
        loaded = DinoV2Embedder.from_pretrained(str(tmp_path / "dino"), pooling=pooling, image_size=56)
        assert loaded.num_registers == (4 if registers else 0)
        assert np.allclose(loaded.embed(slices), direct, atol=1e-6)
        assert loaded.id.startswith("dinov2:dino:")


def test_embedder_contract(dino_embedder, rng):
    from ragseg.embedders import DinoV2Embedder, Embedder

    assert isinstance(dino_embedder, Embedder)
    s = rng.random((7, 30, 40)).astype(np.float32)
    e = dino_embedder.embed(s)
    assert e.dtype == np.float32 and e.shape == (7, dino_embedder.dim)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    one_by_one = np.concatenate([dino_embedder.embed(s[i:i + 1]) for i in range(7)])
    assert np.allclose(e, one_by_one, atol=1e-5)  # batching does not change results
    mean = DinoV2Embedder(dino_embedder.model, name="same", pooling="mean", image_size=56).embed(s)
    assert not np.allclose(mean, e) and mean.shape == e.shape
    assert dino_embedder.embed(s[:0]).shape == (0, dino_embedder.dim)


def test_dinov2_folder_with_missing_weights_is_refused(tmp_path):
    """transformers would fill the missing tensors with random values and only log it."""
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    from ragseg.embedders import DinoV2Embedder

    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14)
    Dinov2Model(Dinov2Config(**kw)).save_pretrained(tmp_path / "dino")
    DinoV2Embedder.from_pretrained(str(tmp_path / "dino"), image_size=56)  # intact: loads
    f = tmp_path / "dino" / "model.safetensors"
    sd = load_file(str(f))
    gone = sorted(k for k in sd if "encoder.layer.0.attention" in k)[:2]
    for k in gone:
        sd.pop(k)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(RagsegError, match="missing keys") as e:
        DinoV2Embedder.from_pretrained(str(tmp_path / "dino"), image_size=56)
    assert gone[0].removeprefix("dinov2.") in str(e.value) or gone[0] in str(e.value)
    assert "ragseg weights fetch" in str(e.value)
