"""Shared fixtures: small random-weight models (real SAM 2 / DINOv2 architectures) and data."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# This checkout's library wins over whatever clone the shared venv's editable install points at,
# here and in the subprocesses tests start (server, CLI).
LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
sys.path.insert(0, LIB)
os.environ["PYTHONPATH"] = os.pathsep.join([LIB] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
# tools installed into the venv (dcmqi's itkimage2segimage, monailabel) must be found by name
os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"

# Small model sizes keep CPU tests fast; the code paths are the ones used at 1024.
TEST_SAM2_SIZE = 256


def pytest_runtest_setup(item):
    """``needs_missing(why)``: skip with the reason, or fail under RAGSEG_REQUIRE_INTEGRATION=1."""
    from .integration import REQUIRED

    for m in item.iter_markers("needs_missing"):
        why = m.args[0] if m.args else None
        if why:
            if REQUIRED:
                pytest.fail(f"RAGSEG_REQUIRE_INTEGRATION=1 and {why}", pytrace=False)
            pytest.skip(why)


@pytest.fixture(scope="session")
def sam2_model():
    from ragseg.sam2_model import build_sam2

    return build_sam2("hiera_t", image_size=TEST_SAM2_SIZE, random_weights=True, seed=0)


@pytest.fixture(scope="session")
def dino_embedder():
    from ragseg.embedders import DinoV2Embedder

    return DinoV2Embedder.random(seed=0, image_size=56)


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)
