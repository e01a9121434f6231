"""Grids of runs (seeds × ops × conditions): every cell is a normal run directory; reruns skip finished cells.

A :class:`Cell` names a directory under the grid's root, an importable function ``"module:function"`` and a
JSON-able config; the function is called as ``fn(config, run_dir)`` and returns a JSON-able summary. When it
returns, the grid writes ``RUN_DIR/cell.json`` (config + summary + provenance: the sed_lens commit and version, the
torch version, the PyTorch threads, the CPU and the SIMD level of its kernels, and when the run — its last
attempt, for a resumed run — started and finished, in UTC): a cell with that file is complete and is skipped
by the next :func:`run_grid` over the same root. A cell
directory without it (an interrupted run) is cleared and run again — unless the target is *resumable*
(:func:`resumable`: it carries ``resumable = True``), in which case the directory is left as it is and the target
continues what it finds there (a coupling cell resumes training from its last checkpoint and its scan from the
responses it already measured). A finished cell whose config differs is an error (its run is never deleted
silently) unless the caller passes ``changed="rerun"``.

Backends: ``"local"`` runs cells in a pool of ``workers`` processes (default: one per core) or, with
``workers=1``, in this process; ``"ray"`` sends each cell to a Ray cluster (``pip install "sed-lens[distributed]"``).
Without ``ray_address`` it starts a local Ray with ``workers × threads`` CPUs and no dashboard, and shuts it down
after the grid; ``ray_address`` (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``) joins a running cluster. Ray
workers import the same sed_lens as this process: a source checkout's path is passed to them in
``runtime_env`` (PYTHONPATH); an installed sed_lens must be installed on every node. Every cell runs with ``threads``
PyTorch threads (default 1) whatever the backend, so a cell's numbers do not depend on where it ran — CPU
kernels round differently with different thread counts. On 2 cores, two single-thread workers train about
1.4× more steps per second than one two-thread process.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import sys
import traceback
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sed_lens.configs import BACKENDS
from sed_lens.devices import cpu_capability, cpu_model
from sed_lens.errors import SedLensError, check
from sed_lens.tracking import git_commit, package_version, to_jsonable, write_json

MARKER = "cell.json"


def comparable(config: Any, ignore_keys: Collection[str] = ()) -> Any:
    """``config`` as JSON without the keys ``ignore_keys`` (at any depth), for deciding whether a cell is done."""
    if isinstance(config, dict):
        return {k: comparable(v, ignore_keys) for k, v in config.items() if k not in ignore_keys}
    if isinstance(config, list):
        return [comparable(v, ignore_keys) for v in config]
    return config


def same_config(a: Any, b: Any, ignore_keys: Collection[str] = ()) -> bool:
    """Whether two cell configs compute the same run: equal as JSON once the keys ``ignore_keys`` (at any depth;
    those that change where a run is logged, not what it computes) are left out."""
    ignore = frozenset(ignore_keys)
    return bool(comparable(to_jsonable(a), ignore) == comparable(to_jsonable(b), ignore))


@dataclass(frozen=True)
class Cell:
    """One run of a grid: ``target(config, run_dir)`` in ``ROOT/name``."""

    name: str
    target: str  # "package.module:function"
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellResult:
    name: str
    run_dir: str
    summary: dict[str, Any] | None
    skipped: bool = False  # already complete before this call
    error: str | None = None


def resolve(target: str) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    """The function named by ``"module:function"``."""
    module, _, fn = target.partition(":")
    check(bool(module and fn), f"a cell target must look like 'package.module:function', got {target!r}.")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise SedLensError(f"cannot import cell target {target!r}: {e}.") from None


def resumable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a cell target as one that continues an interrupted attempt from what it left in its run directory
    (the grid then keeps that directory instead of clearing it). Such a target must produce the same summary
    whether or not it was interrupted."""
    setattr(fn, "resumable", True)  # noqa: B010 - an attribute of a function object
    return fn


def is_resumable(fn: Callable[..., Any]) -> bool:
    return bool(getattr(fn, "resumable", False))


def is_complete(run_dir: str | Path) -> bool:
    return (Path(run_dir) / MARKER).is_file()


def load_cell(run_dir: str | Path) -> dict[str, Any]:
    """``{"name", "target", "config", "summary"}`` of a complete cell."""
    return json.loads((Path(run_dir) / MARKER).read_text())


