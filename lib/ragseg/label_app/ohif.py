"""Serve the OHIF viewer bundled with MONAI Label correctly.

MONAI Label 0.8.5's ``/ohif/{path}`` route maps ``a/b.svg`` to ``a:b.svg`` (it replaces "/"
with ``os.pathsep``), so every file in a subfolder (``assets/...``, the microscopy viewer) is
answered with ``index.html`` and a 200. This route, placed in front of it, serves the real file,
answers 404 for a missing *file* (a path with an extension) and keeps ``index.html`` for the
viewer's own client-side routes (``/ohif/monai-label?...``). Paths cannot leave the OHIF folder.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path

logger = logging.getLogger(__name__)

EXTRA_TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript",
               ".json": "application/json", ".svg": "image/svg+xml"}


def ohif_dir() -> Path:
    import monailabel.endpoints.ohif as m

    return Path(m.__file__).resolve().parent / "static" / "ohif"


def resolve(root: Path, path: str) -> tuple[Path | None, int]:
    """(file to send, status) for ``/ohif/<path>``: the file, index.html for routes, or 404."""
    root = root.resolve()
    index = root / "index.html"
    if not path or path.endswith("/"):
        return index, 200
    target = (root / path).resolve()
    if root not in target.parents:  # ../ escapes
        return None, 404
    if target.is_file():
        return target, 200
    if Path(path).suffix:  # a missing file, not a viewer route
        return None, 404
    return index, 200


def media_type(file: Path) -> str:
    return EXTRA_TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"


def install(app) -> bool:
    """Put the fixed ``/ohif/{path}`` route in front of MONAI Label's; True when installed."""
    from fastapi import Depends, HTTPException
    from fastapi.responses import FileResponse
    from fastapi.routing import APIRoute
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC, User

    root = ohif_dir()
    if not root.is_dir():
        logger.info("no bundled OHIF at %s", root)
        return False
    if any(getattr(r, "name", "") == "ragseg_ohif" for r in app.router.routes):
        return True

    async def ragseg_ohif(path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008
        file, status = resolve(root, path)
        if file is None:
            raise HTTPException(status_code=status, detail=f"/ohif/{path}: no such file")
        return FileResponse(file, media_type=media_type(file))

    app.add_api_route("/ohif/{path:path}", ragseg_ohif, methods=["GET"], name="ragseg_ohif", include_in_schema=False)
    route = app.router.routes.pop()
    assert isinstance(route, APIRoute)
    app.router.routes.insert(0, route)
    logger.info("serving the bundled OHIF from %s (subfolder files fixed)", root)
    return True
