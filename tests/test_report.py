"""Reports (HTML, Markdown, W&B Report object) of grokking, coupling and intervention directories; the SED plot."""

import ast
import base64
import json
import re
import shutil
import sys
import types
from dataclasses import asdict
from pathlib import Path

import pytest
from cli_helpers import call_main

from sed_lens import plots, rendering, report
from sed_lens.cli import run_cli
from sed_lens.errors import SedLensError
from sed_lens.experiments import coupling as coupling_exp
from sed_lens.experiments import grokking, reproduction_report
from sed_lens.experiments import intervention as intervention_exp

IMG = '<img src="data:image/png;base64,'
REMOTE = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:[a-z]+:)?//|url\(|@import|<script|<link|<iframe""", re.I)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A grokking run with SED, a coupling experiment OUT (one run, window ablation) and an intervention-like OUT."""
    root = tmp_path_factory.mktemp("runs")
    g = root / "grok"
    assert run_cli(grokking.main, ["--p", "7", "--steps", "15", "--eval-every", "5", "--sed", "update,gradient",
                                   "--sed-window", "3", "--sed-k", "2", "--sed-every", "5", "--run-dir", str(g),
                                   "--wandb-mode", "disabled", "--no-progress", "--checkpoint-every", "0"]) == 0
    c = root / "coupling"
    assert run_cli(coupling_exp.main, ["--p", "7", "--ops", "add", "--seeds", "1", "--steps", "20", "--every", "4",
                                       "--n-snapshots", "3", "--window", "2", "--k", "1", "--n-probes", "8",
                                       "--n-random", "3", "--eval-every", "10", "--window-ablation", "--out", str(c),
                                       "--wandb-mode", "disabled", "--no-progress", "--workers", "1"]) == 0
    i = root / "intervention"
    i.mkdir()
    cfg = intervention_exp.InterventionConfig(op="add", seeds=(1, 2), conditions=("A", "C"))
    iv_runs = [{"condition": c, "seed": s, "grok_step": g, "steps": 40, "run_dir": str(i / f"{c}-s{s}"),
                "curve": {"step": [0, 20, 40], "test_acc": [0.1, 0.5, 1.0]}}
               for c, s, g in (("A", 1, 30), ("A", 2, 30), ("C", 1, 15), ("C", 2, 10))]
    result = {"config": asdict(cfg), "warmup": 20, "runs": iv_runs, "paper": {},
              "conditions": intervention_exp.aggregate(iv_runs, cfg.conditions)}
    (i / "intervention.json").write_text(json.dumps(result))
    (i / "intervention.md").write_text(intervention_exp.result_markdown(result))
    plots.ablation([1, 2], [3.0, 4.0], i / "accuracy.png", "step", "accuracy")
    plots.ablation([1, 2], [5.0, 6.0], i / "speedup.png", "condition", "speedup")
    return {"grok": g, "coupling": c, "cell": c / "cells" / "add-s1", "intervention": i}


def pngs(*dirs):
    return [p for d in dirs for p in sorted(d.glob("*.png"))]


