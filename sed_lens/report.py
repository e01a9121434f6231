"""Reports of run directories: ``python -m sed_lens.report RUN_DIR [RUN_DIR ...] --out DIR``.

Writes DIR/report.html — one self-contained page (figures embedded as base64 PNG, inline CSS, no scripts and no
remote resources: it opens offline) — and DIR/report.md with its figures copied to DIR/figures/. Each RUN_DIR is
one section: its configuration, its summary tables with the paper's numbers beside ours where they apply, and
its figures; a figure the directory lacks is regenerated from its data into DIR/figures/.

Each experiment owns its section: the experiment a directory's ``config.json`` names (field ``experiment``) is
asked first, then every module of :mod:`sed_lens.experiments`; the first whose ``detects(run_dir)`` is true builds
the section with ``report_section(run_dir, figure_dir)`` (a grokking run, a coupling output directory or run, an
intervention output directory, a reproduction output directory). Any other run directory (config.json or
summary.json) gets its config, summary, Markdown files as they are and every PNG. This module imports no
experiment: a new one needs no edit here. The document model and its renderers are :mod:`sed_lens.rendering`.

``--wandb ENTITY/PROJECT`` also builds the report as a W&B Report (wandb-workspaces): the same text and tables,
and panel grids over the runs the directories logged (line plots of their metrics, their W&B tables and
images), for a project the offline runs were synced to (``wandb sync``). ``--wandb-save`` saves it; that needs a
network and a W&B API key.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from sed_lens.cli import config_from_args, parser_for, run_cli
from sed_lens.configs import Config
from sed_lens.errors import SedLensError, check
from sed_lens.rendering import (
    Block,
    Code,
    Details,
    Figure,
    Heading,
    LinePanel,
    Panels,
    Section,
    Table,
    Text,
    flatten,
    fmt,
    json_has,
    load_json,
    metric_keys,
    metric_plots,
    other_figures,
    render_html,
    render_markdown,
    wandb_ids,
    wandb_report,
)

__all__ = [
    "KINDS", "Block", "Code", "Details", "Figure", "Heading", "Kind", "LinePanel", "Panels", "ReportConfig",
    "ReportResult", "Section", "Table", "Text", "build_report", "cli", "detect_kind", "experiment_module",
    "experiment_names", "experiment_of", "flatten", "fmt", "generic_section", "json_has", "kind", "load_json", "main",
    "parse_wandb_spec", "register", "save_wandb_report",
]

# --- which section a directory gets ------------------------------------------------------------------------

Renderer = Callable[[Path, Path], Section]  # (run directory, directory for regenerated figures) -> section


@dataclass(frozen=True)
class Kind:
    name: str
    detect: Callable[[Path], bool]
    render: Renderer


KINDS: list[Kind] = []
"""Kinds of directory registered with :func:`register` (tried before the experiments)."""

EXPERIMENTS = "sed_lens.experiments"


def register(name: str, detect: Callable[[Path], bool], render: Renderer) -> None:
    """Add a kind of directory that is no experiment of sed_lens; kinds are tried in registration order, before the
    experiments, and the first that detects a directory renders it."""
    check(all(k.name != name for k in KINDS), f"a report kind named {name!r} is already registered.")
    KINDS.append(Kind(name, detect, render))


def kind(name: str, detect: Callable[[Path], bool]) -> Callable[[Renderer], Renderer]:
    """Decorator form of :func:`register`: ``@kind("name", detect)`` over ``def render(run_dir, figure_dir)``."""

    def deco(render: Renderer) -> Renderer:
        register(name, detect, render)
        return render

    return deco


def experiment_of(run_dir: Path) -> str | None:
    """The ``experiment`` field of the directory's config.json (None without one)."""
    path = run_dir / "config.json"
    data = load_json(path) if path.is_file() else None
    name = data.get("experiment") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def experiment_names() -> list[str]:
    """The modules of :mod:`sed_lens.experiments` (listed from its folder, none imported)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).resolve().parent / "experiments")]))


def experiment_module(name: str) -> ModuleType | None:
    """``sed_lens.experiments.NAME`` when it exists and reports directories (it defines ``detects`` and
    ``report_section``), else None."""
    if not name.isidentifier():
        return None
    module_name = f"{EXPERIMENTS}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in (module_name, EXPERIMENTS):
            return None
        raise
    ok = callable(getattr(module, "detects", None)) and callable(getattr(module, "report_section", None))
    return module if ok else None


def detect_kind(run_dir: Path) -> Kind:
    """The kind of ``run_dir``: a registered kind that detects it, else the experiment that does (the one its
    config.json names first), else the generic kind of any run directory (:class:`SedLensError` if it is missing or
    is no run directory)."""
    check(run_dir.exists(), f"{run_dir} does not exist.")
    check(run_dir.is_dir(), f"{run_dir} is not a directory.")
    for k in KINDS:
        if k.detect(run_dir):
            return k
    named = experiment_of(run_dir)
    for name in dict.fromkeys([*([named] if named else []), *experiment_names()]):
        module = experiment_module(name)
        if module is not None and module.detects(run_dir):
            return Kind(name, module.detects, module.report_section)
    if (run_dir / "config.json").is_file() or (run_dir / "summary.json").is_file():
        return Kind("run", lambda d: True, generic_section)
    raise SedLensError(f"{run_dir} is not a run directory sed_lens can report on (it holds no config.json or "
                       "summary.json, and no experiment of sed_lens recognises it).")


def generic_section(run_dir: Path, figure_dir: Path) -> Section:
    """Any other run directory: its configuration (config.json, or the ``config`` of another JSON file of it), its
    summary.json, its Markdown files as they are and every PNG; W&B panels over the runs in it and one level below
    (a grid's cells)."""
    if (run_dir / "config.json").is_file():
        config, main = load_json(run_dir / "config.json"), None
    else:
        main = next((p for p in sorted(run_dir.glob("*.json")) if p.name not in ("summary.json", "run.json")
                     and json_has(p, "config")), None)
        config = load_json(main)["config"] if main is not None else {}
    blocks: list[Block] = [Code(md.read_text(), md.name) for md in sorted(run_dir.glob("*.md"))]
    if (run_dir / "summary.json").is_file():
        blocks.append(Details("summary.json", flatten(load_json(run_dir / "summary.json"))))
    blocks += other_figures(run_dir, [])
    blocks.append(Details("configuration", flatten(config)))
    subdirs = [d for d in sorted(run_dir.iterdir()) if d.is_dir()]
    panels = Panels(wandb_ids(run_dir, *subdirs),
                    metric_plots(metric_keys(run_dir / "metrics.jsonl", *(d / "metrics.jsonl" for d in subdirs))),
                    [], [])
    name = experiment_of(run_dir) or (main.stem if main is not None else "run")
    return Section(f"{name.capitalize()}: {run_dir.name}", name, run_dir, blocks, panels)


# --- building a report -------------------------------------------------------------------------------------


def _slug(i: int, run_dir: Path) -> str:
    return f"{i + 1:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '-', run_dir.resolve().name).strip('-') or 'run'}"


def parse_wandb_spec(spec: str) -> tuple[str, str]:
    """``"ENTITY/PROJECT"`` → (entity, project)."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)", spec.strip())
    check(m is not None, f"--wandb must be ENTITY/PROJECT (e.g. my-team/sed-lens), got {spec!r}.")
    assert m is not None
    return m[1], m[2]


@dataclass
class ReportResult:
    html: Path
    markdown: Path
    sections: list[Section]
    wandb: Any = None  # the W&B Report object (None without --wandb)


def build_report(run_dirs: Sequence[str | Path], out: str | Path, title: str = "sed_lens report",
                 wandb: str | None = None) -> ReportResult:
    """Write ``out/report.html`` and ``out/report.md`` for ``run_dirs`` (and build the W&B Report for
    ``wandb="ENTITY/PROJECT"``, without saving it)."""
    check(len(run_dirs) > 0, "name at least one run directory.")
    spec = parse_wandb_spec(wandb) if wandb is not None else None
    dirs = [Path(d) for d in run_dirs]
    kinds = [detect_kind(d) for d in dirs]  # every input is checked before anything is written
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SedLensError(f"cannot write the report to {out}: {e.strerror or e}.") from None
    slugs = [_slug(i, d) for i, d in enumerate(dirs)]
    sections = [k.render(d, out / "figures" / slug) for k, d, slug in zip(kinds, dirs, slugs, strict=True)]
    generated = f"Generated {time.strftime('%Y-%m-%d %H:%M')} by sed_lens from {len(dirs)} director{'y' if len(dirs) == 1 else 'ies'}"
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(title, sections, generated))
    md_path.write_text(render_markdown(title, sections, generated, out, slugs))
    report = wandb_report(title, sections, spec[0], spec[1], generated) if spec is not None else None
    return ReportResult(html_path, md_path, sections, report)


def save_wandb_report(report: Any) -> str:
    """Save a W&B Report; returns its URL. Any failure (no network, no key, no access) is one clear error."""
    try:
        report.save()
        return str(report.url)
    except Exception as e:  # noqa: BLE001 - every failure to save becomes one line for the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise SedLensError(f"could not save the W&B report to {report.entity}/{report.project} "
                           f"({type(e).__name__}: {first}); the local report is written.") from None


@dataclass(kw_only=True)
class ReportConfig(Config):
    """``python -m sed_lens.report``."""

    run_dirs: tuple[str, ...] = field(default=(), metadata={"cli": False})
    out: str = field(default="report", metadata={"help": "output directory: report.html, report.md, figures/"})
    title: str = field(default="sed_lens report", metadata={"help": "report title"})
    wandb: str | None = field(default=None, metadata={
        "help": "also build a W&B Report in this W&B project (the one the runs were synced to)", "metavar": "ENTITY/PROJECT"})
    wandb_save: bool = field(default=False, metadata={"help": "save the W&B Report (needs a network and a W&B API key)"})

    def validate(self) -> None:
        super().validate()
        check(self.wandb is not None or not self.wandb_save, "--wandb-save needs --wandb ENTITY/PROJECT.")


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(ReportConfig, "python -m sed_lens.report", __doc__ or "")
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories and experiment output directories")
    cfg = config_from_args(ReportConfig, ap.parse_args(argv))
    result = build_report(cfg.run_dirs, cfg.out, cfg.title, cfg.wandb)
    n_figs = sum(isinstance(b, Figure) for s in result.sections for b in s.blocks)
    print(f"report: {result.html} (self-contained), {result.markdown}; {len(result.sections)} sections, {n_figs} figures")
    for s in result.sections:
        print(f"  {s.kind:<12} {s.directory}")
    if result.wandb is not None:
        if cfg.wandb_save:
            print(f"W&B report saved: {save_wandb_report(result.wandb)}")
        else:
            print(f"W&B report built for {cfg.wandb} ({len(result.wandb.blocks)} blocks); add --wandb-save to save it")


def cli() -> None:
    sys.exit(run_cli(main, prog="report"))


if __name__ == "__main__":
    cli()
