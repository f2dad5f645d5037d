"""Run a job over many items (image paths, image ids) in this process or on a Ray cluster.

A *job* is the per-item code, the same object on both paths (no second implementation):

- ``outputs(item)``: the files a finished item leaves; an item is done when all of them are
  verified ours and whole (``io.output_state``: marked, and they parse), so a run that was
  killed (driver or worker) resumes with what is missing, an output cut short (a crash, a full
  disk, a truncation) is redone and reported, and a file the package did not write at an output
  path stops the run before any work (``io.ForeignFileError``), with or without ``force``;
- ``setup()``: once per process that works (loads the model);
- ``run(item)``: do one item, write its outputs atomically, return a small JSON-able dict;
- ``skippable``: the exception types that mean "this item is bad" (reported, never fatal).

Locally the items run in turn with a progress bar. With Ray, Ray Data streams them to a pool of
actors, each holding one job (one model) with ``threads`` CPUs (``gpus`` GPUs); workers read
the items themselves (paths must be visible to every node), a dead actor is restarted and its
item retried by Ray. Both return the same ``BatchSummary``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Job(Protocol):
    skippable: tuple[type[BaseException], ...]

    def outputs(self, item: str) -> list: ...

    def setup(self) -> None: ...

    def run(self, item: str) -> dict[str, Any]: ...


@dataclass
class BatchSummary:
    """What a run did: counts, throughput, who did what, and what failed (with why)."""

    items: int = 0
    skipped: int = 0  # already done by an earlier run
    redone: list[str] = field(default_factory=list)  # items whose earlier outputs were broken
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # item -> one-line reason
    seconds: float = 0.0
    per_worker: dict[str, int] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)  # each done item's run() dict
    stopped: str | None = None  # why the run stopped early (a failed write: disk full, ...)
    first_seconds: float = 0.0  # until the first item finished: start-up (model load, actors)

    @property
    def steady_items_per_second(self) -> float:
        """The rate after the first item: what more images (or workers) would get."""
        rest = self.seconds - self.first_seconds
        return (self.done - 1) / rest if self.done > 1 and rest > 0 else 0.0

    @property
    def items_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def report(
        self, name=lambda item: Path(item).name, *, timing=True, per_worker=False, **fields
    ) -> dict[str, Any]:
        """A command's summary of the run, in one shape for every command: images, skipped,
        the command's own ``fields``, then the timing, each Ray worker's count, and the items
        redone, failed or why the run stopped (items shown by ``name``)."""
        out: dict[str, Any] = {"images": self.items, "skipped": self.skipped, **fields}
        if timing:
            out["seconds"] = round(self.seconds, 3)
            out["images_per_second"] = round(self.items_per_second, 3)
        if per_worker:
            out["per_worker"] = self.per_worker
        for key, items in (("redone", self.redone), ("failed", list(self.failed))):
            if items:
                out[key] = [name(item) for item in items]
        if self.stopped:
            out["stopped"] = self.stopped
        return out

    def as_dict(self, results: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not results:
            out.pop("results")
        out["seconds"] = round(self.seconds, 3)
        out["first_seconds"] = round(self.first_seconds, 3)
        out["items_per_second"] = round(self.items_per_second, 3)
        out["steady_items_per_second"] = round(self.steady_items_per_second, 3)
        return out


def pending(job: Job, items: list[str], force: bool = False) -> tuple[list[str], list[str]]:
    """The items to do (all of them with ``force``), and among them those whose earlier
    outputs are broken (``io.pending_outputs``)."""
    from ..io import pending_outputs

    return pending_outputs(items, job.outputs, force)


def _start(job: Job, items: list[str], force: bool) -> tuple[list[str], BatchSummary]:
    todo, broken = pending(job, items, force)
    summary = BatchSummary(items=len(items), skipped=len(items) - len(todo), redone=broken)
    for item in broken:
        print(
            f"tinysam: redoing {os.path.basename(item)}: its earlier output was cut short",
            file=sys.stderr,
        )
    return todo, summary


def _one_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    # Ray wraps a worker's exception in a traceback; its last line is the error itself.
    return (lines[-1] if lines else type(err).__name__).strip()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _attempt(job: Job, item: str) -> dict[str, Any]:
    """One item, as a row: status ok / failed (a skippable error) with its reason."""
    try:
        result = job.run(item)
    except job.skippable as err:
        reason = (str(err) or type(err).__name__).splitlines()[0]
        return {"item": item, "status": "failed", "error": reason, "worker": worker_name()}
    return {"item": item, "status": "ok", "result": result, "worker": worker_name()}


def _progress(total: int, desc: str, show: bool | None):
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if show is None else show
    return tqdm(total=total, unit="image", desc=desc, disable=not show or total <= 1)


def _record(summary: BatchSummary, row: dict[str, Any], bar) -> None:
    if row["status"] == "ok":
        summary.done += 1
        summary.results.append(row["result"])
        summary.per_worker[row["worker"]] = summary.per_worker.get(row["worker"], 0) + 1
    else:
        summary.failed[row["item"]] = row["error"]
        bar.write(
            f"tinysam: skipped {os.path.basename(row['item'])}: {row['error']}", file=sys.stderr
        )
    bar.update()


def run_local(
    job: Job, items: list[str], force: bool = False, progress: bool | None = None
) -> BatchSummary:
    """Every pending item in this process, in order."""
    todo, summary = _start(job, items, force)
    if not todo:
        return summary
    start = time.perf_counter()
    job.setup()
    with _progress(len(todo), "local", progress) as bar:
        try:
            for item in todo:
                _record(summary, _attempt(job, item), bar)
                summary.first_seconds = summary.first_seconds or time.perf_counter() - start
        except OSError as err:  # not the item's fault: the run cannot go on
            summary.stopped = _one_line(err)
    summary.seconds = time.perf_counter() - start
    return summary


# Starting a local Ray cluster takes 5-30 s here; joining one, a few. Past this, something is
# wrong (loopback down, a firewall, a head that is not there) and Ray itself would wait minutes
# with nothing said.
RAY_START_SECONDS = 120.0


class ClusterError(RuntimeError):
    """The Ray cluster could not be started or joined; the message says why and what to do."""


def check_loopback(timeout: float = 5.0) -> None:
    """A local cluster's processes talk over 127.0.0.1: ``ClusterError`` if it is unusable
    (a container or namespace with loopback down), before Ray waits minutes on it."""
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=timeout):
                pass
    except OSError as err:
        raise ClusterError(
            f"cannot start a local Ray cluster: the loopback network 127.0.0.1 is unusable "
            f"({err.strerror or err}); bring up 'lo', or join a cluster with --ray-address"
        ) from None


def connect_ray(address: str, seconds: float = RAY_START_SECONDS) -> None:
    """``ray.init`` for ``address`` (``"local"`` starts a cluster here), given ``seconds``;
    ``ClusterError`` if the loopback is down (for a local cluster) or Ray has not started or
    joined by then."""
    import threading

    import ray

    if address == "local":
        check_loopback()
    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
                configure_logging=True,
            )
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    starting = threading.Thread(target=init, name="ray-init", daemon=True)
    starting.start()
    starting.join(seconds)
    if starting.is_alive():
        what = "start a local Ray cluster" if address == "local" else f"join Ray at {address}"
        raise ClusterError(
            f"could not {what} within {seconds:g} s; check that its address is reachable "
            "(and the loopback network, for a local cluster)"
        )
    if failure:
        raise ClusterError(f"could not start Ray: {_one_line(failure[0])}") from failure[0]


class _RayWorker:
    """A Ray Data actor: one job (one model), rows of items in, rows of outcomes out."""

    def __init__(self, job: Job) -> None:
        self.job = job
        job.setup()

    def __call__(self, batch: dict) -> dict:
        import json

        rows = [_attempt(self.job, str(item)) for item in batch["item"]]
        return {
            "item": [r["item"] for r in rows],
            "status": [r["status"] for r in rows],
            "error": [r.get("error", "") for r in rows],
            "worker": [r["worker"] for r in rows],
            "result": [json.dumps(r.get("result")) for r in rows],
        }


def run_ray(
    job: Job,
    items: list[str],
    *,
    address: str | None = None,
    workers: int = 1,
    threads: int = 1,
    gpus: float = 0,
    force: bool = False,
    progress: bool | None = None,
    start_seconds: float = RAY_START_SECONDS,
) -> BatchSummary:
    """Every pending item on a Ray cluster. ``address`` ``None`` joins the one
    ``$RAY_ADDRESS`` names, else starts a local one (``"auto"`` joins the one ``ray start``
    started on this machine). ``workers`` actors, each with ``threads`` CPUs and ``gpus``
    GPUs; a worker that dies is restarted and its items retried by Ray. Starting or joining
    the cluster has ``start_seconds`` (``ClusterError`` after that)."""
    import json

    # Our progress bar and summary say what Ray Data and the core workers would log.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    import ray

    todo, summary = _start(job, items, force)
    if not todo:
        return summary
    start = time.perf_counter()
    if not ray.is_initialized():
        # None: $RAY_ADDRESS, else a new local cluster (never a stale one from `ray start`).
        connect_ray(address or os.environ.get("RAY_ADDRESS") or "local", start_seconds)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.verbose_progress = False
    dataset = ray.data.from_items([{"item": item} for item in todo], override_num_blocks=len(todo))
    outcomes = dataset.map_batches(
        _RayWorker,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        concurrency=workers,
        num_cpus=threads,
        num_gpus=gpus or None,
    )
    with _progress(len(todo), f"ray x{workers}", progress) as bar:
        try:
            for row in outcomes.iter_rows():
                row = dict(row)
                if row["status"] == "ok":
                    row["result"] = json.loads(row["result"])
                _record(summary, row, bar)
                summary.first_seconds = summary.first_seconds or time.perf_counter() - start
        except Exception as err:  # a worker's non-item error, after Ray's retries
            summary.stopped = _one_line(err)
    summary.seconds = time.perf_counter() - start
    return summary