def test_html_report_embeds_every_figure_and_the_summary_tables_with_no_remote_resource(runs, tmp_path):
    dirs = [runs["grok"], runs["coupling"], runs["cell"], runs["intervention"]]
    res = report.build_report(dirs, tmp_path / "rep", title="My runs")
    assert [s.kind for s in res.sections] == ["grokking", "coupling", "coupling-run", "intervention"]
    page = res.html.read_text()
    expected = pngs(*dirs)
    assert len(expected) == 2 + 2 + 1 + 2 and page.count(IMG) == len(expected)
    embedded = {base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', page)}
    assert embedded == {p.read_bytes() for p in expected}  # each figure, as the run directory holds it
    assert not REMOTE.search(page) and "<style>" in page and "<title>My runs</title>" in page
    # the summary tables, ours beside the paper's
    agg = json.loads((runs["coupling"] / "coupling.json").read_text())["aggregate"]
    assert f"<td>{agg['single']['add-s1']['gradient_peak']:.1f}</td>" in page
    assert "<th>paper</th>" in page and "<td>648</td>" in page and "<td>212</td>" in page  # window ablation
    summary = json.loads((runs["grok"] / "summary.json").read_text())
    assert "<th>paper grok step</th>" in page and f"<td>{summary['final']['test/acc/add']:.3f}</td>" in page
    assert "<th>σ1/σ2</th>" in page  # SED spectrum table of the grokking run
    cell = json.loads((runs["cell"] / "coupling.json").read_text())["summary"]["add"]["gradient/leading"]
    assert f"<td>{report.fmt(cell['peak_R_mean'])}</td>" in page and "peak R̄ 100–330" in page
    assert ("<td>A control</td><td>30 ± 0 (30–30)</td><td>1.00× (1.00–1.00)</td><td>3358</td><td>1.00×</td>" in page
            and "<td>C keep SED</td><td>12 ± 4 (10–15)</td><td>2.40× (2.00–3.00)</td><td>1525</td>" in page)
    assert page.count("<details>") >= 4  # every section shows its configuration


def test_markdown_report_links_figures_copied_next_to_it(runs, tmp_path):
    dirs = [runs["grok"], runs["cell"], runs["intervention"]]
    out = tmp_path / "rep"
    res = report.build_report(dirs, out)
    md = res.markdown.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(pngs(*dirs))
    assert all(not link.startswith(("http:", "https:", "/")) and (out / link).is_file() for link in links)
    assert sorted((out / link).read_bytes() for link in links) == sorted(p.read_bytes() for p in pngs(*dirs))
    assert "| op | grok step | paper grok step |" in md and "| op | SED stream | peak R̄ |" in md
    assert "https://" not in md and "http://" not in md
    assert "- [Grokking run: grok](#grokking-run-grok)" in md


def test_missing_figures_are_regenerated_from_the_data_without_touching_the_run(runs, tmp_path):
    g, c = tmp_path / "grok", tmp_path / "coupling"
    shutil.copytree(runs["grok"], g)
    shutil.copytree(runs["coupling"], c)
    for f in (g / "grokking.png", g / "sed_spectra.png", c / "coupling_single.png"):
        f.unlink()
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    res = report.build_report([g, c], tmp_path / "rep")
    figs = [b for s in res.sections for b in s.blocks if isinstance(b, report.Figure)]
    regenerated = [f for f in figs if "regenerated" in f.caption]
    assert sorted(f.path.name for f in regenerated) == ["coupling_single.png", "grokking.png", "sed_spectra.png"]
    assert all(f.path.is_relative_to(tmp_path / "rep" / "figures") for f in regenerated)
    assert res.html.read_text().count(IMG) == len(figs) == 3 + 1  # + window_ablation.png kept from the run
    after = sorted(p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(tmp_path / "rep"))
    assert after == before  # the run directories are read, never written


def test_the_wandb_report_object_has_the_sections_panels_and_tables(runs, tmp_path):
    import wandb_workspaces.reports.v2 as wr

    res = report.build_report([runs["grok"], runs["coupling"], runs["cell"]], tmp_path / "rep", title="T",
                              wandb="my-team/sed-lens")
    r = res.wandb
    assert isinstance(r, wr.Report) and (r.entity, r.project, r.title) == ("my-team", "sed-lens", "T")
    kinds = [type(b).__name__ for b in r.blocks]
    assert kinds == ["TableOfContents", "P"] + ["H1", "MarkdownBlock", "PanelGrid"] * 3
    grids = [b for b in r.blocks if isinstance(b, wr.PanelGrid)]
    ids = [json.loads((d / "run.json").read_text())["wandb_id"] for d in (runs["grok"], runs["cell"])]
    assert ids[0] in grids[0].runsets[0].filters and ids[1] in grids[1].runsets[0].filters
    assert ids[1] in grids[2].runsets[0].filters
    assert all(g.runsets[0].entity == "my-team" and g.runsets[0].project == "sed-lens" for g in grids)

    def panels(grid, cls):
        return [p for p in grid.panels if isinstance(p, cls)]

    acc = [p for p in panels(grids[0], wr.LinePlot) if "test/acc/add" in p.y]
    assert acc and "train/acc/add" in acc[0].y
    assert any(p.y == ["sed/gradient/sigma_1", "sed/gradient/sigma_2", "sed/gradient/sigma_3"] and p.log_y
               for p in panels(grids[0], wr.LinePlot))
    assert panels(grids[0], wr.MediaBrowser)[0].media_keys == ["figures/grokking", "figures/sed_spectra"]
    assert {p.table_name for p in panels(grids[1], wr.WeavePanelSummaryTable)} >= {
        "coupling/summary/single", "coupling/summary/window_ablation", "coupling/R"}
    assert [p.table_name for p in panels(grids[2], wr.WeavePanelSummaryTable)] == ["coupling/R"]
    [r_bar] = [p for p in panels(grids[2], wr.LinePlot) if p.x == "coupling/step"]
    assert "coupling/add/gradient/leading/R_mean" in r_bar.y and r_bar.log_y
    assert not any("W=" in y for y in r_bar.y)  # ablation variants are tables, not metrics
    md = r.blocks[3].text
    assert "| op | grok step | paper grok step |" in md  # the same tables as the local report
    assert "coupling/summary" not in md


def call(argv, capsys):
    """Run the report CLI in-process; returns (exit code, stdout, stderr)."""
    return call_main(report.main, argv, capsys, "report")


def test_cli_writes_the_reports_and_saving_to_wandb_fails_in_one_line(runs, tmp_path, capsys, monkeypatch):
    import wandb_workspaces.reports.v2 as wr

    out = tmp_path / "rep"
    code, stdout, err = call([str(runs["grok"]), "--out", str(out), "--wandb", "me/proj"], capsys)
    assert code == 0, err
    assert (out / "report.html").is_file() and (out / "report.md").is_file() and "--wandb-save" in stdout

    def no_network(self, *a, **k):
        raise ConnectionError("Max retries exceeded with url: /graphql\nmore detail")

    monkeypatch.setattr(wr.Report, "save", no_network)
    code, _, err = call([str(runs["grok"]), "--out", str(tmp_path / "rep2"), "--wandb", "me/proj", "--wandb-save"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "could not save the W&B report to me/proj (ConnectionError: Max retries" in err
    assert (tmp_path / "rep2" / "report.html").is_file()  # the local report is written first


def test_help(capsys):
    code, out, _ = call(["--help"], capsys)
    assert code == 0 and "RUN_DIR" in out and "--wandb ENTITY/PROJECT" in out and "--out" in out


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"), ("file", "is not a directory"), ("empty", "is not a run directory"),
    ("bad-json", "is not valid JSON"), ("out-under-file", "cannot write the report"),
    ("bad-wandb", "must be ENTITY/PROJECT"), ("save-without-wandb", "--wandb-save needs --wandb"),
    ("no-run-dir", "required: RUN_DIR")])
def test_cli_errors_are_one_line_and_exit_2(case, match, runs, tmp_path, capsys):
    run_dir, extra, out = runs["grok"], [], tmp_path / "rep"
    if case == "missing":
        run_dir = tmp_path / "nowhere"
    elif case == "file":
        run_dir = tmp_path / "f.txt"
        run_dir.write_text("x")
    elif case == "empty":
        run_dir = tmp_path / "empty"
        run_dir.mkdir()
    elif case == "bad-json":
        run_dir = tmp_path / "bad"
        run_dir.mkdir()
        (run_dir / "config.json").write_text("{not json")
    elif case == "out-under-file":
        (tmp_path / "blocker").write_text("")
        out = tmp_path / "blocker" / "rep"
    elif case == "bad-wandb":
        extra = ["--wandb", "just-a-project"]
    elif case == "save-without-wandb":
        extra = ["--wandb-save"]
    argv = ([] if case == "no-run-dir" else [str(run_dir)]) + ["--out", str(out), *extra]
    code, _, err = call(argv, capsys)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing is written for a bad input


def test_a_new_kind_of_directory_is_one_function(tmp_path):
    d = tmp_path / "custom"
    d.mkdir()
    (d / "custom.json").write_text(json.dumps({"answer": 42}))

    def render(run_dir, figure_dir):
        data = report.load_json(run_dir / "custom.json")
        return report.Section("Custom", "custom", run_dir, [report.Table(["answer"], [[str(data["answer"])]])],
                              report.Panels())

    report.register("custom", lambda p: (p / "custom.json").is_file(), render)
    try:
        with pytest.raises(SedLensError, match="already registered"):
            report.register("custom", lambda p: False, render)
        res = report.build_report([d], tmp_path / "rep")
        assert res.sections[0].kind == "custom" and "<td>42</td>" in res.html.read_text()
    finally:
        report.KINDS[:] = [k for k in report.KINDS if k.name != "custom"]


def test_list_items_and_inline_markup_become_html_and_code_is_shown_as_it_is():
    assert rendering.html_block(rendering.Text("- **one** item")) == "<ul><li><strong>one</strong> item</li></ul>"
    # CommonMark's rules (what GitHub shows for the Markdown report): 2*3*4 is an emphasis there too
    assert rendering.inline_html("**b** *i* `c<d` 2*3*4 a*b") == "<strong>b</strong> <em>i</em> <code>c&lt;d</code> 2<em>3</em>4 a*b"
    assert rendering.inline_html("R < 1 & <script>x</script> [doc](a.md)") == (
        'R &lt; 1 &amp; &lt;script&gt;x&lt;/script&gt; <a href="a.md">doc</a>')
    code = rendering.Code("| a |\n```x```\n", "notes.md")
    assert rendering.html_block(code) == '<p class="meta">notes.md</p><pre><code>| a |\n```x```</code></pre>'
    assert rendering.render_markdown_blocks([code], None) == "**notes.md**\n\n````\n| a |\n```x```\n````"


def test_report_imports_no_experiment_and_a_new_experiment_needs_no_edit_of_it(tmp_path, monkeypatch):
    tree = ast.parse(Path(report.__file__).read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    assert not any(m and m.startswith("sed_lens.experiments") for m in imported), imported
    toy = types.ModuleType("sed_lens.experiments.toy")
    toy.detects = lambda d: (d / "toy.json").is_file()
    toy.report_section = lambda d, figure_dir: rendering.Section(
        "Toy", "toy", d, [rendering.Table(["answer"], [[str(report.load_json(d / "toy.json")["answer"])]])],
        rendering.Panels())
    monkeypatch.setitem(sys.modules, "sed_lens.experiments.toy", toy)
    d = tmp_path / "toy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"experiment": "toy"}))
    (d / "toy.json").write_text(json.dumps({"answer": 42}))
    other = tmp_path / "other"  # an experiment sed_lens does not know: the generic section, its files as they are
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"experiment": "elsewhere", "lr": 0.5}))
    (other / "notes.md").write_text("| not | parsed |\n")
    res = report.build_report([d, other], tmp_path / "rep")
    assert [s.kind for s in res.sections] == ["toy", "elsewhere"]
    page = res.html.read_text()
    assert "<td>42</td>" in page and "<pre><code>| not | parsed |</code></pre>" in page and "<td>0.5</td>" in page