def execute_cell(cell: Cell, run_dir: str, threads: int | None = 1) -> dict[str, Any]:
    """Run one cell now (in this process, with ``threads`` PyTorch threads) and mark it complete."""
    import torch

    path = Path(run_dir)
    target = resolve(cell.target)
    if path.exists() and not is_resumable(target):
        shutil.rmtree(path)  # an interrupted earlier attempt
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    started = utc_now()
    try:
        summary = target(dict(cell.config), run_dir)
    finally:
        torch.set_num_threads(before)
    summary = to_jsonable(summary if summary is not None else {})
    provenance = {"sed_lens_commit": git_commit(), "sed_lens_version": package_version(), "torch": torch.__version__,
                  "threads": threads or before, "cpu": cpu_model(), "cpu_capability": cpu_capability(),
                  "started": started, "finished": utc_now()}
    write_json(path / MARKER, {"name": cell.name, "target": cell.target, "config": to_jsonable(cell.config),
                               "summary": summary, "provenance": provenance})
    return summary


PROVENANCE_TIME = "%Y-%m-%dT%H:%M:%SZ"
"""How ``cell.json``'s provenance writes when a cell started and finished: UTC, ISO 8601 to the second."""


def utc_now() -> str:
    """Now, in UTC, as :data:`PROVENANCE_TIME` writes it (``2026-12-02T06:03:05Z``)."""
    return datetime.now(UTC).strftime(PROVENANCE_TIME)


