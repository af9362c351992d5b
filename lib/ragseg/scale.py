"""Scale-out on Ray: label or index a whole datastore, one volume per task.

The same code runs on a laptop (``--ray`` starts a local runtime), a multi-GPU workstation and a
KubeRay cluster (``--ray ray://head:10001`` or ``auto``):

* The driver plans the work from the datastore (what has no ``final`` and no ``original`` label),
  starts a pool of actors that each load the models once (``num_gpus`` per actor when the cluster
  has GPUs, else CPU actors with ``threads`` torch threads each), and publishes one immutable
  snapshot - the index (:class:`ragseg.index.FrozenIndex`) and every support slice
  (:meth:`ragseg.pipeline.SupportStore.freeze`) - to the object store once.
* Labelling: each worker segments a volume and writes its label exactly as the single-process
  command does (:func:`ragseg.label_all.label_volume`: tag ``original``, temp file + rename,
  never ``final``). The datastore is the only state: a re-run resumes.
* Index build: workers only embed (:func:`ragseg.pipeline.index_volume`); the driver merges the
  vectors in the datastore's order under the index's file lock, so ids and vectors are those of
  a single-process build and the index file has one writer.

Faults: a worker process that dies mid-volume makes Ray restart the actor and the driver resubmit
the volume (at most ``max_retries`` times); the dead writer's temp file is swept by the next
worker that starts on that host. A volume that fails on bad input is reported with its reason
and the run goes on. Ctrl-C kills the actors and leaves complete labels only, so a re-run
resumes. The only shared storage the design needs is the datastore folder the server uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from . import defaults
from .errors import RagsegError

logger = logging.getLogger(__name__)


@dataclass
class RayOptions:
    """How to run on Ray.

    address: 'local' starts a Ray runtime in this process (stopped at the end); 'auto', 'host:port'
        or 'ray://host:10001' join a running cluster.
    actors: worker actors (0: as many as the cluster's CPUs allow at ``threads`` each, or one per
        GPU when ``gpus_per_actor`` > 0).
    threads: torch threads per actor, also its ``num_cpus`` (0: the smallest node's CPUs divided
        by the actors per node, at most ``defaults.RAY_MAX_THREADS``); keeps cores from being
        oversubscribed.
    gpus_per_actor: GPUs each actor reserves (-1: 1 when the cluster has GPUs, else 0).
    max_retries: resubmissions of a volume whose worker process died.
    progress: driver progress bar.
    """

    address: str = "local"
    actors: int = 0
    threads: int = 0
    gpus_per_actor: float = -1
    max_retries: int = defaults.RAY_MAX_RETRIES
    progress: bool = True

    def validate(self) -> None:
        if self.actors < 0 or self.threads < 0 or self.max_retries < 0:
            raise RagsegError("ray: actors, threads and max_retries must be >= 0")


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is in requirements.txt
        raise RagsegError("--ray needs the 'ray' package (pip install 'ray==2.60.0')") from e
    return ray


@contextlib.contextmanager
def connect(address: str) -> Iterator[str]:
    """A Ray connection for the duration of a run; yields a description of the cluster.

    'local' starts a runtime on loopback that ends with the block; any other address joins that
    cluster and leaves it running. An existing connection of this process is reused as is.
    """
    ray = _ray()
    if ray.is_initialized():
        yield "existing connection"
        return
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        if address in ("", "local"):
            ray.init(_node_ip_address="127.0.0.1", **kw)
        else:
            ray.init(address=address, **kw)
    except Exception as e:  # ConnectionError, timeouts, bad address: one clear line
        raise RagsegError(f"cannot start or join Ray at {address!r}: {e}") from e
    try:
        yield address
    finally:
        ray.shutdown()


def plan_actors(opts: RayOptions) -> tuple[int, int, float]:
    """(actors, threads per actor, GPUs per actor) for the connected cluster."""
    ray = _ray()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes] or [1]
    total_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    gpus = opts.gpus_per_actor if opts.gpus_per_actor >= 0 else (1.0 if total_gpus else 0.0)
    if gpus > 0:
        actors = opts.actors or max(1, int(total_gpus // gpus))
        threads = opts.threads or max(1, min(defaults.RAY_MAX_THREADS, min(cpus) // max(1, actors // len(nodes))))
        return actors, threads, gpus
    if opts.threads:
        threads = opts.threads
        actors = opts.actors or max(1, sum(c // threads for c in cpus))
    elif opts.actors:
        per_node = -(-opts.actors // len(cpus))
        threads, actors = max(1, min(defaults.RAY_MAX_THREADS, min(cpus) // per_node)), opts.actors
    else:
        threads = max(1, min(defaults.RAY_MAX_THREADS, min(cpus)))
        actors = max(1, sum(c // threads for c in cpus))
    if threads > max(cpus):
        raise RagsegError(f"ray: {threads} threads per actor, but the largest node has {max(cpus)} CPUs")
    return actors, threads, gpus


# -- workers (run inside Ray actor processes) ---------------------------------------------------------
class _Worker:
    """Common part of the actors: thread count, identity and a 'what am I doing' probe."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self._busy: tuple[str, float] | None = None

    def info(self) -> dict:
        """Answered while a volume runs (the actors have two threads): pid, host, current volume."""
        busy = self._busy
        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(),
                "threads": self.threads,
                "busy": busy[0] if busy else None, "busy_s": time.time() - busy[1] if busy else 0.0}

    @contextlib.contextmanager
    def _working(self, name: str) -> Iterator[None]:
        self._busy = (name, time.time())
        try:
            yield
        finally:
            self._busy = None


