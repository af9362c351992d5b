"""Slice embedders for retrieval: ``embed(slices) -> float32 [n, d]``, rows L2-normalised.

The index stores the embedder's :attr:`Embedder.id`; when it changes (another model, pooling or
input size), stored vectors are no longer comparable and the index is rebuilt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from . import defaults
from .errors import RagsegError, WeightsMissingError
from .volume import resize_slices, to_model_input

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")


@runtime_checkable
class Embedder(Protocol):
    """What the index needs from an embedder."""

    id: str  # identifies model, pooling and input size; stored with every vector
    dim: int

    def embed(self, slices: np.ndarray | torch.Tensor) -> np.ndarray:
        """[n, H, W] slices with intensities in [0, 1] -> float32 [n, dim], unit rows."""
        ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, eps)).astype(np.float32, copy=False)


def preprocessor_norm(folder: Path | None) -> dict:
    """``{'mean', 'std'}`` from a checkpoint folder's ``preprocessor_config.json`` ({} if absent)."""
    import json

    p = Path(folder) / "preprocessor_config.json" if folder else None
    if p is None or not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text())
        out = {"mean": tuple(float(x) for x in cfg["image_mean"]), "std": tuple(float(x) for x in cfg["image_std"])}
    except (ValueError, KeyError, TypeError) as e:
        raise RagsegError(f"{p}: unreadable image_mean/image_std ({e})") from None
    if len(out["mean"]) != 3 or len(out["std"]) != 3 or min(out["std"]) <= 0:
        raise RagsegError(f"{p}: image_mean/image_std must be 3 numbers each, std > 0")
    return out


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; otherwise the named device (checked to exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RagsegError(f"device {device!r} requested but no CUDA GPU is available")
    return d


class DinoV2Embedder:
    """DINOv2 (or DINOv2 with registers) from ``transformers`` as a slice embedder.

    Args:
        model: a ``Dinov2Model`` / ``Dinov2WithRegistersModel`` in eval mode.
        name: identifies the weights (hub id, directory name, or 'random:<seed>' in tests).
        pooling: 'cls' (layer-normed CLS token) or 'mean' (mean of the patch tokens).
        image_size: side of the square input; a multiple of the patch size.
        batch_size: slices per forward pass.
        device: 'auto', 'cpu', 'cuda', 'cuda:1', ...
        mean, std: input normalisation; :meth:`from_pretrained` takes them from the checkpoint's
            ``preprocessor_config.json`` (ImageNet's for the official DINOv2 checkpoints).

    Preprocessing differs from the checkpoint's image processor on purpose in one way: the whole
    slice is resized to ``image_size`` x ``image_size`` (bilinear, antialiased when shrinking)
    instead of shortest edge 256 then a 224 centre crop. A crop would drop the slice's borders,
    where anatomy that tells slices apart lies (a photo's subject is centred; a slice's is not),
    and a fixed square keeps one batch shape for slices of any size.
    """

    def __init__(self, model: torch.nn.Module, *, name: str, pooling: str = "cls",
                 image_size: int = defaults.DINOV2_IMAGE_SIZE, batch_size: int = defaults.EMBED_BATCH,
                 device: str = "auto", mean: tuple[float, ...] = defaults.IMAGENET_MEAN,
                 std: tuple[float, ...] = defaults.IMAGENET_STD):
        if pooling not in POOLINGS:
            raise RagsegError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        patch = int(model.config.patch_size)
        if image_size % patch:
            raise RagsegError(f"DINOv2 image_size {image_size} is not a multiple of its patch size {patch}")
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.pooling = pooling
        self.image_size = image_size
        self.batch_size = max(1, int(batch_size))
        self.num_registers = int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.dim = int(model.config.hidden_size)
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        norm = "" if (self.mean, self.std) == (defaults.IMAGENET_MEAN, defaults.IMAGENET_STD) else (
            ":norm" + ",".join(f"{x:g}" for x in self.mean + self.std))
        self.id = f"dinov2:{name}:{pooling}:{image_size}{norm}"

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, allow_download: bool = False, **kwargs) -> DinoV2Embedder:
        """Load official weights from a local directory or the Hugging Face cache.

        Nothing is downloaded unless ``allow_download`` (the ``weights fetch`` command does the
        fetching, with checksums); a missing model raises :class:`WeightsMissingError`.
        """
        from transformers import AutoModel

        from .weights import fetch_command_for, resolve_dinov2

        local = resolve_dinov2(name_or_path)
        try:
            model, info = AutoModel.from_pretrained(str(local) if local else name_or_path,
                                                    local_files_only=not allow_download, output_loading_info=True)
        except OSError as e:
            raise WeightsMissingError(name_or_path, local or name_or_path, fetch_command_for(name_or_path)) from e
        # transformers fills missing weights with random values and only logs it: refuse instead
        # (a folder of another model, or a truncated conversion, would retrieve at random)
        bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys", "unexpected_keys") if info.get(k)}
        if bad:
            detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:5]))}"
                               f"{f' (+{len(v) - 5} more)' if len(v) > 5 else ''}" for k, v in bad.items())
            raise RagsegError(f"DINOv2 weights at {local or name_or_path} do not match the model they declare "
                              f"({detail}); not using them. Re-fetch with `{fetch_command_for(name_or_path)}`")
        name = Path(name_or_path).name if local else name_or_path
        return cls(model, name=name, **{**preprocessor_norm(local), **kwargs})

    def model_input(self, slices01: torch.Tensor) -> torch.Tensor:
        """[n, 1, S, S] in [0, 1] -> [n, 3, S, S] normalised with the checkpoint's mean/std."""
        return to_model_input(slices01, self.mean, self.std)

    @classmethod
    def random(cls, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
               patch_size: int = 14, **kwargs) -> DinoV2Embedder:
        """A small DINOv2 with random weights. For tests and benchmarks only."""
        from transformers import Dinov2Config, Dinov2Model

        torch.manual_seed(seed)
        cfg = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, intermediate_size=hidden_size * 4,
                           patch_size=patch_size, image_size=kwargs.get("image_size", defaults.DINOV2_IMAGE_SIZE))
        return cls(Dinov2Model(cfg), name=f"random-{hidden_size}x{num_layers}-seed{seed}", **kwargs)

    # -- inference ------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, slices: np.ndarray | torch.Tensor) -> np.ndarray:
        """[n, H, W] slices in [0, 1] -> float32 [n, dim] with unit-norm rows."""
        n = len(slices)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for s in range(0, n, self.batch_size):
            x = resize_slices(slices[s:s + self.batch_size], self.image_size)
            x = self.model_input(x).to(self.device)
            hidden = self.model(pixel_values=x).last_hidden_state  # [b, 1 + regs + patches, d]
            if self.pooling == "cls":
                feat = hidden[:, 0]
            else:
                feat = hidden[:, 1 + self.num_registers:].mean(dim=1)
            out.append(feat.float().cpu().numpy())
        return l2_normalize(np.concatenate(out, axis=0))
