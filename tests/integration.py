"""Integration dependencies (Orthanc, Chromium, ../shared/data): skip where absent, fail in CI.

On a fresh clone a test whose PACS, browser or data set is missing is skipped with the reason.
``.ci/run`` sets ``RAGSEG_REQUIRE_INTEGRATION=1``: there the same test fails, so CI can never be
green having tested no PACS, SEG, OHIF or real-data path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRED = os.environ.get("RAGSEG_REQUIRE_INTEGRATION", "") == "1"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def needs(why: str | None) -> pytest.MarkDecorator:
    """Mark for a test that needs something; ``why`` says what is missing (None: all present)."""
    return pytest.mark.needs_missing(why) if why else pytest.mark.needs_missing(None)


def shared_missing(*rel: str) -> str | None:
    """Why files under ../shared/data are unusable, or None."""
    gone = [r for r in rel if not (SHARED_DATA / r).exists()]
    return f"../shared/data/{', '.join(gone)} absent (CI always has it)" if gone else None


def acdc_slab(dst: Path, ids: str | list[str], z: slice = slice(3, 7)) -> Path:
    """Copy ACDC volumes (``<id>.nii.gz`` and ``<id>_gt.nii.gz``) cut to the slices ``z`` into ``dst``.

    A smoke run of a protocol needs every class and the volumes' own in-plane sizes, not all ten
    slices of each heart: each slice is a real LiteMedSAM encode (CI time). nibabel's slicer keeps
    the affine of the cut (its origin moves to the first kept slice).
    """
    import nibabel as nib

    dst.mkdir(parents=True, exist_ok=True)
    for i in ids.split(",") if isinstance(ids, str) else ids:
        for suffix in ("", "_gt"):
            img = nib.load(SHARED_DATA / "acdc-sample" / f"{i}{suffix}.nii.gz")
            nib.save(img.slicer[:, :, z], dst / f"{i}{suffix}.nii.gz")
    return dst
