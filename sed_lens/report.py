"""Reports of run directories: ``python -m sed_lens.report RUN_DIR [RUN_DIR ...] --out DIR``.

Writes DIR/report.html — one self-contained page (figures embedded as base64 PNG, inline CSS, no scripts and no
remote resources: it opens offline) — and DIR/report.md with its figures copied to DIR/figures/. Each RUN_DIR is
one section: its configuration, its summary tables with the paper's numbers beside ours where they apply, and
its figures; a figure the directory lacks is regenerated from its data into DIR/figures/. Directories it knows:
a grokking run, a coupling output directory (OUT of the coupling experiment), a single coupling run, an
intervention output directory, a reproduction output directory, and any other run directory (config.json or
summary.json: its config, summary, Markdown tables and every PNG).

``--wandb ENTITY/PROJECT`` also builds the report as a W&B Report (wandb-workspaces): the same text and tables,
and panel grids over the runs the directories logged (line plots of their metrics, their W&B tables and
images), for a project the offline runs were synced to (``wandb sync``). ``--wandb-save`` saves it; that needs a
network and a W&B API key.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sed_lens.cli import config_from_args, config_from_dict, parser_for, run_cli
from sed_lens.errors import SedLensError, check
from sed_lens.tracking import read_jsonl

# --- what a report is made of ----------------------------------------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 3  # 3 = a heading inside a section


@dataclass
class Text:
    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Details:
    """Key–value pairs shown collapsed (a run's config, its raw summary)."""

    title: str
    items: list[tuple[str, str]]


Block = Heading | Text | Table | Figure | Details


@dataclass
class LinePanel:
    """A W&B line plot of logged metrics ``y`` against ``x`` (the W&B step, or a metric such as ``coupling/step``)."""

    title: str
    y: list[str]
    log_y: bool = False
    x: str = "Step"


@dataclass
class Panels:
    """What a directory's runs logged to W&B, for the panel grid of the W&B report."""

    run_ids: list[str] = field(default_factory=list)
    line_plots: list[LinePanel] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    kind: str
    directory: Path
    blocks: list[Block]
    panels: Panels


# --- the registry of directory kinds -----------------------------------------------------------------------

Renderer = Callable[[Path, Path], Section]  # (run directory, directory for regenerated figures) -> section


@dataclass(frozen=True)
class Kind:
    name: str
    detect: Callable[[Path], bool]
    render: Renderer


KINDS: list[Kind] = []


def register(name: str, detect: Callable[[Path], bool], render: Renderer) -> None:
    """Add a kind of directory; kinds are tried in registration order and the first that detects it renders it."""
    check(all(k.name != name for k in KINDS), f"a report kind named {name!r} is already registered.")
    KINDS.append(Kind(name, detect, render))


def kind(name: str, detect: Callable[[Path], bool]) -> Callable[[Renderer], Renderer]:
    """Decorator form of :func:`register`: ``@kind("name", detect)`` over ``def render(run_dir, figure_dir)``."""

    def deco(render: Renderer) -> Renderer:
        register(name, detect, render)
        return render

    return deco


def detect_kind(run_dir: Path) -> Kind:
    """The kind of ``run_dir`` (:class:`SedLensError` if it is missing or is no run directory)."""
    check(run_dir.exists(), f"{run_dir} does not exist.")
    check(run_dir.is_dir(), f"{run_dir} is not a directory.")
    for k in KINDS:
        if k.detect(run_dir):
            return k
    raise SedLensError(f"{run_dir} is not a run directory sed_lens can report on "
                       "(it holds no config.json, summary.json, coupling.json or intervention.json).")


# --- helpers -----------------------------------------------------------------------------------------------


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SedLensError(f"{path} is not valid JSON (line {e.lineno}); it cannot be reported.") from None
    except OSError as e:
        raise SedLensError(f"cannot read {path}: {e.strerror or e}.") from None


def json_has(path: Path, key: str) -> bool:
    """Whether ``path`` is a JSON object with ``key`` (False when the file is missing)."""
    if not path.is_file():
        return False
    data = load_json(path)
    return isinstance(data, dict) and key in data


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table: ``None``/NaN → "—", floats below 10 to ``digits`` decimals (``digits`` significant
    digits when that would round a nonzero value to 0), larger ones to one decimal."""
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "—"
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``{"train": {"lr": 0.001}}`` → ``[("train.lr", "0.001")]``; lists as JSON."""
    if isinstance(data, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in data.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(data, (list, tuple)):
        return [(prefix, json.dumps(data))]
    return [(prefix, "—" if data is None else f"{data:g}" if isinstance(data, float) else str(data))]


def wandb_ids(*run_dirs: Path) -> list[str]:
    """The W&B run ids recorded in the ``run.json`` of these run directories (those that have one)."""
    return [load_json(d / "run.json")["wandb_id"] for d in run_dirs if json_has(d / "run.json", "wandb_id")]


def metric_plots(keys: set[str]) -> list[LinePanel]:
    """Line plots of the standard metric families present in ``keys``: accuracy, loss, per SED stream the
    singular values, gaps and basis overlap, and per op the coupling R̄ of each SED stream (over ``coupling/step``)."""
    out: list[LinePanel] = []
    acc = sorted(k for k in keys if re.fullmatch(r"(train|test)/acc/.+", k))
    loss = sorted(k for k in keys if re.fullmatch(r"(train|test)/loss/.+", k))
    if acc:
        out.append(LinePanel("accuracy (train, test)", acc))
    if loss:
        out.append(LinePanel("loss (train, test)", loss, log_y=True))
    streams = sorted({m[1] for k in keys if (m := re.fullmatch(r"sed/(.+)/sigma_\d+", k))})
    for s in streams:
        family = {f: sorted(k for k in keys if re.fullmatch(rf"sed/{re.escape(s)}/{f}_\d+", k)) for f in ("sigma", "gap")}
        out.append(LinePanel(f"{s} SED: singular values", family["sigma"], log_y=True))
        out.append(LinePanel(f"{s} SED: gaps σ_j/σ_j+1", family["gap"], log_y=True))
        if f"sed/{s}/overlap" in keys:
            out.append(LinePanel(f"{s} SED: overlap with the previous basis", [f"sed/{s}/overlap"]))
    return out


def coupling_plots(ops_keys: Mapping[str, Sequence[str]]) -> list[LinePanel]:
    """Per op, R̄ of its SED streams over the training step of the measured snapshots (as coupling runs log it)."""
    from sed_lens.analysis.trajectory import split_key

    return [LinePanel(f"coupling R̄, {op}", [f"coupling/{op}/{k}/R_mean" for k in keys if not split_key(k)[2]],
                      log_y=True, x="coupling/step") for op, keys in ops_keys.items()]


def metric_keys(*paths: Path) -> set[str]:
    """Every metric key logged in these ``metrics.jsonl`` files."""
    return {k for p in paths if p.is_file() for row in read_jsonl(p) for k in row if k != "step"}


def figure(run_dir: Path, name: str, figure_dir: Path, caption: str, make: Callable[[Path], Path]) -> Figure:
    """The directory's figure ``name``, or one regenerated from its data into ``figure_dir``."""
    path = run_dir / name
    if path.is_file():
        return Figure(path, caption)
    return Figure(make(figure_dir / name), f"{caption} (regenerated from the run's data)")


def other_figures(run_dir: Path, shown: Sequence[Figure]) -> list[Figure]:
    """Every PNG of ``run_dir`` not already shown."""
    seen = {f.path.resolve() for f in shown}
    return [Figure(p, p.stem.replace("_", " ")) for p in sorted(run_dir.glob("*.png")) if p.resolve() not in seen]


def markdown_blocks(text: str, shift: int = 1) -> list[Block]:
    """Blocks of a Markdown subset — headings (moved ``shift`` levels down), pipe tables, paragraphs, list items
    (one paragraph each, starting ``- ``); image lines are skipped (figures are shown from the files)."""
    blocks: list[Block] = []
    para: list[str] = []
    lines = text.splitlines()

    def flush() -> None:
        if para:
            blocks.append(Text(" ".join(para)))
            para.clear()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            blocks.append(Heading(line.lstrip("#").strip(), min(level + shift, 6)))
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            if len(rows) >= 2 and all(re.fullmatch(r":?-+:?", c) for c in rows[1]):
                blocks.append(Table(rows[0], rows[2:]))
            else:
                blocks.extend(Text(" | ".join(r)) for r in rows)
            continue
        elif line.startswith("!["):
            flush()
        elif line.startswith(("- ", "* ")):
            flush()
            para.append(line.strip())
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return blocks


# --- kinds -------------------------------------------------------------------------------------------------


def _experiment(run_dir: Path) -> str | None:
    path = run_dir / "config.json"
    data = load_json(path) if path.is_file() else None
    return data.get("experiment") if isinstance(data, dict) else None


@kind("coupling", lambda d: json_has(d / "coupling.json", "aggregate") and (d / "cells").is_dir())
def coupling_section(run_dir: Path, figure_dir: Path) -> Section:
    """The coupling experiment's OUT: the tables of ``coupling.md`` (ours beside the paper's, recomputed from
    coupling.json), the aggregate figures, and the runs."""
    from sed_lens.experiments.coupling import CouplingConfig, figures, tables

    data = load_json(run_dir / "coupling.json")
    cfg = config_from_dict(CouplingConfig, data["config"])
    runs: dict[str, Any] = data["runs"]
    md, agg = tables(cfg, runs)
    blocks: list[Block] = [Text(f"{len(runs)} run{'' if len(runs) == 1 else 's'} under {run_dir / 'cells'}, each a run "
                                "directory of its own (pass one to the report for its R̄ trajectories).")]
    blocks += markdown_blocks(md.split("\n", 1)[1] if md.startswith("# ") else md)
    cells = [run_dir / "cells" / name for name in runs]
    blocks.append(Heading("Runs"))
    blocks.append(Table(["run", "grok step", "steps", "measured snapshots", "directory"],
                        [[name, ", ".join(f"{op} {fmt(g)}" for op, g in res["train"]["grok_step"].items()),
                          fmt(res["train"]["steps"]), fmt(len(res.get("measured", []))), str(run_dir / "cells" / name)]
                         for name, res in runs.items()]))
    couplings = {c.name: load_json(c / "coupling.json") for c in cells if (c / "coupling.json").is_file()}
    figs = [Figure(p, p.stem.replace("_", " ") + ("" if p.parent == run_dir else " (regenerated from the runs' data)"))
            for p in figures(cfg, figure_dir, couplings, agg, reuse=run_dir)]
    blocks += figs + other_figures(run_dir, figs)
    blocks.append(Details("configuration", flatten(data["config"])))
    summaries = sorted((run_dir / "summary").glob("*/run.json"))
    panels = Panels(run_ids=wandb_ids(*cells, *(p.parent for p in summaries[-1:])),
                    line_plots=metric_plots(metric_keys(*(c / "metrics.jsonl" for c in cells))) + coupling_plots(
                        {op: sorted({k for c in couplings.values() for k in c["summary"].get(op, {})})
                         for op in sorted({op for c in couplings.values() for op in c["summary"]})}),
                    tables=[f"coupling/summary/{n}" for n, v in agg.items() if v] + ["coupling/R"],
                    images=[f"figures/{f.path.stem}" for f in figs if f.path.parent == run_dir])
    return Section(f"SED–LCH coupling: {run_dir.name}", "coupling", run_dir, blocks, panels)


@kind("coupling-run", lambda d: json_has(d / "coupling.json", "snapshots"))
def coupling_run_section(run_dir: Path, figure_dir: Path) -> Section:
    """One coupling run: peak / final R̄ of every SED stream per op beside the paper, the R̄ trajectories."""
    from sed_lens import plots  # here, not at the top: `python -m sed_lens.report --help` stays fast
    from sed_lens.experiments.coupling import paper_for

    coupling = load_json(run_dir / "coupling.json")
    config = load_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {"scan": coupling["config"]}
    summary = load_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    history = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    ops = list(coupling["summary"])
    seed = config.get("grokking", {}).get("seed")
    blocks: list[Block] = [Text(f"Coupling R̄ = mean of R_1..R_k (A(SED direction) / median A(random)) at "
                                f"{len(coupling['measured'])} of {coupling['n_snapshots_total']} snapshots; "
                                "leading window = the paper's code, trailing = causal.")]
    if "grok_step" in summary:
        blocks.append(Table(["op", "grok step", "final train acc", "final test acc"],
                            [[op, fmt(summary["grok_step"].get(op)), fmt(summary["final"].get(f"train/acc/{op}")),
                              fmt(summary["final"].get(f"test/acc/{op}"))] for op in ops], "training"))
    blocks.append(Table(["op", "SED stream", "peak R̄", "at step", "final R̄", "mean R̄", "peak R₁", "paper"],
                        [[op, key, fmt(s["peak_R_mean"]), fmt(s["peak_step"]), fmt(s["final_R_mean"]),
                          fmt(s["mean_R_mean"]), fmt(s["peak_R1"]), paper_for(op, key, seed, len(ops) > 1)]
                         for op in ops for key, s in coupling["summary"][op].items()],
                        "coupling per op and SED stream, ours beside the paper's"))
    def trajectory(op: str) -> Callable[[Path], Path]:
        return lambda path: plots.coupling_trajectory(coupling, history, op, path)

    figs = [figure(run_dir, f"coupling_{op}.png", figure_dir, f"R̄ over training, {op}", trajectory(op)) for op in ops]
    blocks += figs + other_figures(run_dir, figs)
    blocks.append(Details("configuration", flatten(config)))
    panels = Panels(wandb_ids(run_dir), metric_plots(metric_keys(run_dir / "metrics.jsonl"))
                    + coupling_plots({op: list(coupling["summary"][op]) for op in ops}), ["coupling/R"],
                    [f"figures/coupling_{op}" for op in ops])
    return Section(f"Coupling run: {run_dir.name}", "coupling-run", run_dir, blocks, panels)


@kind("grokking", lambda d: _experiment(d) == "grokking" and (d / "metrics.jsonl").is_file() and (d / "summary.json").is_file())
def grokking_section(run_dir: Path, figure_dir: Path) -> Section:
    """A grokking run: grok step and final accuracies per op (the paper's grok step beside ours when the setup is
    the paper's), SED spectra at the last eval, the accuracy curves and SED spectra over training."""
    from sed_lens import plots
    from sed_lens.experiments.grokking import PAPER, GrokkingConfig, matches_paper
    from sed_lens.models import get_preset

    config = load_json(run_dir / "config.json")
    summary = load_json(run_dir / "summary.json")
    history = read_jsonl(run_dir / "metrics.jsonl")
    cfg = config_from_dict(GrokkingConfig, {k: v for k, v in config.items() if k != "experiment"})
    comparable = matches_paper(cfg)
    final, grok = summary.get("final", {}), summary.get("grok_step", {})
    blocks: list[Block] = [Text(
        f"{'+'.join(cfg.ops)} mod {cfg.p}, seed {cfg.seed}, preset {cfg.preset}, init {cfg.init or get_preset(cfg.preset).default_init}: "
        f"{fmt(summary.get('steps'))} steps in {fmt(summary.get('wall_time_s'))} s"
        + (", stopped once test accuracy held" if summary.get("stopped_early") else "") + ". Grok step = first eval "
        f"with test accuracy ≥ {cfg.train.grok_acc}. The paper's grok step (mean over seeds 42, 137, 2024) applies to "
        "its own setup only (PyTorch-default init, p 97, its optimizer protocol)"
        + ("; this run uses it." if comparable else "; this run differs, so it is not shown."))]
    blocks.append(Table(["op", "grok step", "paper grok step", "final train acc", "final test acc", "final test loss"],
                        [[op, fmt(grok.get(op)), fmt(PAPER["grok_step"].get(op)) if comparable else "—",
                          fmt(final.get(f"train/acc/{op}")), fmt(final.get(f"test/acc/{op}")),
                          fmt(final.get(f"test/loss/{op}"))] for op in cfg.ops], "summary"))
    streams = plots.sed_streams(history)
    if streams:
        last = next(r for r in reversed(history) if any(k.startswith("sed/") for k in r))
        n_sig = max(len(v["sigma"]) for v in streams.values())
        n_gap = max(len(v["gap"]) for v in streams.values())
        blocks.append(Table(["stream", *[f"σ{j}" for j in range(1, n_sig + 1)], *[f"σ{j}/σ{j + 1}" for j in range(1, n_gap + 1)],
                             "overlap"],
                            [[s, *[fmt(last.get(f"sed/{s}/sigma_{j}"), 4) for j in range(1, n_sig + 1)],
                              *[fmt(last.get(f"sed/{s}/gap_{j}")) for j in range(1, n_gap + 1)], fmt(last.get(f"sed/{s}/overlap"))]
                             for s in streams], f"SED at the last eval (step {last['step']})"))
    figs = [figure(run_dir, "grokking.png", figure_dir, "accuracy over training, grok step marked",
                   lambda path: plots.grokking_curves(history, cfg.ops, path, grok, title=f"Grokking {cfg.name}"))]
    if streams:
        figs.append(figure(run_dir, "sed_spectra.png", figure_dir, "SED singular values, gaps and overlap over training",
                           lambda path: plots.sed_spectra(history, path, title=f"SED spectra over training ({cfg.name})")))
    blocks += figs + other_figures(run_dir, figs)
    blocks += [Details("configuration", flatten(config)), Details("summary.json", flatten(summary))]
    panels = Panels(wandb_ids(run_dir), metric_plots(metric_keys(run_dir / "metrics.jsonl")), [],
                    ["figures/grokking"] + (["figures/sed_spectra"] if streams else []))
    return Section(f"Grokking run: {run_dir.name}", "grokking", run_dir, blocks, panels)


def generic_section(run_dir: Path, figure_dir: Path) -> Section:
    """Any other run directory: its configuration (config.json, or the ``config`` of its main JSON file), its
    summary.json, the tables of its Markdown files and every PNG; W&B panels over the runs in it and one level
    below (a grid's cells)."""
    main = next((p for p in (run_dir / "intervention.json", run_dir / "coupling.json") if p.is_file()), None)
    data = load_json(main) if main is not None else {}
    config = load_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else \
        (data.get("config", {}) if isinstance(data, dict) else {})
    blocks: list[Block] = []
    for md in sorted(run_dir.glob("*.md")):
        blocks += markdown_blocks(md.read_text(), shift=2)
    if (run_dir / "summary.json").is_file():
        blocks.append(Details("summary.json", flatten(load_json(run_dir / "summary.json"))))
    blocks += other_figures(run_dir, [])
    blocks.append(Details("configuration", flatten(config)))
    subdirs = [d for d in sorted(run_dir.iterdir()) if d.is_dir()]
    panels = Panels(wandb_ids(run_dir, *subdirs),
                    metric_plots(metric_keys(run_dir / "metrics.jsonl", *(d / "metrics.jsonl" for d in subdirs))),
                    [], [])
    name = main.stem if main is not None else (_experiment(run_dir) or "run")
    return Section(f"{name.capitalize()}: {run_dir.name}", name, run_dir, blocks, panels)


def reproduction_section(run_dir: Path, figure_dir: Path) -> Section:
    """The output directory of ``python -m sed_lens.experiments.reproduce``: its REPRODUCTION.md (the headline
    table beside the paper's, the claims, the discussion, the detailed tables) and the figures it links."""
    text = (run_dir / "REPRODUCTION.md").read_text()
    title, _, body = text.partition("\n") if text.startswith("# ") else ("", "", text)
    blocks = markdown_blocks(body)
    for name, ref in re.findall(r"^!\[([^\]]*)\]\(([^)]+)\)", body, flags=re.M):
        path = run_dir / ref
        if path.is_file():
            blocks.append(Figure(path, name))
    cells = run_dir / "coupling" / "cells"
    runs = sorted(d for d in cells.iterdir() if d.is_dir()) if cells.is_dir() else []
    return Section(title.lstrip("# ").strip() or f"Reproduction: {run_dir.name}", "reproduction", run_dir, blocks,
                   Panels(wandb_ids(*runs), metric_plots(metric_keys(*(d / "metrics.jsonl" for d in runs))), [], []))


register("reproduction", lambda d: (d / "REPRODUCTION.md").is_file() and (d / "reproduction.json").is_file(),
         reproduction_section)
register("intervention", lambda d: (d / "intervention.json").is_file(), generic_section)
register("run", lambda d: (d / "config.json").is_file() or (d / "summary.json").is_file(), generic_section)


# --- rendering ---------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232a;margin:0;background:#f6f7f9}
main{max-width:1120px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.7em;margin:.2em 0}h2{font-size:1.35em;border-bottom:2px solid #dfe3e8;padding-bottom:.25em;margin-top:2em}
h3{font-size:1.1em;margin-top:1.4em}h4{font-size:1em}.meta{color:#5b6570;font-size:.9em}
nav ul{padding-left:1.2em;margin:.3em 0}code{background:#eef1f4;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d5dae0;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#eef1f4}
tr:nth-child(even) td{background:#fafbfc}caption{caption-side:top;text-align:left;font-weight:600;padding:.2em 0}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{color:#5b6570;font-size:.88em}details{margin:.8em 0}summary{cursor:pointer;color:#364049}
"""


def _slug(i: int, run_dir: Path) -> str:
    return f"{i + 1:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '-', run_dir.resolve().name).strip('-') or 'run'}"


def inline_html(text: str) -> str:
    """Escaped ``text`` with Markdown's inline ``**bold**``, ``*italic*`` and ```code``` as HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(?<![*\w])\*([^*\s][^*]*)\*(?![*\w])", r"<em>\1</em>", out)


def render_html(title: str, sections: Sequence[Section], generated: str) -> str:
    """One self-contained HTML page: figures as base64 ``data:`` URIs, inline CSS, only in-page links."""
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{e(title)}</title>\n"
             f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{e(title)}</h1>\n<p class=\"meta\">{e(generated)}</p>\n<nav><ul>"]
    parts += [f"<li><a href=\"#s{i + 1}\">{e(s.title)}</a></li>" for i, s in enumerate(sections)]
    parts.append("</ul></nav>")
    for i, s in enumerate(sections):
        parts.append(f"<section id=\"s{i + 1}\">\n<h2>{e(s.title)}</h2>\n"
                     f"<p class=\"meta\"><code>{e(str(s.directory))}</code> · {e(s.kind)}</p>")
        for b in s.blocks:
            if isinstance(b, Heading):
                parts.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
            elif isinstance(b, Text):
                if b.text.startswith(("- ", "* ")):
                    parts.append(f"<ul><li>{inline_html(b.text[2:])}</li></ul>")
                else:
                    parts.append(f"<p>{inline_html(b.text)}</p>")
            elif isinstance(b, Table):
                cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
                head = "".join(f"<th>{inline_html(c)}</th>" for c in b.columns)
                body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.path.read_bytes()).decode()
                parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(b.caption)}\">"
                             f"<figcaption>{e(b.caption)} — <code>{e(b.path.name)}</code></figcaption></figure>")
            elif isinstance(b, Details):
                rows = "".join(f"<tr><td><code>{e(k)}</code></td><td>{e(v)}</td></tr>" for k, v in b.items)
                parts.append(f"<details><summary>{e(b.title)}</summary><table><tbody>{rows}</tbody></table></details>")
        parts.append("</section>")
    parts.append("</main>\n</body>\n</html>\n")
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown_blocks(blocks: Sequence[Block], figure_ref: Callable[[Figure], str] | None) -> str:
    """Markdown of ``blocks``; figures as links from ``figure_ref`` (left out when it is None)."""
    parts: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Text):
            parts.append(b.text)
        elif isinstance(b, Table):
            parts.append((f"**{b.caption}**\n\n" if b.caption else "") + markdown_table(b.columns, b.rows))
        elif isinstance(b, Figure):
            if figure_ref is not None:
                parts.append(f"![{b.caption}]({figure_ref(b)})\n\n*{b.caption}*")
        elif isinstance(b, Details):
            parts.append(f"<details><summary>{b.title}</summary>\n\n{markdown_table(['key', 'value'], [[f'`{k}`', v] for k, v in b.items])}"
                         "\n\n</details>")
    return "\n\n".join(parts)


def render_markdown(title: str, sections: Sequence[Section], generated: str, out: Path, slugs: Sequence[str]) -> str:
    """The Markdown report; every figure is copied to ``out/figures/SLUG/`` (if not already there) and linked."""
    parts = [f"# {title}", f"*{generated}*", "\n".join(f"- [{s.title}](#{_anchor(s.title)})" for s in sections)]
    for s, slug in zip(sections, slugs, strict=True):
        fig_dir = out / "figures" / slug

        def ref(f: Figure, fig_dir: Path = fig_dir) -> str:
            dest = fig_dir / f.path.name
            if f.path.resolve() != dest.resolve():
                fig_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f.path, dest)
            return dest.relative_to(out).as_posix()

        parts += [f"## {s.title}", f"`{s.directory}` · {s.kind}", render_markdown_blocks(s.blocks, ref)]
    return "\n\n".join(parts) + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def parse_wandb_spec(spec: str) -> tuple[str, str]:
    """``"ENTITY/PROJECT"`` → (entity, project)."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)", spec.strip())
    check(m is not None, f"--wandb must be ENTITY/PROJECT (e.g. my-team/sed-lens), got {spec!r}.")
    assert m is not None
    return m[1], m[2]


def wandb_report(title: str, sections: Sequence[Section], entity: str, project: str, generated: str) -> Any:
    """The report as a ``wandb_workspaces.reports.v2.Report`` (not saved): per section a heading, the text and
    tables as Markdown, and a panel grid over the section's runs in ENTITY/PROJECT — line plots of the logged
    metrics, the logged tables, and the logged figures."""
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError:
        raise SedLensError("--wandb needs wandb-workspaces: pip install wandb-workspaces.") from None
    blocks: list[Any] = [wr.TableOfContents(), wr.P(f"{generated}. Runs are matched by the W&B run ids in their "
                                                    f"run.json; sync offline runs with wandb sync first.")]
    for s in sections:
        blocks.append(wr.H1(s.title))
        text = render_markdown_blocks([b for b in s.blocks if not isinstance(b, Figure)], None)
        blocks.append(wr.MarkdownBlock(f"`{s.directory}` · {s.kind}\n\n{text}"))
        p = s.panels
        if not p.run_ids:
            blocks.append(wr.P("No W&B run is recorded in this directory (run.json), so there are no panels."))
            continue
        panels: list[Any] = [wr.LinePlot(title=lp.title, x=lp.x, y=list(lp.y), log_y=lp.log_y or None) for lp in p.line_plots]
        panels += [wr.WeavePanelSummaryTable(table_name=t) for t in p.tables]
        if p.images:
            panels.append(wr.MediaBrowser(title="figures", media_keys=list(p.images)))
        runset = wr.Runset(entity=entity, project=project, name=s.title[:100],
                           filters=expr.And(expr.Metric("ID").isin(list(p.run_ids))))
        blocks.append(wr.PanelGrid(runsets=[runset], panels=panels))
    return wr.Report(project=project, entity=entity, title=title, description=generated, blocks=blocks)


# --- building a report -------------------------------------------------------------------------------------


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


@dataclass
class ReportConfig:
    """``python -m sed_lens.report``."""

    run_dirs: tuple[str, ...] = field(default=(), metadata={"cli": False})
    out: str = field(default="report", metadata={"help": "output directory: report.html, report.md, figures/"})
    title: str = field(default="sed_lens report", metadata={"help": "report title"})
    wandb: str | None = field(default=None, metadata={
        "help": "also build a W&B Report in this W&B project (the one the runs were synced to)", "metavar": "ENTITY/PROJECT"})
    wandb_save: bool = field(default=False, metadata={"help": "save the W&B Report (needs a network and a W&B API key)"})


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser_for(ReportConfig, "python -m sed_lens.report", __doc__ or "")
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories and experiment output directories")
    cfg = config_from_args(ReportConfig, ap.parse_args(argv))
    check(cfg.wandb is not None or not cfg.wandb_save, "--wandb-save needs --wandb ENTITY/PROJECT.")
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
