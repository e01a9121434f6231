"""What an offline W&B run holds, read from its files: ``read_offline_run(RUN_DIR)``.

An offline run keeps everything ``wandb sync`` will upload in ``RUN_DIR/wandb/offline-run-TIME-ID/``: the
transaction log ``run-ID.wandb`` and media files under ``files/`` (tables as ``media/table/*.table.json``, images
as ``media/images/*.png``). The log is a LevelDB-style record log — a 7-byte header (``:W&B``, magic, version),
then 32 KiB blocks of chunks, each ``crc32 (uint32) · length (uint16) · type (uint8: full, first, middle,
last) · data`` — whose records are W&B's ``Record`` protocol buffers: the run, config, one history row per
logged step, summary updates, artifacts, files and the exit record.

Use it to check what a run will show in W&B before syncing it; the tests read logged values back with it.
W&B writes the log from a helper process, so a run finished a moment ago may still be flushing: the reader
waits (``wait`` seconds) for the exit record.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sed_lens.errors import check

HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """The contents of one offline W&B run directory."""

    directory: Path
    run_id: str = ""
    project: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged row ("_step" included)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # name, type, metadata, files
    files: list[str] = field(default_factory=list)
    complete: bool = False  # the exit record was written

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """``[(step, value)]`` of a logged metric, in logging order."""
        return [(row.get("_step", -1), row[key]) for row in self.history if key in row]

    def table(self, key: str) -> tuple[list[str], list[list[Any]]]:
        """``(columns, rows)`` of the last W&B Table logged under ``key``."""
        entries = [v for _, v in self.metric(key) if isinstance(v, dict) and v.get("_type") == "table-file"]
        check(bool(entries), f"the offline run {self.directory} logged no table {key!r}.")
        data = json.loads((self.directory / "files" / entries[-1]["path"]).read_text())
        return list(data["columns"]), [list(r) for r in data["data"]]

    def images(self, key: str) -> list[Path]:
        """The files of the W&B images logged under ``key``."""
        return [self.directory / "files" / v["path"] for _, v in self.metric(key)
                if isinstance(v, dict) and v.get("_type") == "image-file"]


def offline_run_dirs(run_dir: str | Path) -> list[Path]:
    """The offline W&B runs of a sed_lens run directory (one per start or resume), oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*"))


def read_records(path: str | Path) -> list[Any]:
    """The ``Record`` protocol buffers of a ``.wandb`` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    check(data[:4] == HEADER[:4], f"{path} is not a W&B transaction log.")
    records, pos, chunks = [], len(HEADER), b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the tail of a block too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            break  # a chunk still being written
        pos += 7 + length
        chunks += chunk
        if kind in (_FULL, _LAST):
            # wandb's protobuf module builds its message classes at import time: mypy cannot see them
            rec = cast(Any, pb).Record()
            rec.ParseFromString(chunks)
            records.append(rec)
            chunks = b""
    return records


def _set(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def _items(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        keys = list(it.nested_key) or [it.key]
        _set(out, keys, json.loads(it.value_json))
    return out


def _merge(target: dict[str, Any], update: dict[str, Any]) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


def parse_offline_run(directory: Path) -> OfflineRun:
    """Read one ``offline-run-*`` directory as it is now."""
    logs = sorted(directory.glob("run-*.wandb"))
    check(len(logs) == 1, f"{directory} holds no W&B transaction log (run-ID.wandb).")
    run = OfflineRun(directory)
    for rec in read_records(logs[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.job_type = rec.run.run_id, rec.run.project, rec.run.job_type
            _merge(run.config, _items(rec.run.config.update))
        elif kind == "config":
            _merge(run.config, _items(rec.config.update))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            _merge(run.summary, _items(rec.summary.update))
        elif kind == "artifact":
            a = rec.artifact
            run.artifacts.append({"name": a.name, "type": a.type, "metadata": json.loads(a.metadata or "{}"),
                                  "files": [c.path for c in a.manifest.contents]})
        elif kind == "files":
            run.files.extend(f.path for f in rec.files.files)
        elif kind == "exit":
            run.complete = True
    return run


def read_offline_run(run_dir: str | Path, wait: float = 10.0) -> OfflineRun:
    """The latest offline W&B run of a sed_lens run directory (or an ``offline-run-*`` directory itself).

    Waits up to ``wait`` seconds for W&B to finish writing it; check ``complete`` for the exit record.
    """
    path = Path(run_dir)
    if not path.name.startswith("offline-run-"):
        found = offline_run_dirs(path)
        check(bool(found), f"{path} holds no offline W&B run (wandb/offline-run-*).")
        path = found[-1]
    deadline = time.monotonic() + wait
    while True:
        run = parse_offline_run(path)
        if run.complete or time.monotonic() >= deadline:
            return run
        time.sleep(0.2)