class LabelWorker(_Worker):
    """Segments volumes of a datastore: models loaded once, index and supports from the snapshot."""

    def __init__(self, model_cfg, pre, snapshot, seg_kwargs: dict, original_dir: str, threads: int):
        super().__init__(threads)
        from .atomic import sweep_partials
        from .factory import ModelSet
        from .pipeline import Segmenter

        index, store = snapshot
        models = ModelSet(model_cfg)
        self.seg = Segmenter(models.engine(), models.embedder(), index, pre, store=store, **seg_kwargs)
        self.original = Path(original_dir)
        for f in sweep_partials(self.original):  # debris of a worker killed mid-write on this host
            logger.warning("removed %s, left by a killed writer", f)

    def label(self, image_path: str) -> dict:
        from .label_all import label_volume
        from .volume import image_id_of

        iid = image_id_of(image_path)
        t = time.perf_counter()
        with self._working(iid):
            try:
                n = label_volume(self.seg, Path(image_path), self.original)
            except (RagsegError, OSError) as e:  # bad input: reported, not retried
                return {"id": iid, "error": str(e)}
        return {"id": iid, "slices": n, "seconds": time.perf_counter() - t, "pid": os.getpid(),
                "host": socket.gethostname()}


class EmbedWorker(_Worker):
    """Embeds labeled volumes for the index (the embedder only)."""

    def __init__(self, model_cfg, pre, threads: int):
        super().__init__(threads)
        from .factory import ModelSet

        self.embedder = ModelSet(model_cfg).embedder()
        self.pre = pre

    def identity(self) -> tuple[str, int]:
        """(embedder id, dimension): what the index file is keyed by."""
        return self.embedder.id, self.embedder.dim

    def embed(self, item, stored: dict | None) -> dict:
        from .pipeline import index_volume

        t = time.perf_counter()
        with self._working(item.image_id):
            try:
                res = index_volume(item, self.embedder, self.pre, stored)
            except (RagsegError, OSError) as e:
                return {"id": item.image_id, "error": str(e)}
        return {"id": item.image_id, "result": res, "seconds": time.perf_counter() - t, "pid": os.getpid()}


# -- driver ---------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What the scheduler reports back."""

    failed: dict[str, str]
    retried: dict[str, int]
    interrupted: bool = False
    workers: int = 0
    overhead_s: list[float] = field(default_factory=list)  # per volume: driver round trip - worker time


