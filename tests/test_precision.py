"""Fine-tuning arithmetic: bf16 autocast where asked (weights and loss stay float32), float32 otherwise."""

from __future__ import annotations

import pytest
import torch

from ragseg import precision
from tests.test_fewshot import _slices


def test_resolve_precision():
    assert precision.resolve("float32") == "float32"
    assert precision.resolve("bf16") == "bf16"
    auto = precision.resolve("auto")
    assert auto == ("bf16" if precision.cpu_has_native_bf16() else "float32")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("fp8")


def test_auto_needs_native_bf16_instructions(monkeypatch, tmp_path):
    """oneDNN reports bf16 support on any AVX512 CPU; "auto" also wants the CPU's bf16 flags."""
    import pathlib

    real = pathlib.Path.read_text

    def fake_cpuinfo(flags):
        def read_text(self, *a, **kw):
            return f"flags\t: fpu sse2 avx2 {flags}\n" if str(self) == "/proc/cpuinfo" else real(self, *a, **kw)
        return read_text

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for flags, want in (("avx512f avx512bw", False), ("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True)):
        precision.cpu_has_native_bf16.cache_clear()
        monkeypatch.setattr(pathlib.Path, "read_text", fake_cpuinfo(flags))
        assert precision.cpu_has_native_bf16() is want, flags
        assert precision.resolve("auto") == ("bf16" if want else "float32")
    precision.cpu_has_native_bf16.cache_clear()


def test_finetune_in_bf16_runs_the_decoder_in_bfloat16_and_keeps_float32_weights():
    from ragseg.engine import RagSam2Engine
    from ragseg.fewshot import PrototypeDecoder, Sam2Adapter, build_training_set, finetune
    from ragseg.sam2_model import build_sam2

    eng = RagSam2Engine(build_sam2("hiera_t", image_size=128, random_weights=True, seed=3), model_id="t")
    ad = Sam2Adapter(eng)
    x, y = _slices([1])
    ts = build_training_set(ad, x, y, [1, 2])

    def run(prec):
        torch.manual_seed(0)
        dec = PrototypeDecoder(ad, use_box=True, location_prior=None)
        seen = set()
        hook = dec.decoder.output_hypernetworks_mlps[0].layers[0].register_forward_hook(
            lambda m, i, o: seen.add(o.dtype))
        res = finetune(dec, ts, epochs=3, lr=1e-3, seed=0, max_episodes=8, precision=prec)
        hook.remove()
        return dec, res, seen

    dec16, res16, seen16 = run("bf16")
    dec32, res32, seen32 = run("float32")
    assert res16.precision == "bf16" and seen16 == {torch.bfloat16}
    assert res32.precision == "float32" and seen32 == {torch.float32}
    assert all(p.dtype == torch.float32 for p in dec16.parameters())
    # it trained: weights moved, and not along the float32 run's path to the bit
    w16, w32 = dec16.state_dict(), dec32.state_dict()
    assert any(not torch.equal(w16[k], w32[k]) for k in w16 if w16[k].is_floating_point())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res16.history)