def test_a_reproduction_directory_is_reported_from_its_results_not_its_markdown(tmp_path):
    from test_reproduction_report import coupling_cell, intervention_cell

    out = tmp_path / "repro"
    kept = out / "results"
    cells = {"coupling/cells/add-s42": coupling_cell("add", 42, 120.0, 8.0, 260.0),
             "intervention/add-gradient/A-s42": intervention_cell("add", 42, "A", "gradient", 3000),
             "intervention/add-gradient/C-s42": intervention_cell("add", 42, "C", "gradient", 1000)}
    for name, data in cells.items():
        (kept / name).parent.mkdir(parents=True, exist_ok=True)
        (kept / f"{name}.json").write_text(json.dumps(data))
    meta = {"source": str(kept), "report": str(out / "REPRODUCTION.md")}
    md, _ = reproduction_report.write_report(kept, out / "REPRODUCTION.md", meta)
    (out / "reproduction.json").write_text(json.dumps({"meta": meta, "report": [str(md)], "claims": {}}))
    text = md.read_text()
    md.write_text("# Not read\n")  # the section is built from the results, not from the Markdown
    res = report.build_report([out], tmp_path / "rep")
    sec = res.sections[0]
    assert sec.kind == "reproduction" and sec.title == "Reproducing Xu (2026) with sed_lens"
    linked = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    figs = [b for b in sec.blocks if isinstance(b, rendering.Figure)]
    assert len(linked) == 2 and [f.path.resolve() for f in figs] == [(out / link).resolve() for link in linked]
    ref = lambda f: f.path.resolve().relative_to(out.resolve()).as_posix()
    assert rendering.render_markdown_blocks(sec.blocks, ref) + "\n" == text.split("\n\n", 1)[1]  # the same report
    page = res.html.read_text()
    assert "single-task gradient-SED peak R̄, exact" in page and "<ul><li><strong>" in page
    assert page.count(IMG) == len(linked)
    shutil.rmtree(out / "reproduction")  # figures the directory lacks are drawn from the results
    again = report.build_report([out], tmp_path / "rep2").sections[0]
    redrawn = [b for b in again.blocks if isinstance(b, rendering.Figure)]
    assert len(redrawn) == 2 and all(f.caption.endswith("(regenerated from the results)") and
                                     f.path.is_relative_to(tmp_path / "rep2" / "figures") for f in redrawn)