class ActorPool:
    """A fixed set of restartable actors, one volume in flight per actor.

    A volume whose actor died is resubmitted (Ray restarts the actor) up to ``max_retries`` times;
    an actor that dies on ``max_retries + 1`` volumes in a row is dropped.
    """

    def __init__(self, cls: type, args: tuple, *, actors: int, threads: int, gpus: float, max_retries: int):
        ray = _ray()
        remote = ray.remote(cls).options(num_cpus=threads, num_gpus=gpus, max_restarts=-1, max_task_retries=0,
                                         max_concurrency=2)
        self.max_retries = max_retries
        self.actors = [remote.remote(*args) for _ in range(actors)]
        self.meta = dict(actors=actors, threads=threads, gpus_per_actor=gpus)

    def info(self, timeout: float = 60.0) -> list[dict]:
        """Every live actor's :meth:`_Worker.info` (waits for the models to load)."""
        ray = _ray()
        return ray.get([a.info.remote() for a in self.actors], timeout=timeout)

    def kill(self) -> None:
        ray = _ray()
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)

    def run(self, todo: Sequence, submit: Callable, on_result: Callable[[object, dict], None], *,
            name: Callable[[object], str], bar: tqdm | None = None) -> _Run:
        """Run ``submit(actor, item)`` for every item; ``on_result(item, value)`` on the driver.

        After an actor's process dies its volume goes back to the queue and the actor is probed
        (``info``) until Ray has restarted it; only then does it get work again.
        """
        ray = _ray()
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError, WorkerCrashedError

        queue: deque = deque(todo)
        idle = list(range(len(self.actors)))[::-1]
        inflight: dict = {}  # ref -> (actor, item or None for a probe, submit time)
        probe_at: dict[int, float] = {}  # restarting actors -> when to probe next
        down_since: dict[int, float] = {}
        run = _Run(failed={}, retried={}, workers=len(self.actors))
        strikes = [0] * len(self.actors)

        def postfix() -> None:
            if bar is not None:
                bar.set_postfix(failed=len(run.failed), retried=sum(run.retried.values()), refresh=False)

        def drop(a: int, why: str) -> None:
            logger.error("dropping actor %d: %s", a, why)
            probe_at.pop(a, None)
            with contextlib.suppress(Exception):
                ray.kill(self.actors[a], no_restart=True)

        # Ctrl-C sets a flag the loop checks each pass: a KeyboardInterrupt raised while the main thread
        # is inside Ray's wait was seen lost (the run went on to the end and exited 0)
        stop = threading.Event()
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            while queue or inflight or probe_at:
                if stop.is_set():
                    raise KeyboardInterrupt
                now = time.perf_counter()
                for a, t in list(probe_at.items()):
                    if t <= now:
                        del probe_at[a]
                        inflight[self.actors[a].info.remote()] = (a, None, now)
                while idle and queue:
                    a = idle.pop()
                    item = queue.popleft()
                    inflight[submit(self.actors[a], item)] = (a, item, time.perf_counter())
                if not inflight and not probe_at:  # every actor dropped
                    for item in queue:
                        run.failed[name(item)] = "no worker left (every actor kept dying)"
                    break
                if not inflight:
                    time.sleep(defaults.RAY_PROBE_INTERVAL_S)
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    a, item, t_sub = inflight.pop(ref)
                    if item is None:  # a probe of a restarting actor
                        try:
                            ray.get(ref)
                        except ActorDiedError as e:
                            drop(a, f"it cannot be restarted ({e})")
                            continue
                        except RayActorError:
                            if time.perf_counter() - down_since[a] > defaults.RAY_STARTUP_TIMEOUT_S:
                                drop(a, "not restarted in time")
                            else:
                                probe_at[a] = time.perf_counter() + defaults.RAY_PROBE_INTERVAL_S
                            continue
                        down_since.pop(a, None)
                        idle.append(a)
                        continue
                    key = name(item)
                    try:
                        value = ray.get(ref)
                        if isinstance(value, dict) and "seconds" in value:
                            run.overhead_s.append(time.perf_counter() - t_sub - value["seconds"])
                    except (RayActorError, WorkerCrashedError) as e:  # the process died: retry
                        strikes[a] += 1
                        n = run.retried.get(key, 0) + 1
                        if n > self.max_retries:
                            run.failed[key] = f"worker died {n} times ({type(e).__name__})"
                        else:
                            run.retried[key] = n
                            queue.appendleft(item)
                            logger.warning("%s: worker died, retry %d of %d", key, n, self.max_retries)
                        postfix()
                        if strikes[a] > self.max_retries:
                            drop(a, f"it died on {strikes[a]} volumes in a row")
                        else:
                            down_since[a] = time.perf_counter()
                            probe_at[a] = down_since[a] + defaults.RAY_PROBE_INTERVAL_S
                        continue
                    except RayTaskError as e:  # a bug, not bad input: reported, not retried
                        run.failed[key] = f"{type(e.cause).__name__ if e.cause else 'error'}: {e.cause or e}"
                        value = None
                    strikes[a] = 0
                    idle.append(a)
                    if value is not None:
                        if "error" in value:
                            run.failed[key] = value["error"]
                        else:
                            on_result(item, value)
                    if bar is not None:
                        bar.update(1)
                    postfix()
        except KeyboardInterrupt:
            run.interrupted = True
            logger.warning("interrupted: stopping the workers; completed volumes are kept, re-run to resume")
            self.kill()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if stop.is_set() and not run.interrupted:  # Ctrl-C during the last volume: still an interrupt
            run.interrupted = True
        return run


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="vol", disable=not progress, dynamic_ncols=True)


