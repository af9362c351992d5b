"""Our slice -> model input equals what SAM 2 and the DINOv2 checkpoint's image processor produce."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ragseg.engine import RagSam2Engine
from ragseg.sam2_model import build_sam2
from ragseg.volume import resize_slices

S = 256  # SAM 2 input size used here (the kernel path is the same at 1024)


@pytest.fixture(scope="module")
def engine():
    return RagSam2Engine(build_sam2("hiera_t", image_size=S, random_weights=True, seed=0), model_id="t")


def _u8(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.5 + 0.3 * np.sin(yy / 7.0) * np.cos(xx / 5.0) + 0.1 * rng.standard_normal((h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("hw", [(150, 176), (S, S), (400, 300)])
def test_sam2_input_equals_the_image_predictor_transform(engine, rng, hw):
    """``SAM2ImagePredictor.set_image`` runs ``predictor._transforms``: ToTensor, Resize (bilinear,
    antialiased), Normalize. Ours does the same ops on the same 8-bit grey image replicated to RGB;
    the tolerance is float32 rounding (/255 in float64 vs float32)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    u8 = _u8(rng, *hw)
    theirs = SAM2ImagePredictor(engine.model)._transforms(np.repeat(u8[..., None], 3, axis=2))
    ours = engine.prepare_images((u8 / 255.0)[None])[0]
    assert ours.shape == theirs.shape == (3, S, S)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_sam2_input_equals_the_video_predictor_frames(engine, rng, tmp_path):
    """The video predictor reads JPEGs and resizes with PIL (bicubic, on 8-bit values). On frames
    already at the model size there is no resize, and our input equals its frames to float
    rounding. On other sizes the kernels differ (PIL bicubic on uint8 vs bilinear on floats), most
    on high-frequency content: on this noisy test image 0.063 mean / 0.35 max in normalised units
    (1 unit = 0.229 of the intensity range: about 1.4 % on average). The bound leaves room for
    other CPUs; the engine-equivalence test feeds both paths the same decoded pixels so that its
    masks compare bit for bit."""
    from sam2.utils.misc import load_video_frames

    for i, hw in enumerate([(S, S), (150, 176)]):
        d = tmp_path / f"frames{i}"
        d.mkdir()
        u8 = _u8(rng, *hw)
        Image.fromarray(u8).convert("RGB").save(d / "00000.jpg", quality=100)
        decoded = np.asarray(Image.open(d / "00000.jpg").convert("L"), dtype=np.float64)
        frames, _, _ = load_video_frames(str(d), S, offload_video_to_cpu=True, compute_device="cpu")
        ours = engine.prepare_images((decoded / 255.0)[None])[0]
        diff = (ours - frames[0].float()).abs()
        if hw == (S, S):
            assert float(diff.max()) < 0.05, float(diff.max())  # JPEG chroma rounding of grey, no resize
        else:
            assert float(diff.mean()) < 0.1 and float(diff.max()) < 0.7, (float(diff.mean()), float(diff.max()))


def test_dinov2_input_follows_preprocessor_config(tmp_path, rng):
    """mean/std come from the checkpoint's preprocessor_config.json; at the model size (no resize)
    our pixel values equal transformers' image processor's with its crop/resize off. Deliberate
    difference (documented in DinoV2Embedder): the whole slice is resized to a square, no centre crop."""
    from transformers import AutoImageProcessor, Dinov2Config, Dinov2Model

    from ragseg.embedders import DinoV2Embedder

    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14)
    Dinov2Model(Dinov2Config(**kw)).save_pretrained(tmp_path / "dino")
    official = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
                "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
                "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
                "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}}
    for mean, std in (([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])):
        (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps({**official, "image_mean": mean,
                                                                                "image_std": std}))
        emb = DinoV2Embedder.from_pretrained(str(tmp_path / "dino"), image_size=56)
        assert emb.mean == tuple(mean) and emb.std == tuple(std)
        u8 = _u8(rng, 56, 56)
        proc = AutoImageProcessor.from_pretrained(str(tmp_path / "dino"))
        theirs = proc(images=np.repeat(u8[..., None], 3, axis=2), do_resize=False, do_center_crop=False,
                      return_tensors="pt").pixel_values[0]
        ours = emb.model_input(resize_slices((u8 / 255.0)[None], 56))[0]
        assert torch.allclose(ours, theirs.float(), atol=1e-5), float((ours - theirs).abs().max())
    # another normalisation means other vectors: it is part of the index identity
    assert emb.id != DinoV2Embedder.from_pretrained(str(tmp_path / "dino"), image_size=56, mean=official["image_mean"],
                                                    std=official["image_std"]).id
