"""Run directories and W&B: every run leaves local files and (optionally) a W&B run.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged step), ``summary.json``,
``checkpoints/`` and whatever artifacts the experiment writes. W&B mirrors it: mode ``"offline"`` by default
(nothing leaves the machine; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads later), ``"online"`` or
``"disabled"``. W&B is never essential: a W&B failure is reported once and the run goes on with its local files.

Every W&B call of sed_lens goes through :class:`Run`: metrics (:meth:`Run.log`), the summary, tables
(:meth:`Run.log_table`), images (:meth:`Run.log_images`) and artifacts (:meth:`Run.log_artifact`). The local
files stay the source of truth; tables, images and artifacts are W&B views of files the run directory holds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

import numpy as np

from sed_lens.configs import WANDB_MODES, WandbMode
from sed_lens.errors import SedLensError, check


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON version of ``obj`` (tensors and numpy scalars/arrays become numbers and lists; NaN → None)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    torch = sys.modules.get("torch")  # no tensor can exist before torch is imported; keeps this module light
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def current_umask() -> int:
    """The process's umask (read from /proc where possible, so it is never changed, even briefly)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file.

    The file gets the permissions an ordinary ``open()`` would give it (``0o666`` less the umask), not the
    ``0o600`` of a temporary file, so group members on a shared filesystem can read runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (``metrics.jsonl``).

    A truncated last line — what a run killed while writing it leaves — is dropped with a warning; a damaged
    line before the last raises :class:`SedLensError`."""
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows: list[dict[str, Any]] = []
    for n, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                raise SedLensError(f"{path} line {i} is not valid JSON and is not the last line, so the file is "
                                   "damaged, not just cut short by a kill.") from None
            warnings.warn(f"{path}: dropped its truncated last line {i} (left by a run killed while writing it).",
                          RuntimeWarning, stacklevel=2)
    return rows


def _metrics_need_repair(path: Path) -> bool:
    """Whether ``path`` ends in a partial line (no final newline)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