def label_ray(root: str | Path, model_cfg, pre, *, k: int = defaults.DEFAULT_K, opts: RayOptions | None = None,
              redo: bool = False, limit: int | None = None, pool=None, seg_kwargs: dict | None = None,
              on_ready: Callable[[ActorPool], None] | None = None):
    """Label every unlabeled image of local datastore ``root`` on Ray (see the module docstring).

    Args:
        pool: ``(index, engine_config)`` to learn from instead of ``root/labels/final`` (the app
            passes its own index); by default the datastore's pool is indexed first, as the
            single-process command does.
        seg_kwargs: more :class:`ragseg.pipeline.Segmenter` options (``allow_same_image``...).
        on_ready: called with the actor pool once every actor has loaded its models (tests use
            it to find worker processes).

    Returns a :class:`ragseg.label_all.LabelAllReport` (``run`` says how it ran).
    """
    from .atomic import sweep_partials
    from .label_all import datastore_plan, open_pool, pool_model_config
    from .pipeline import SupportStore

    opts = opts or RayOptions()
    opts.validate()
    root = Path(root)
    original = root / "labels" / "original"
    rep, todo = datastore_plan(root, redo, limit)
    if not todo:
        return rep
    t0 = time.time()
    model_cfg = pool_model_config(root, replace(model_cfg))
    if pool is None:
        _, _, index = open_pool(root, model_cfg, pre)
    else:
        index = pool
    if len(index) == 0:
        raise RagsegError(f"{root}: no labeled slice to learn from")
    snap_index = index.snapshot()
    store = SupportStore(pre).freeze(snap_index.records(), progress=opts.progress)
    with connect(opts.address) as where:
        ray = _ray()
        actors, threads, gpus = plan_actors(opts)
        ref = ray.put((snap_index, store))  # once; every actor (and every restart) reads this
        pool_ = ActorPool(LabelWorker, (model_cfg, pre, ref, dict(seg_kwargs or {}, k=k), str(original), threads),
                          actors=actors, threads=threads, gpus=gpus, max_retries=opts.max_retries)
        try:
            infos = pool_.info(timeout=defaults.RAY_STARTUP_TIMEOUT_S)
            setup_s = time.time() - t0
            logger.info("ray %s: %d actors x %d threads ready in %.1f s", where, actors, threads, setup_s)
            if on_ready is not None:
                on_ready(pool_)
            bar = _bar(len(todo), f"labelling on ray ({actors} actors)", opts.progress)
            t_run = time.time()
            per_worker: dict[str, int] = {}
            busy = [0.0]

            def done(path, value):
                rep.done.append(value["id"])
                rep.slices += value["slices"]
                busy[0] += value["seconds"]
                w = f"{value['host']}:{value['pid']}"
                per_worker[w] = per_worker.get(w, 0) + 1
                bar.set_postfix(slices_s=f"{rep.slices / max(time.time() - t_run, 1e-6):.1f}", refresh=False)

            from .volume import image_id_of

            run = pool_.run([str(p) for p in todo], lambda a, p: a.label.remote(p), done,
                            name=image_id_of, bar=bar)
            bar.close()
        finally:
            pool_.kill()
    for f in sweep_partials(original):
        logger.warning("removed %s, left by a killed writer", f)
    rep.failed.update(run.failed)
    rep.retried = run.retried
    rep.interrupted = run.interrupted
    rep.done.sort()
    rep.seconds = time.time() - t0
    run_s = time.time() - t_run
    rep.run = {"mode": "ray", "address": opts.address, "nodes": len({i["node"] for i in infos}), "actors": actors,
               "threads_per_actor": threads, "gpus_per_actor": gpus,
               "setup_s": round(setup_s, 3), "run_s": round(run_s, 3), "busy_s": round(busy[0], 3),
               "volumes_per_worker": per_worker,
               # submit -> result on the driver, minus the worker's own time: scheduling, transfer, driver
               "driver_overhead_s_per_volume": round(sum(run.overhead_s) / max(1, len(run.overhead_s)), 4)}
    return rep


