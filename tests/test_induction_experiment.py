"""The induction experiment: CLI, the aggregation, and a tiny end-to-end run with its report section."""

import json

import pytest
from cli_helpers import call_main

from sed_lens.experiments import induction
from sed_lens.experiments.induction import aggregate, cell_name

# Tiny: vocab 16, repeats of 2–4 tokens in 13-token sequences, 40 steps; every piece runs, nothing need converge.
TINY = ["--seeds", "0", "--vocab", "16", "--half-len", "4", "--n-eval", "16", "--steps", "40", "--batch-size", "8",
        "--lr", "3e-3", "--eval-every", "10", "--sed-every", "5", "--sed-window", "4", "--sed-k", "2",
        "--grad-batch", "16", "--n-snapshots", "4", "--n-probes", "8", "--n-random", "4", "--window", "4", "--k", "2",
        "--workers", "1", "--wandb-mode", "disabled", "--no-progress"]


def call(argv, capsys):
    return call_main(induction.main, argv, capsys, "induction")


def test_help(capsys):
    code, out, _ = call(["--help"], capsys)
    assert code == 0
    for flag in ("--seeds", "--vocab", "--half-len", "--min-len", "--pad", "--steps", "--lr", "--batch-size",
                 "--eval-every", "--sed-window", "--sed-k", "--n-snapshots", "--conditions", "--k", "--out",
                 "--wandb-mode", "--workers"):
        assert flag in out


@pytest.mark.parametrize("argv", [["--bogus"], ["--seeds", "1,1"], ["--seeds", "a"], ["--seeds", "-1"],
                                  ["--k", "0"], ["--window", "2", "--k", "3"], ["--conditions", "A,F"],
                                  ["--conditions", "B,B"], ["--sed-k", "5", "--sed-window", "4"], ["--steps", "0"],
                                  ["--n-snapshots", "1"], ["--preset", "xu2026"], ["--half-len", "1"],
                                  ["--vocab", "8"], ["--min-len", "20"], ["--wandb-mode", "loud"], ["--workers", "0"]])
def test_bad_inputs_give_one_line_and_exit_2(argv, capsys, tmp_path):
    code, _, err = call([*argv, "--out", str(tmp_path / "o"), "--wandb-mode", "disabled"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # rejected before any run starts


def _main(seed, pc, phases):
    return {"seed": seed, "phase_change": pc, "steps": 1000,
            "coupling": {"summary": {"gradient/leading": {"phase_median_R_mean": phases[0], "peak_R_mean": 9.0, "peak_step": 500},
                                     "update/leading": {"phase_median_R_mean": phases[1], "peak_R_mean": 2.0, "peak_step": 100}}}}


def test_aggregate_phase_medians_ratios_and_delays():
    mains = [_main(1, 400, ({"pre": 4.0, "transition": 10.0, "post": 2.0}, {"pre": 2.0, "transition": 2.0, "post": 1.0})),
             _main(2, 600, ({"pre": 6.0, "transition": 30.0, "post": None}, {"pre": 3.0, "transition": 5.0, "post": None}))]
    projected = [{"condition": "B", "seed": 1, "phase_change": 500, "steps": 500},
                 {"condition": "B", "seed": 2, "phase_change": None, "steps": 1000}]
    out = aggregate(mains, projected, ["A", "B"], steps=1000)
    assert out["phase_change"] == {1: 400, 2: 600}
    g = out["coupling"]["gradient/leading"]["phase_median"]
    assert g["transition"]["median"] == 20.0 and g["post"]["n"] == 1 and g["pre"]["min"] == 4.0
    r = out["gradient_over_update"]["leading"]
    assert r["pre"]["median"] == 2.0 and r["transition"]["min"] == 5.0 and r["transition"]["max"] == 6.0
    assert out["coupling"]["gradient/trailing"]["phase_median"]["pre"]["n"] == 0
    a, b = out["conditions"]["A"], out["conditions"]["B"]
    assert a["phase_change"] == [400, 600] and a["delay_per_seed"] == [0, 0]
    assert b["phase_change"] == [500, 1000] and b["censored"] == 1 and b["delay_per_seed"] == [100, 400]
    assert b["delay"]["median"] == 250


def test_tiny_run_writes_json_markdown_figures_and_a_report_section(tmp_path, capsys):
    from sed_lens.report import build_report

    out = tmp_path / "ind"
    code, stdout, err = call([*TINY, "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads((out / "induction.json").read_text())
    assert result["format"] == "sed_lens.induction/1" and result["task"]["n_ctx"] == 13
    (m,) = result["runs"]["main"]
    assert {p["condition"] for p in result["runs"]["projected"]} == {"B", "D"}
    assert m["curves"]["step"] == [0, 10, 20, 30, 40] and set(m["curves"]["induction"]) == {
        f"L{layer}H{h}" for layer in range(2) for h in range(4)}
    assert set(m["coupling"]["R_mean"]) >= {"gradient/leading", "update/leading", "gradient/trailing", "update/trailing"}
    assert len(m["coupling"]["steps"]) == 4
    assert all(v > 0 for v in m["coupling"]["R_mean"]["gradient/leading"])
    shares = m["head_view"]["gradient"]["final"]
    assert len(shares) == 8 and sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert m["heads"]["prev_token_head"].startswith("L0") and m["heads"]["induction_head"].startswith("L1")
    assert set(result["aggregate"]["conditions"]) == {"A", "B", "D"}
    for name in ("losses", "head_scores", "coupling", "intervention"):
        assert (out / f"{name}.png").stat().st_size > 1000
    md = (out / "induction.md").read_text()
    assert "gradient / update R̄" in md and "remove SED" in md
    assert "induction.json" in stdout and (out / cell_name("B", 0) / "cell.json").is_file()
    assert induction.detects(out) and not induction.detects(out / "s0")
    # a rerun skips every finished run and rewrites the same results
    code, _, err = call([*TINY, "--out", str(out)], capsys)
    again = json.loads((out / "induction.json").read_text())
    assert code == 0 and all(r["skipped"] for r in again["runs"]["main"] + again["runs"]["projected"])
    assert again["aggregate"] == result["aggregate"]
    # the report section, figures redrawn from the results when the directory lacks them
    (out / "coupling.png").unlink()
    report = build_report([out], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Induction: ind" in text and "regenerated" in text
    assert report is not None
