"""Documents built from data, rendered to Markdown, to one self-contained HTML page and to a W&B Report.

A document is a list of blocks — :class:`Heading`, :class:`Text`, :class:`Table`, :class:`Figure`,
:class:`Details`, :class:`Code` — grouped into :class:`Section` s. Whoever has the numbers builds the blocks
(an experiment builds its own report section); the renderers here turn them into Markdown, HTML (figures
embedded as base64 PNG, inline CSS, no scripts, no remote resources) or a ``wandb_workspaces`` Report. Nothing
is rendered to Markdown and parsed back. This module knows nothing of any experiment; the helpers at the end
(:func:`fmt`, :func:`flatten`, :func:`figure`, :func:`metric_plots`, …) are what sections are commonly built from.

A :class:`Text` is one paragraph and may use Markdown's inline ``**bold**``, ``*italic*`` and ```code```; one
that starts with ``- `` is a list item.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from sed_lens.errors import SedLensError
from sed_lens.tracking import read_jsonl

# --- what a document is made of ----------------------------------------------------------------------------


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


@dataclass
class Code:
    """Text shown as it is, in a monospaced block (e.g. a file of a run directory nothing else knows)."""

    text: str
    caption: str = ""


Block = Heading | Text | Table | Figure | Details | Code


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


# --- Markdown ----------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table (``|`` in a cell escaped, newlines to spaces)."""
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


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
        elif isinstance(b, Code):
            fence = _fence(b.text)
            parts.append((f"**{b.caption}**\n\n" if b.caption else "") + f"{fence}\n{b.text.rstrip()}\n{fence}")
    return "\n\n".join(parts)


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def render_markdown(title: str, sections: Sequence[Section], generated: str, out: Path, slugs: Sequence[str]) -> str:
    """The Markdown document; every figure is copied to ``out/figures/SLUG/`` (if not already there) and linked."""
    parts = [f"# {title}", f"*{generated}*", "\n".join(f"- [{s.title}](#{anchor(s.title)})" for s in sections)]
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


# --- HTML --------------------------------------------------------------------------------------------------

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


def inline_html(text: str) -> str:
    """``text`` — the inline Markdown of a Text block or table cell — as HTML, rendered by markdown-it-py (the
    CommonMark reference rules, so the HTML page shows what GitHub shows for the Markdown report; raw HTML in the
    text is escaped, never passed through)."""
    return _MARKDOWN.renderInline(text)


_MARKDOWN = MarkdownIt("commonmark", {"html": False})


def html_block(b: Block) -> str:
    """One block as HTML (a figure embedded as a base64 ``data:`` URI)."""
    e = html.escape
    if isinstance(b, Heading):
        return f"<h{b.level}>{e(b.text)}</h{b.level}>"
    if isinstance(b, Text):
        if b.text.startswith(("- ", "* ")):
            return f"<ul><li>{inline_html(b.text[2:])}</li></ul>"
        return f"<p>{inline_html(b.text)}</p>"
    if isinstance(b, Table):
        cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
        head = "".join(f"<th>{inline_html(c)}</th>" for c in b.columns)
        body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in r) + "</tr>" for r in b.rows)
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(b, Figure):
        data = base64.b64encode(b.path.read_bytes()).decode()
        return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(b.caption)}\">"
                f"<figcaption>{e(b.caption)} — <code>{e(b.path.name)}</code></figcaption></figure>")
    if isinstance(b, Details):
        rows = "".join(f"<tr><td><code>{e(k)}</code></td><td>{e(v)}</td></tr>" for k, v in b.items)
        return f"<details><summary>{e(b.title)}</summary><table><tbody>{rows}</tbody></table></details>"
    cap = f"<p class=\"meta\">{e(b.caption)}</p>" if b.caption else ""
    return f"{cap}<pre><code>{e(b.text.rstrip())}</code></pre>"


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
        parts += [html_block(b) for b in s.blocks]
        parts.append("</section>")
    parts.append("</main>\n</body>\n</html>\n")
    return "\n".join(parts)


# --- W&B ---------------------------------------------------------------------------------------------------


def wandb_report(title: str, sections: Sequence[Section], entity: str, project: str, generated: str) -> Any:
    """The document as a ``wandb_workspaces.reports.v2.Report`` (not saved): per section a heading, the text and
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


# --- what sections are built from --------------------------------------------------------------------------


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


def fixed(x: float | None, digits: int = 1) -> str:
    """A number to a fixed count of decimals; ``None``/NaN/inf → "—" (the report tables' uniform columns)."""
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


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
    """Line plots of the standard metric families present in ``keys``: accuracy, loss, and per SED stream the
    singular values, gaps and basis overlap."""
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