def sync_index_ray(index_dir: str | Path, model_cfg, pre, items: Sequence, *, kind: str = "auto",
                   opts: RayOptions | None = None, remove_missing: bool = True,
                   on_ready: Callable[[ActorPool], None] | None = None):
    """:func:`ragseg.pipeline.sync_index` with the embedding done by Ray workers; the driver loads
    no model (the index is opened with the workers' embedder id). Returns (index, SyncReport).

    Results are merged in ``items`` order (buffered until their predecessors arrive), a batch per
    ``defaults.RAY_INDEX_FLUSH`` volumes, under the index's lock: the ids are those of a
    single-process build, and an interrupted build keeps what was merged.
    """
    from types import SimpleNamespace

    from .pipeline import SyncReport, apply_indexed, finish_sync, open_index

    opts = opts or RayOptions()
    opts.validate()
    rep = SyncReport()
    order = {it.image_id: i for i, it in enumerate(items)}
    arrived: dict[int, tuple] = {}
    state = {"next": 0}  # items before this position are merged (or failed)

    def flush(force: bool = False) -> None:
        """Merge the arrived results that follow the merged prefix without a gap."""
        j, ready = state["next"], []
        while j < len(items) and (j in arrived or items[j].image_id in rep.failed):
            if j in arrived:
                ready.append(j)
            j += 1
        if not ready or force or len(ready) >= defaults.RAY_INDEX_FLUSH:
            apply_indexed(index, [arrived.pop(i) for i in ready], stored, rep)
            state["next"] = j

    with connect(opts.address):
        actors, threads, gpus = plan_actors(opts)
        pool_ = ActorPool(EmbedWorker, (model_cfg, pre, threads), actors=actors, threads=threads, gpus=gpus,
                          max_retries=opts.max_retries)
        try:
            pool_.info(timeout=defaults.RAY_STARTUP_TIMEOUT_S)
            emb_id, dim = _ray().get(pool_.actors[0].identity.remote())
            index = open_index(index_dir, SimpleNamespace(id=emb_id, dim=dim), pre, kind=kind)
            stored = index.images()
            if on_ready is not None:
                on_ready(pool_)
            bar = _bar(len(items), f"indexing on ray ({actors} actors)", opts.progress)

            def done(it, value):
                arrived[order[it.image_id]] = (it, value["result"])
                flush()

            run = pool_.run(list(items), lambda a, it: a.embed.remote(it, stored.get(it.image_id)), done,
                            name=lambda it: it.image_id, bar=bar)
            bar.close()
        finally:
            pool_.kill()
    rep.failed.update(run.failed)
    rep.retried = run.retried
    rep.run = {"mode": "ray", "address": opts.address, "actors": actors, "threads_per_actor": threads,
               "gpus_per_actor": gpus, "interrupted": run.interrupted}
    flush(force=True)
    if run.interrupted:
        raise KeyboardInterrupt
    finish_sync(index, items, stored, rep, remove_missing)
    return index, rep