@functools.cache
def package_version() -> str | None:
    """The installed sed_lens version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sed-lens")
    except PackageNotFoundError:
        return getattr(sys.modules.get("sed_lens"), "__version__", None)


@functools.cache
def git_commit() -> str | None:
    """The short commit of the sed_lens source when it is a git checkout (None otherwise)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def default_run_dir(experiment: str, name: str, root: str | Path = "runs") -> Path:
    """``runs/EXPERIMENT/NAME-YYYYmmdd-HHMMSS`` (made unique if that exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / experiment / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def _is_wandb_mode(mode: str) -> TypeGuard[WandbMode]:
    return mode in WANDB_MODES


class Run:
    """One run: a directory of local files, mirrored to a W&B run.

    Args:
        run_dir: the directory (created; it must not already hold a run unless ``resume=True``).
        config: logged as ``config.json`` and as the W&B config.
        wandb_mode: ``"offline"`` (default), ``"online"`` or ``"disabled"``.
        project, name, group, job_type, tags: W&B run fields.
        resume: reopen an existing run directory (its W&B run id is reused; ``run.json`` keeps the command that
            created the run and lists the resumes).

    ``wandb_mode="online"`` falls back to an offline W&B run in the run directory (warned once) when W&B
    cannot start online, so that ``wandb sync`` can upload it later. Every row of ``metrics.jsonl`` gets a
    ``wall_time``: seconds of running since the run started (resumes continue the count).
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], *, wandb_mode: str = "offline",
                 project: str = "sed-lens", name: str | None = None, group: str | None = None,
                 job_type: str | None = None, tags: tuple[str, ...] = (), resume: bool = False) -> None:
        if not _is_wandb_mode(wandb_mode):
            raise SedLensError(f"unknown W&B mode {wandb_mode!r}; choose from {', '.join(WANDB_MODES)}.")
        self.dir = Path(run_dir)
        self.config = to_jsonable(dict(config))
        self.wandb_mode: WandbMode = wandb_mode
        self.name = name or self.dir.name
        if resume:
            check(self.dir.exists(), f"cannot resume: run directory {self.dir} does not exist.")
            check(self.dir.is_dir(), f"cannot resume: {self.dir} is a file, not a run directory.")
            check((self.dir / "config.json").is_file(),
                  f"cannot resume: {self.dir} holds no config.json, so it is not a run directory.")
        else:
            check(not (self.dir / "metrics.jsonl").exists(),
                  f"run directory {self.dir} already holds a run; choose another directory or resume it.")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise SedLensError(f"cannot write to run directory {self.dir}: {e.strerror or e}.") from None
        meta_path = self.dir / "run.json"
        try:
            meta = json.loads(meta_path.read_text()) if resume and meta_path.exists() else {}
        except json.JSONDecodeError:
            meta = {}
        self.wandb_id: str = meta.get("wandb_id") or _new_wandb_id()
        if not resume:
            write_json(self.dir / "config.json", self.config)
        now, command = time.strftime("%Y-%m-%d %H:%M:%S"), " ".join(sys.argv)
        meta = {**meta, "wandb_id": self.wandb_id, "wandb_mode": wandb_mode, "project": project,
                "created": meta.get("created", now), "command": meta.get("command", command),
                "sed_lens_version": package_version(), "git_commit": git_commit()}
        if resume:
            meta["resumes"] = [*meta.get("resumes", []), {"at": now, "command": command}]
        write_json(meta_path, meta)
        metrics = self.dir / "metrics.jsonl"
        if resume and _metrics_need_repair(metrics):  # a torn last line: appending after it would bury it
            rows = read_jsonl(metrics)
            atomic_write_bytes(metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())
        self._t0 = time.perf_counter()
        self._wall_before = 0.0
        if resume and metrics.is_file():
            self._wall_before = _last_wall_time(read_jsonl(metrics))
        self._metrics = open(metrics, "a")
        self._wandb: Any = None
        self._wandb_failed = False
        if wandb_mode != "disabled":
            self._wandb_call("start", self._start_wandb, project, name or self.dir.name, group, job_type, tags, resume)

    # --- W&B ---------------------------------------------------------------------------------------------
    def _start_wandb(self, project: str, name: str, group: str | None, job_type: str | None,
                     tags: tuple[str, ...], resume: bool) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")

        def init(mode: WandbMode) -> Any:
            return wandb.init(
                mode=mode,
                dir=str(self.dir), project=project, name=name, group=group, job_type=job_type,
                tags=list(tags), config=self.config, id=self.wandb_id, resume="allow" if resume else None,
                reinit="create_new",
            )

        try:
            self._wandb = init(self.wandb_mode)
        except Exception as e:  # noqa: BLE001 - no network, no API key, ...: keep an offline copy instead
            if self.wandb_mode != "online":
                raise
            self.wandb_mode = "offline"
            warnings.warn(f"W&B could not start online ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"logging to an offline W&B run in {self.dir / 'wandb'} instead, upload it later with "
                          f"wandb sync {self.dir}/wandb/offline-run-*.", RuntimeWarning, stacklevel=4)
            meta_path = self.dir / "run.json"
            write_json(meta_path, {**json.loads(meta_path.read_text()), "wandb_mode": "offline",
                                   "wandb_mode_requested": "online"})
            self._wandb = init("offline")
        if self._wandb.id != self.wandb_id:  # a sweep agent (or launch) imposes its own run id
            self.wandb_id = self._wandb.id
            meta_path = self.dir / "run.json"
            write_json(meta_path, {**json.loads(meta_path.read_text()), "wandb_id": self.wandb_id})

    def _wandb_call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a W&B call; on failure warn once, drop W&B and carry on with the local files."""
        if self._wandb_failed:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - any W&B failure must not stop a run
            self._wandb_failed = True
            self._wandb = None
            msg = f"W&B {what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); " \
                  f"continuing with local files in {self.dir}."
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return None

    def describe_wandb(self) -> str:
        """One phrase on the W&B side of the run: mode, name and id (or why there is none)."""
        if self.wandb_mode == "disabled":
            return "W&B disabled"
        if self._wandb is None:
            return f"W&B failed, local files only (in {self.dir})"
        where = f", {self._wandb.url}" if self.wandb_mode == "online" and getattr(self._wandb, "url", None) else ""
        return f"W&B {self.wandb_mode} run {self.name} (id {self.wandb_id}{where})"

    @property
    def wandb_run(self) -> Any:
        """The live ``wandb.Run`` (None when W&B is disabled or failed)."""
        return self._wandb

    # --- logging -----------------------------------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append ``{"step": step, **metrics}`` to ``metrics.jsonl`` and log it to W&B."""
        row = to_jsonable({"step": step, **metrics})
        row.setdefault("wall_time", round(self.elapsed(), 3))
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb_call("log", self._wandb.log, {k: v for k, v in row.items() if k != "step"}, step)

    def log_wandb(self, data: Mapping[str, Any], step: int | None = None) -> None:
        """Log W&B-only objects (tables, images) — nothing is written locally."""
        if self._wandb is not None:
            self._wandb_call("log", self._wandb.log, dict(data), step)

    def define_metric(self, pattern: str, step_metric: str) -> None:
        """Plot W&B metrics matching ``pattern`` (e.g. ``"coupling/*"``) against ``step_metric`` instead of the
        W&B step — for series measured after training at past steps (log them with :meth:`log_wandb`)."""
        if self._wandb is not None:
            self._wandb_call("define_metric", self._wandb.define_metric, pattern, step_metric)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None) -> None:
        """Log a W&B Table ``name`` (e.g. ``"coupling/R"``); W&B only — the rows come from the run's local files.

        Values go through :func:`to_jsonable` (tensors and numpy scalars become numbers, NaN becomes None).
        """
        columns = [str(c) for c in columns]
        data = [to_jsonable(list(r)) for r in rows]
        bad = [i for i, r in enumerate(data) if len(r) != len(columns)]
        check(not bad, f"table {name!r}: row {bad[0] if bad else 0} does not have {len(columns)} values (one per column).")
        if self._wandb is not None:
            self._wandb_call("table", self._log_table, name, columns, data, step)

    def _log_table(self, name: str, columns: list[Any], data: list[list[Any]], step: int | None) -> None:
        import wandb

        table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
        self._wandb.log({name: table}, step=step)

    def log_images(self, images: Mapping[str, str | Path], step: int | None = None) -> None:
        """Log PNG files as W&B images, ``{key: path}`` (e.g. ``{"figures/grokking": RUN_DIR / "grokking.png"}``)."""
        paths = {k: Path(v) for k, v in images.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        check(not missing, f"cannot log image {missing[0] if missing else ''}: no such file.")
        if self._wandb is not None and paths:
            self._wandb_call("images", self._log_images, paths, step)

    def _log_images(self, paths: dict[str, Path], step: int | None) -> None:
        import wandb

        self._wandb.log({k: wandb.Image(str(p), caption=p.name) for k, p in paths.items()}, step=step)

    def log_artifact(self, name: str, type: str, paths: Sequence[str | Path],
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Log files (or directories) as one W&B artifact of ``type``; W&B only — the files stay where they are.

        ``name`` is made W&B-safe: characters other than letters, digits, ``-``, ``_`` and ``.`` become ``-``.
        """
        files = [Path(p) for p in paths]
        missing = [str(p) for p in files if not p.exists()]
        check(not missing, f"cannot log artifact {name!r}: {missing[0] if missing else ''} does not exist.")
        check(bool(files), f"artifact {name!r} needs at least one file.")
        if self._wandb is not None:
            self._wandb_call("artifact", self._log_artifact, artifact_name(name), type, files,
                             to_jsonable(dict(metadata or {})))

    def _log_artifact(self, name: str, type: str, files: list[Path], metadata: dict[str, Any]) -> None:
        import wandb

        art = wandb.Artifact(name, type=type, metadata=metadata)
        for f in files:
            if f.is_dir():
                art.add_dir(str(f), name=f.name)
            else:
                art.add_file(str(f), name=f.name)
        self._wandb.log_artifact(art)

    def summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` (merged with what is there) and the W&B run summary."""
        path = self.dir / "summary.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        data = {**old, **to_jsonable(dict(summary))}
        write_json(path, data)
        if self._wandb is not None:
            self._wandb_call("summary", self._wandb.summary.update, data)

    def save_json(self, name: str, obj: Any) -> Path:
        path = self.dir / name
        write_json(path, obj)
        return path

    def elapsed(self) -> float:
        """Seconds of running since the run started (over all its resumes)."""
        return self._wall_before + time.perf_counter() - self._t0

    def truncate_metrics(self, last_step: int) -> None:
        """Drop logged rows after ``last_step`` (used when resuming from a checkpoint)."""
        self._metrics.close()
        path = self.dir / "metrics.jsonl"
        rows = [r for r in read_jsonl(path) if r.get("step", -1) <= last_step] if path.exists() else []
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        self._wall_before, self._t0 = _last_wall_time(rows), time.perf_counter()
        self._metrics = open(path, "a")

    def sync_hint(self) -> str | None:
        """The ``wandb sync`` command for an offline run."""
        if self.wandb_mode != "offline" or self._wandb_failed:
            return None
        return f"wandb sync {self.dir}/wandb/offline-run-*"

    def finish(self) -> None:
        if not self._metrics.closed:
            self._metrics.close()
        if self._wandb is not None:
            self._wandb_call("finish", self._wandb.finish)
            self._wandb = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def log_summary_run(root: str | Path, name: str, config: Mapping[str, Any], *, wandb_mode: str, project: str,
                    job_type: str, tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] = MappingProxyType({}),
                    images: Mapping[str, str | Path] = MappingProxyType({}), files: Sequence[str | Path] = (),
                    summary: Mapping[str, Any] | None = None) -> Run | None:
    """An experiment's aggregate as its own small W&B run (local directory ROOT/summary/NAME-TIME): ``tables``
    ``{key: (columns, rows)}``, ``images`` ``{key: png}``, and ``files`` as one artifact. None when W&B is disabled."""
    if wandb_mode == "disabled":
        return None
    with Run(default_run_dir("summary", name, root=root), {"experiment": job_type, **dict(config)},
             wandb_mode=wandb_mode, project=project, name=f"{name}-{Path(root).resolve().name}", job_type=job_type) as run:
        for key, (columns, rows) in dict(tables).items():
            run.log_table(key, columns, rows)
        run.log_images(dict(images))
        existing = [f for f in files if Path(f).exists()]
        if existing:
            run.log_artifact(f"{name}-{run.wandb_id}", job_type, existing, dict(summary or {}))
        if summary:
            run.summary(summary)
    return run


def artifact_name(text: str) -> str:
    """``text`` as a valid W&B artifact name (letters, digits, ``-``, ``_``, ``.``; at most 128 characters)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "artifact"
    return name[:128]


def _last_wall_time(rows: Sequence[Mapping[str, Any]]) -> float:
    times = [r["wall_time"] for r in rows if isinstance(r.get("wall_time"), (int, float))]
    return float(times[-1]) if times else 0.0


def _new_wandb_id() -> str:
    import random
    import string

    return "".join(random.SystemRandom().choice(string.ascii_lowercase + string.digits) for _ in range(8))
