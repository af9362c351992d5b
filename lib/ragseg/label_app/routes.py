"""Keep MONAI Label's event loop free: its request handlers run on worker threads.

MONAI Label 0.8.5 declares its endpoints ``async def`` but does all their work synchronously
inside (``POST /infer`` runs the model, ``PUT /datastore/label`` validates and writes the label,
``POST /activelearning`` embeds images). An ``async`` handler runs on the event loop, so while one
infer ran every other request waited: ``/info``, the datastore, OHIF's image loads. Here each such
route gets a plain ``def`` twin with the same signature, placed in front of it, which FastAPI
runs in its thread pool; the loop only routes. The twin drives the
original coroutine to completion on the worker thread (it never awaits: checked at startup by
reading its source for ``await``). The DICOM proxy, which really awaits the request body, keeps
its handler.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

logger = logging.getLogger(__name__)

# MONAI Label endpoint modules whose async handlers only call blocking code
OFFLOADED_MODULES = ("infer", "datastore", "activelearning", "train", "batch_infer", "scoring", "info",
                     "session", "model", "wsi_infer", "logs")


def _sync_twin(endpoint):
    """A ``def`` with ``endpoint``'s signature that runs the coroutine to its end on this thread."""

    @functools.wraps(endpoint)
    def twin(*args, **kwargs):
        return asyncio.run(endpoint(*args, **kwargs))

    twin.__signature__ = inspect.signature(endpoint, eval_str=True)
    del twin.__wrapped__  # FastAPI must see a plain function, not the coroutine function behind it
    return twin


def _never_awaits(endpoint) -> bool:
    try:
        return "await " not in inspect.getsource(endpoint)
    except (OSError, TypeError):
        return False


def _api_routes(app):
    """(full path prefix, APIRoute) of the app, looking inside included routers.

    FastAPI keeps ``include_router`` routers as nested objects (``_IncludedRouter`` with
    ``original_router`` and an ``include_context.prefix``), not as copied routes.
    """
    from fastapi.routing import APIRoute

    for r in app.router.routes:
        if isinstance(r, APIRoute):
            yield "", r
        elif hasattr(r, "original_router"):
            prefix = getattr(getattr(r, "include_context", None), "prefix", "") or ""
            for sub in r.original_router.routes:
                if isinstance(sub, APIRoute):
                    yield prefix, sub


def offload_blocking_routes(app) -> list[str]:
    """Put a thread-pool twin in front of each blocking MONAI Label ``async`` route; returns their paths.

    The twin is added to the app's own router at the front (first match wins), so the original
    stays in place but is never reached.
    """
    done = []
    twins = []
    for prefix, route in list(_api_routes(app)):
        if route.name.startswith("ragseg_") or not inspect.iscoroutinefunction(route.endpoint):
            continue
        mod = getattr(route.endpoint, "__module__", "")
        if not mod.startswith("monailabel.endpoints.") or mod.rsplit(".", 1)[-1] not in OFFLOADED_MODULES:
            continue
        if not _never_awaits(route.endpoint):
            logger.info("keeping %s %s on the event loop (its handler awaits)", route.methods, route.path)
            continue
        app.add_api_route(prefix + route.path, _sync_twin(route.endpoint), methods=list(route.methods),
                          name=f"ragseg_offloaded_{route.name}", response_model=route.response_model,
                          status_code=route.status_code, tags=route.tags, dependencies=route.dependencies,
                          summary=route.summary, description=route.description, response_class=route.response_class,
                          responses=route.responses, include_in_schema=False)
        twins.append(app.router.routes.pop())
        done.append(f"{','.join(sorted(route.methods))} {prefix + route.path}")
    for t in reversed(twins):  # same relative order as the originals, all in front of them
        app.router.routes.insert(0, t)
    logger.info("%d MONAI Label routes run on worker threads, not the event loop", len(done))
    return done


def install_job_route(app, job_lookup) -> None:
    """``GET /ragseg/jobs/{job_id}``: the re-index job that ``PUT /datastore/label`` returned."""
    from fastapi import Depends, HTTPException
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC, User

    if any(getattr(r, "name", "") == "ragseg_job" for r in app.router.routes):
        return

    def ragseg_job(job_id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):  # noqa: B008
        job = job_lookup(job_id)
        if job is None:
            raise HTTPException(404, f"unknown re-index job {job_id!r} (ids are per server process; "
                                     "the oldest finished jobs are forgotten)")
        return job

    app.add_api_route("/ragseg/jobs/{job_id}", ragseg_job, methods=["GET"], name="ragseg_job",
                      summary="State of a re-index job (the job_id that PUT /datastore/label returned)")
