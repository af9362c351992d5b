"""Our support-memory path equals SAM 2's own video predictor on the same frames.

The predictor gets a JPEG folder (the only input it takes); supports are mask-prompted frames,
the query is tracked from them. Our engine gets the very pixels the predictor decoded
(``inference_state["images"]``) and the same masks. DESIGN.md section 2 lists what must be copied
for bit-exactness; we assert max |diff| <= 1e-6 on the logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ragseg.engine import RagSam2Engine, SupportMemoryCache
from ragseg.sam2_model import VIDEO_PREDICTOR_OVERRIDES, build_sam2

H, W = 150, 176  # frame size: not square, not the model size


def _frames(rng, n):
    """Smooth random frames with a bright blob that moves a little from frame to frame."""
    yy, xx = np.mgrid[0:H, 0:W]
    frames, masks = [], []
    for i in range(n):
        cy, cx = 70 + 3 * i, 80 + 2 * i
        blob = ((yy - cy) ** 2 / 30**2 + (xx - cx) ** 2 / 40**2) <= 1.0
        img = 0.3 + 0.5 * blob + 0.1 * rng.standard_normal((H, W))
        img = np.clip(img, 0, 1)
        frames.append((img * 255).astype(np.uint8))
        masks.append(blob)
    return frames, masks


def _predictor(model, image_size):
    from sam2.build_sam import build_sam2_video_predictor

    pred = build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={image_size}"])
    pred.load_state_dict(model.state_dict(), strict=True)
    return pred.eval()


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [256, 512])
@pytest.mark.parametrize("support_frames,query_frame", [([0], 1), ([0, 3, 5], 6), ([1, 2, 6], 9)])
def test_matches_video_predictor(tmp_path, rng, image_size, support_frames, query_frame):
    model = build_sam2("hiera_t", image_size=image_size, random_weights=True, seed=7)
    pred = _predictor(model, image_size)
    n = query_frame + 1
    frames, masks = _frames(rng, n)
    for i, f in enumerate(frames):
        Image.fromarray(np.stack([f] * 3, -1)).save(tmp_path / f"{i:05d}.jpg", quality=95)

    with torch.inference_mode():
        state = pred.init_state(str(tmp_path))
        for t in support_frames:
            pred.add_new_mask(state, frame_idx=t, obj_id=1, mask=masks[t])
        ref = list(pred.propagate_in_video(state, start_frame_idx=query_frame, max_frame_num_to_track=0))
    assert [r[0] for r in ref] == [query_frame]
    ref_video_res = ref[0][2][0, 0]
    ref_low = state["output_dict_per_obj"][0]["non_cond_frame_outputs"][query_frame]["pred_masks"][0, 0]

    engine = RagSam2Engine(model, model_id="eq", cache=SupportMemoryCache())
    images = torch.stack([state["images"][i] for i in range(n)]).float()
    feats = engine.encode_images(images)
    mems = [engine.encode_support(feats.select([t]), engine.prepare_mask(masks[t])) for t in support_frames]
    low, _ = engine.segment(feats.select([query_frame]), [mems], support_frames=support_frames,
                            query_frame=query_frame, num_frames=n)
    ours_video_res = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)[0, 0]

    assert ref_low.shape == low[0, 0].shape
    d_low = (low[0, 0] - ref_low.float()).abs().max().item()
    d_vid = (ours_video_res - ref_video_res.float()).abs().max().item()
    assert d_low <= 1e-6, d_low
    assert d_vid <= 1e-6, d_vid
    # the comparison is not vacuous: logits vary and the two paths see different supports
    assert ref_low.float().std() > 1e-3


def test_overrides_match_predictor_builder():
    """Our model config copies the video predictor's overrides (read from sam2's source)."""
    import inspect

    from sam2 import build_sam

    src = inspect.getsource(build_sam.build_sam2_video_predictor)
    for o in VIDEO_PREDICTOR_OVERRIDES:
        assert o.split("=")[0] in src


@pytest.mark.slow
def test_cached_memories_equal_fresh(tmp_path, sam2_model, rng):
    """Memories read back from the disk cache give the same logits as freshly computed ones."""
    from ragseg.engine import Support

    imgs = [rng.random((90, 100)).astype(np.float32) for _ in range(3)]
    masks = [np.zeros((90, 100), bool) for _ in range(3)]
    for i, m in enumerate(masks):
        m[20 + 5 * i:60, 30:70 + 4 * i] = True
    sups = [Support(f"k{i}", (lambda i=i: (imgs[i], masks[i]))) for i in range(3)]
    query = sam2_model and rng.random((1, 90, 100)).astype(np.float32)

    fresh = RagSam2Engine(sam2_model, model_id="c", cache=SupportMemoryCache(tmp_path / "cache"))
    q = fresh.encode_images(fresh.prepare_images(query))
    a, _ = fresh.segment(q, [fresh.support_memories(sups)])
    assert fresh.cache.misses == 3

    # new engine, empty RAM: memories come from disk; loaders must not be called
    cached = RagSam2Engine(sam2_model, model_id="c", cache=SupportMemoryCache(tmp_path / "cache"))
    boom = [Support(s.key, lambda: (_ for _ in ()).throw(AssertionError("recomputed"))) for s in sups]
    b, _ = cached.segment(q, [cached.support_memories(boom)])
    assert cached.cache.hits == 3 and cached.cache.misses == 0
    assert torch.equal(a, b)

    # another model id never reuses these memories
    other = RagSam2Engine(sam2_model, model_id="other", cache=SupportMemoryCache(tmp_path / "cache"))
    other.support_memories(sups)
    assert other.cache.misses == 3


@pytest.mark.slow
def test_batched_queries_match_one_by_one(sam2_model, rng):
    from ragseg.engine import Support

    eng = RagSam2Engine(sam2_model, model_id="b", object_batch=3)
    sup = []
    for i in range(4):
        m = np.zeros((64, 64), bool)
        m[10 + i:40, 12:44 - i] = True
        img = rng.random((64, 64)).astype(np.float32)
        sup.append(Support(f"b{i}", (lambda img=img, m=m: (img, m))))
    mems = eng.support_memories(sup)
    feats = eng.encode_images(eng.prepare_images(rng.random((4, 64, 64)).astype(np.float32)))
    lists = [mems[:2], mems[2:], mems[1:3], mems[::2]]
    batched, _ = eng.segment(feats, lists)
    for i in range(4):
        single, _ = eng.segment(feats.select([i]), [lists[i]])
        assert (single[0] - batched[i]).abs().max().item() < 1e-4


@pytest.mark.slow
def test_feature_cache_is_exact_and_bounded(sam2_model, rng):
    from ragseg.engine import FeatureCache

    eng = RagSam2Engine(sam2_model, model_id="f", feature_cache=FeatureCache())
    x = eng.prepare_images(rng.random((3, 50, 60)).astype(np.float32))
    fresh = eng.encode_images(x)
    a = eng.encode_images_cached(x)
    assert eng.features.misses == 3 and eng.features.hits == 0
    b = eng.encode_images_cached(x[[2, 0]])  # a later request, another subset and order
    assert eng.features.hits == 2
    for lvl in range(len(fresh.vision_feats)):
        assert torch.equal(a.vision_feats[lvl], fresh.vision_feats[lvl])
        assert torch.equal(a.vision_pos[lvl], fresh.vision_pos[lvl])
        assert torch.equal(b.vision_feats[lvl], fresh.vision_feats[lvl][:, [2, 0]])
    per_slice = sum(f[:, :1].numel() * 4 for f in fresh.vision_feats)
    small = RagSam2Engine(sam2_model, model_id="f", feature_cache=FeatureCache(max_bytes=2 * per_slice))
    small.encode_images_cached(x)
    assert len(small.features._d) == 2 and small.features._bytes <= 2 * per_slice


def test_feature_cache_disk_tier_survives_a_new_process_and_drops_corrupt_files(tmp_path):
    import torch

    from ragseg.engine import FeatureCache

    a = FeatureCache(max_bytes=1 << 20, directory=tmp_path)
    x = [torch.arange(12, dtype=torch.float16).reshape(3, 4)]
    a.put("k1", x)
    b = FeatureCache(max_bytes=1 << 20, directory=tmp_path)  # a new run: RAM empty, the disk has it
    got = b.get("k1")
    assert got is not None and torch.equal(got[0], x[0]) and b.hits == 1
    assert not list(tmp_path.rglob(".partial-*"))
    f = next(tmp_path.rglob("k1.pt"))
    f.write_bytes(b"not a tensor")
    c = FeatureCache(max_bytes=1 << 20, directory=tmp_path)
    assert c.get("k1") is None and not f.exists() and c.misses == 1
