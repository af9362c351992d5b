"""ragseg.allocator: importing ragseg keeps freed buffers in the process (no re-faulting)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate three 30 MB buffers at once and free them, repeatedly, as a network's activations are for
# every slice. With glibc's defaults each is fresh pages every time: in the main thread they are
# mmaps of their own, in another thread its arena's heaps, unmapped once free (the arena limit is
# what makes the thread case pass; the thresholds alone do not).
PROBE = """
import resource, sys, threading
import numpy as np
import ragseg
out = []
def probe():
    for _ in range(2):
        a = [np.ones(30 << 20, np.uint8) for _ in range(3)]
        del a
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        a = [np.ones(30 << 20, np.uint8) for _ in range(3)]
        del a
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
if sys.argv[1] == "thread":  # as the server's worker threads do
    t = threading.Thread(target=probe)
    t.start()
    t.join()
else:
    probe()
print(out[0])
"""


def _faults(where: str = "main", **env: str) -> int:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", PROBE, where], capture_output=True, text=True, env={**e, **env},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_import_keeps_freed_buffers_for_reuse():
    # glibc's defaults: every buffer faulted in again, at least once per page (2 MB where numpy gets
    # transparent huge pages, 4 KB otherwise)
    least = 10 * 3 * (30 << 20) // (2 << 20)
    for where in ("main", "thread"):
        untuned = _faults(where, RAGSEG_MALLOC_TUNE="0")
        tuned = _faults(where)
        assert untuned >= least, (where, untuned)
        assert tuned * 20 < untuned, (where, tuned, untuned)
    # glibc's own variables, where set, are left to glibc
    assert _faults(MALLOC_MMAP_THRESHOLD_="131072") >= least


def test_thresholds_report_what_happened():
    from ragseg import allocator

    assert allocator.active == (sys.platform.startswith("linux") and os.environ.get("RAGSEG_MALLOC_TUNE", "1") != "0"
                                and not any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_",
                                                                      "MALLOC_MMAP_THRESHOLD_",
                                                                      "MALLOC_ARENA_MAX")))