def test_sed_spectra_plots_every_stream_and_refuses_metrics_without_sed(tmp_path):
    history = [{"step": s, "sed/gradient/sigma_1": 2.0 + s, "sed/gradient/sigma_2": 1.0, "sed/gradient/gap_1": 2.0 + s,
                "sed/task_gradient/add/sigma_1": 1.0, "sed/task_gradient/add/gap_1": None,
                "sed/gradient/overlap": 0.5} for s in (0, 25, 50)]
    assert plots.sed_streams(history) == {"gradient": {"sigma": [1, 2], "gap": [1]},
                                          "task_gradient/add": {"sigma": [1], "gap": [1]}}
    path = plots.sed_spectra(history, tmp_path / "s.png")
    assert path.is_file() and path.stat().st_size > 10_000
    with pytest.raises(SedLensError, match="train with --sed"):
        plots.sed_spectra([{"step": 0, "test/acc/add": 1.0}], tmp_path / "x.png")


def test_fmt_never_rounds_a_small_value_to_zero():
    assert report.fmt(1.23e-5, 4) == "1.23e-05" and report.fmt(0.5) == "0.500" and report.fmt(0.0) == "0.000"
    assert report.fmt(123.456) == "123.5" and report.fmt(7) == "7" and report.fmt(True) == "True"
    assert report.fmt(float("nan")) == "—" and report.fmt(None) == "—" and report.fmt(float("inf")) == "—"
