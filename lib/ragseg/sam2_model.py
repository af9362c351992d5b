"""Build SAM 2.1 models from the official ``sam2`` package configs.

The model is configured exactly as ``sam2.build_sam.build_sam2_video_predictor`` configures it
(the same Hydra overrides), but instantiated as a plain ``SAM2Base``: our engine calls SAM 2's own
``track_step`` with in-memory slices instead of a JPEG folder, and must behave like the video
predictor on the same frames (tests/test_engine_equivalence.py checks it).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from . import defaults
from .errors import RagsegError
from .weights import SAM2_VARIANTS, resolve_sam2_checkpoint

logger = logging.getLogger(__name__)

SAM2_CONFIGS = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}

# The overrides build_sam2_video_predictor applies on top of the config (sam2 1.1.0), minus
# fill_hole_area, which belongs to the predictor class and needs the sam2._C extension anyway.
VIDEO_PREDICTOR_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    # support masks are user input: binarise them for the memory encoder, as the predictor does
    "++model.binarize_mask_from_pts_for_mem_enc=true",
)

_hydra_lock = threading.Lock()


def _compose(config: str, overrides: list[str]):
    """Compose a sam2 Hydra config, re-initialising Hydra if someone else took it over.

    ``monailabel.sam2.infer`` re-initialises global Hydra to its own folder; after that,
    sam2's package configs are not found until Hydra points at the sam2 module again.
    """
    import sam2  # noqa: F401  (initialises Hydra on the sam2 config module at import)
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with _hydra_lock:
        try:
            return compose(config_name=config, overrides=overrides)
        except Exception as first:  # MissingConfigException, or Hydra not initialised at all
            logger.info("re-initialising Hydra on the sam2 config module (%s)", type(first).__name__)
            GlobalHydra.instance().clear()
            initialize_config_module("sam2", version_base="1.2")
            return compose(config_name=config, overrides=overrides)


def build_sam2(variant: str = "hiera_t", *, checkpoint: str | Path | None = None,
               image_size: int = defaults.SAM2_IMAGE_SIZE, device: str | torch.device = "cpu",
               random_weights: bool = False, seed: int = 0) -> torch.nn.Module:
    """Build a SAM 2.1 model in eval mode.

    Args:
        variant: 'hiera_t', 'hiera_s', 'hiera_b+' or 'hiera_l' (config to use when
            ``checkpoint`` is an explicit path the variant cannot be inferred from).
        checkpoint: registry name ('sam2.1-hiera-tiny') or path to an official ``.pt``.
            Loaded strictly: any missing or unexpected key is an error.
        image_size: input side in pixels (multiple of 32; 1024 is the official size).
        random_weights: build with random initialisation instead of a checkpoint. Tests and
            benchmarks only; user-facing code must never set it (no silent fallback).
        seed: RNG seed for random weights.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if variant not in SAM2_CONFIGS:
        raise RagsegError(f"unknown SAM 2 variant {variant!r}; use one of {', '.join(SAM2_CONFIGS)}")
    if image_size % 32:
        raise RagsegError(f"SAM 2 image_size must be a multiple of 32, got {image_size}")
    ckpt_path = None
    config = SAM2_CONFIGS[variant]
    if random_weights:
        if checkpoint is not None:
            raise RagsegError("pass either a checkpoint or random_weights=True, not both")
    else:
        if checkpoint is None:
            checkpoint = SAM2_VARIANTS[variant]  # the official weights in the weights cache
        ckpt_path, config = resolve_sam2_checkpoint(str(checkpoint))
    overrides = list(VIDEO_PREDICTOR_OVERRIDES) + [f"++model.image_size={int(image_size)}"]
    cfg = _compose(config, overrides)
    OmegaConf.resolve(cfg)
    if random_weights:
        torch.manual_seed(seed)
    model = instantiate(cfg.model, _recursive_=True)
    if ckpt_path is not None:
        _load_checkpoint_strict(model, ckpt_path)
    else:
        _make_objects_visible(model)
    return model.to(device).eval()


def _make_objects_visible(model: torch.nn.Module, bias: float = 10.0) -> None:
    """Random weights score every object as absent, so every mask would be NO_OBJ_SCORE.

    Shift the object-score head's output bias so random-weight models (tests, benchmarks)
    produce real, varying logits and comparisons between code paths are not vacuous.
    """
    head = getattr(model.sam_mask_decoder, "pred_obj_score_head", None)
    last = head.layers[-1] if hasattr(head, "layers") else head
    if isinstance(last, torch.nn.Linear):
        with torch.no_grad():
            last.bias.fill_(bias)


def _load_checkpoint_strict(model: torch.nn.Module, path: Path) -> None:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise RagsegError(f"{path}: cannot read SAM 2 checkpoint ({type(e).__name__}: {e})") from e
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RagsegError(f"{path}: checkpoint does not match the model config: "
                          f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                          f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    logger.info("loaded SAM 2 checkpoint %s", path)


def model_id(variant: str, image_size: int, checkpoint: str | Path | None = None, seed: int | None = None) -> str:
    """A string that changes whenever the model's outputs (and support memories) would change."""
    src = f"ckpt={Path(str(checkpoint)).name}" if checkpoint else f"random-seed{seed}"
    return f"sam2.1-{variant}:{src}:{int(image_size)}"