def die_with_parent(parent: int) -> None:
    """Pool-worker initializer: on Linux, ask the kernel to end this worker when the grid's process (pid
    ``parent``) dies — killed, crashed — so an interrupted grid leaves no orphan run training on. Elsewhere a
    no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # SIGKILL, not SIGTERM: a training run turns SIGTERM into "checkpoint and stop" and would then sit idle in
        # the pool; a grid cell that did not finish is run again (from the start, or from its last checkpoint
        # when its target is resumable).
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _execute_safely(cell: Cell, run_dir: str, threads: int | None) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return execute_cell(cell, run_dir, threads), None
    except SedLensError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a failed cell must not stop the rest of the grid
        return None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"


def run_grid(cells: Sequence[Cell], root: str | Path, backend: str = "local", workers: int | None = None,
             threads: int = 1, ray_address: str | None = None, progress: bool = True,
             desc: str = "grid", changed: str = "error",
             on_done: Callable[[CellResult], None] | None = None,
             ignore_keys: Collection[str] = ()) -> list[CellResult]:
    """Run every incomplete cell of ``cells`` under ``root``; results in the order of ``cells``.

    A cell is skipped when its directory holds a ``cell.json`` with the same config, compared without the keys
    ``ignore_keys`` at any depth (the caller's keys that change where a run is logged, not what it computes, e.g.
    ``sed_lens.experiments.grokking.TRACKING_KEYS``; none by default). One with another config
    raises :class:`SedLensError` before any work (``changed="error"``) or is deleted and run again
    (``changed="rerun"``). A cell that raises is reported in its :class:`CellResult` (``error``) and the others still run;
    call :func:`raise_failures` to turn failures into one error. ``on_done(result)`` is called in this process as
    each cell finishes (or fails), e.g. to keep a copy of its results as soon as they exist.
    """
    check(backend in BACKENDS, f"unknown grid backend {backend!r}; choose {' or '.join(BACKENDS)}.")
    workers = max(1, (os.cpu_count() or 1) // max(1, threads)) if workers is None else workers
    check(isinstance(workers, int) and workers >= 1, f"workers must be a positive integer, got {workers!r}.")
    check(isinstance(threads, int) and threads >= 1, f"threads must be a positive integer, got {threads!r}.")
    check(changed in ("error", "rerun"), f"changed must be 'error' or 'rerun', got {changed!r}.")
    names = [c.name for c in cells]
    check(len(set(names)) == len(names), "grid cells must have distinct names.")
    for c in cells:
        resolve(c.target)  # fail fast on a bad target, before any work
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, CellResult] = {}
    todo: list[Cell] = []
    for c in cells:
        run_dir = root / c.name
        done = load_cell(run_dir) if is_complete(run_dir) else None
        if done is not None and same_config(done.get("config"), c.config, ignore_keys):
            results[c.name] = CellResult(c.name, str(run_dir), done["summary"], skipped=True)
        elif done is not None and changed == "error":
            raise SedLensError(f"{run_dir} holds a finished run with other settings; choose another --out or "
                               "delete that run.")
        else:
            if done is not None:  # changed="rerun": a finished run with another config is never continued
                shutil.rmtree(run_dir)
            todo.append(c)  # never run, interrupted, or (changed="rerun") run with another config
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=desc, unit="run", disable=not progress,
               dynamic_ncols=True)
    try:
        if backend == "ray":
            _run_ray(todo, root, ray_address, threads, workers, results, bar, on_done)
        elif workers == 1 or len(todo) <= 1:
            for c in todo:
                summary, err = _execute_safely(c, str(root / c.name), threads)
                results[c.name] = CellResult(c.name, str(root / c.name), summary, error=err)
                bar.update(1)
                if on_done is not None:
                    on_done(results[c.name])
        else:
            # One fresh process per cell (max_tasks_per_child=1): a cell's memory is returned when it ends, and a
            # long grid picks up an upgraded sed_lens for the cells it has not started (start-up: a few seconds).
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn"),
                                     initializer=die_with_parent, initargs=(os.getpid(),),
                                     max_tasks_per_child=1) as pool:
                futures: dict[Future[Any], Cell] = {
                    pool.submit(_execute_safely, c, str(root / c.name), threads): c for c in todo}
                for fut in as_completed(futures):
                    c = futures[fut]
                    summary, err = fut.result()
                    results[c.name] = CellResult(c.name, str(root / c.name), summary, error=err)
                    bar.update(1)
                    if on_done is not None:
                        on_done(results[c.name])
    finally:
        bar.close()
    return [results[c.name] for c in cells]


def _run_ray(todo: list[Cell], root: Path, address: str | None, threads: int, workers: int,
             results: dict[str, CellResult], bar: Any, on_done: Callable[[CellResult], None] | None = None) -> None:
    if not todo:
        return  # every cell is complete: no need to start Ray
    try:
        import ray
    except ImportError:
        raise SedLensError('the ray backend needs Ray: pip install "sed-lens[distributed]".') from None
    started = not ray.is_initialized()
    if started:
        if address is not None:
            check_ray_address(address)
        try:
            ray.init(address=address, num_cpus=workers * threads if address is None else None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, runtime_env=ray_runtime_env())
        except Exception as e:  # noqa: BLE001 - Ray raises many types for a cluster it cannot join
            first = str(e).splitlines()[0] if str(e) else ""
            raise SedLensError(f"cannot start Ray{f' at {address}' if address else ''} ({type(e).__name__}: {first}).") from None
    try:
        remote = ray.remote(num_cpus=threads)(_execute_safely)
        pending = {remote.remote(c, str(root / c.name), threads): c for c in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            c = pending.pop(done[0])
            try:
                summary, err = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - a worker that died (killed, out of memory) fails its cell only
                summary, err = None, f"{type(e).__name__}: {e}"
            results[c.name] = CellResult(c.name, str(root / c.name), summary, error=err)
            bar.update(1)
            if on_done is not None:
                on_done(results[c.name])
    finally:
        if started:
            ray.shutdown()


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast with one clear error when a ``HOST:PORT`` / ``ray://HOST:PORT`` address does not answer (Ray
    itself would wait for minutes)."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address.strip())
    if address.strip() == "auto":
        return
    check(m is not None, f"--ray-address must be HOST:PORT, ray://HOST:PORT or auto, got {address!r}.")
    assert m is not None
    try:
        socket.create_connection((m[1], int(m[2])), timeout=timeout).close()
    except OSError as e:
        raise SedLensError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}).") from None


def ray_runtime_env() -> dict[str, Any]:
    """The Ray ``runtime_env`` that makes workers import this sed_lens: when it is a source checkout (not an
    installed package), its directory goes first on the workers' PYTHONPATH."""
    src = Path(__file__).resolve().parent.parent  # the folder holding the sed_lens package
    if not (src / "pyproject.toml").is_file():
        return {}
    paths = [str(src), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(src)]]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


def raise_failures(results: Sequence[CellResult]) -> None:
    """Raise one :class:`SedLensError` naming every failed cell (with the first error's message)."""
    failed = [r for r in results if r.error is not None]
    if failed:
        first = failed[0].error.splitlines()[0] if failed[0].error else ""
        raise SedLensError(f"{len(failed)} of {len(results)} grid cells failed ({', '.join(r.name for r in failed)}); "
                           f"first error: {first}")
