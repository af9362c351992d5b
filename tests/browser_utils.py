"""Headless Debian Chromium driven by Playwright (no browser download) for the OHIF tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = next((p for p in (os.environ.get("RAGSEG_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)
# Offline and reproducible: no sandbox (root in CI), no GPU (WebGL through SwiftShader, which OHIF's
# volume viewports need), nothing fetched in the background.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
ARTIFACTS = Path(os.environ.get("RAGSEG_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if CHROMIUM is None:
        return "Debian chromium is not installed (apt-get install chromium; .ci/run does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (requirements.txt)"
    return None


def launch(playwright, user_data_dir: Path):
    """A persistent headless context with a fresh profile; requests leaving loopback are refused."""
    ctx = playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 900})
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
        ("http://127.0.0.1", "http://localhost", "data:", "blob:")) else route.abort())
    return ctx
