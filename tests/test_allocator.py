"""ragseg.allocator: importing ragseg keeps freed buffers in the process (no re-faulting)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate and free a 48 MB buffer repeatedly, as a layer's activations are for every slice: above
# glibc's largest dynamic mmap threshold (32 MB), so with its defaults each one is fresh pages.
PROBE = """
import resource
import numpy as np
import ragseg
for _ in range(2):
    np.ones(48 << 20, np.uint8)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(48 << 20, np.uint8)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(**env: str) -> int:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**e, **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_import_keeps_freed_buffers_for_reuse():
    # glibc's defaults: every buffer faulted in again, at least once per page (2 MB where numpy gets
    # transparent huge pages, 4 KB otherwise)
    least = 10 * (48 << 20) // (2 << 20)
    untuned = _faults(RAGSEG_MALLOC_TUNE="0")
    tuned = _faults()
    assert untuned >= least, untuned
    assert tuned * 20 < untuned, (tuned, untuned)
    # glibc's own variables, where set, are left to glibc
    assert _faults(MALLOC_MMAP_THRESHOLD_="131072") >= least


def test_thresholds_report_what_happened():
    from ragseg import allocator

    assert allocator.active == (sys.platform.startswith("linux") and os.environ.get("RAGSEG_MALLOC_TUNE", "1") != "0"
                                and not any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_",
                                                                      "MALLOC_MMAP_THRESHOLD_")))
