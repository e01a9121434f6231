"""The bad-input corpus: every CLI turns a bad invocation into one stderr line and exit 2 (no traceback), and
every API call turns a bad argument into a SedLensError (a ValueError) whose message is one clear sentence."""

import pytest
import torch

from sed_lens.analysis.centroids import centroids
from sed_lens.analysis.coupling import centroid_response, coupling
from sed_lens.analysis.sed import RollingSED, window_bounds
from sed_lens.cli import run_cli
from sed_lens.errors import SedLensError
from sed_lens.experiments import coupling as coupling_exp
from sed_lens.experiments import grokking, intervention, reproduce
from sed_lens.grid import Cell, run_grid
from sed_lens.hooks.capture import GradientCapture
from sed_lens.hooks.interventions import SubspaceProjection
from sed_lens.models import build_model, set_readout
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic, register_op
from sed_lens.tracking import Run
from sed_lens.training import TrainConfig, Trainer

MAINS = {"grokking": grokking.main, "coupling": coupling_exp.main, "intervention": intervention.main,
         "reproduce": reproduce.main}

CLI_CASES = [
    ("grokking", ["--op", "pow"]), ("grokking", ["--preset", "gpt2"]), ("grokking", ["--p", "1"]),
    ("grokking", ["--p", "seven"]), ("grokking", ["--p", "7.5"]), ("grokking", ["--train-frac", "0"]),
    ("grokking", ["--train-frac", "1.2"]), ("grokking", ["--init", "xavier"]), ("grokking", ["--steps", "-1"]),
    ("grokking", ["--batch-size", "0"]), ("grokking", ["--lr", "0"]), ("grokking", ["--wandb-mode", "sometimes"]),
    ("grokking", ["--sed", "updates"]), ("grokking", ["--sed", "gradient", "--sed-window", "2", "--sed-k", "3"]),
    ("grokking", ["--sed", "gradient", "--sed-k", "0"]), ("grokking", ["--resume", "/nonexistent/run"]),
    ("grokking", ["--nonsense"]), ("grokking", ["--run-dir", "/proc/sed_lens_cannot_write_here"]),
    ("grokking", ["--preset", "nanda2023", "--ops", "mul,mul"]),
    ("coupling", ["--ops", "pow"]), ("coupling", ["--method", "exact"]), ("coupling", ["--eps-rel", "0"]),
    ("coupling", ["--window", "2", "--k", "3"]), ("coupling", ["--readout", "max_logit"]),
    ("coupling", ["--aligns", "centred"]), ("coupling", ["--from-run", "/nonexistent/run"]),
    ("coupling", ["--no-single"]), ("coupling", ["--backend", "slurm"]), ("coupling", ["--workers", "0"]),
    ("coupling", ["--n-random", "0"]),
    ("intervention", ["--conditions", "A,F"]), ("intervention", ["--method", "weights"]), ("intervention", ["--k", "0"]),
    ("intervention", ["--op", "pow"]),
    ("reproduce", ["--backend", "slurm"]), ("reproduce", ["--workers", "0"]), ("reproduce", ["--quick", "yes"]),
]


@pytest.mark.parametrize("name,argv", CLI_CASES, ids=[f"{n}:{' '.join(a)}" for n, a in CLI_CASES])
def test_bad_cli_invocations(name, argv, capsys, tmp_path):
    extra = [] if any(a in ("--run-dir", "--resume", "--from-run") for a in argv) else \
        (["--run-dir", str(tmp_path / "r")] if name == "grokking" else ["--out", str(tmp_path / "o")])
    if name == "grokking" and "--resume" in argv:
        extra = []
    try:
        code = run_cli(MAINS[name], [*argv, *extra, "--wandb-mode", "disabled"] if "--wandb-mode" not in argv
                       and name != "reproduce" else [*argv, *extra], prog=name)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "error" in err


@pytest.fixture(scope="module")
def paper_model():
    task = ModularArithmetic(p=13)
    return task, build_model("xu2026", task)


def api_cases(paper_model, tmp_path):
    task, model = paper_model
    S = ParamSubspace.attention(model)
    probes = task.probes(4)
    d = S.random_directions(1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    return [
        lambda: ModularArithmetic(p=1),
        lambda: ModularArithmetic(p=5.5),
        lambda: ModularArithmetic(ops=("pow",)),
        lambda: ModularArithmetic(train_frac=1.0),
        lambda: ModularArithmetic(train_frac=-0.1),
        lambda: ModularArithmetic(layout="=ab"),
        lambda: register_op("add", lambda a, b, p: a),
        lambda: register_op("not an identifier", lambda a, b, p: a),
        lambda: build_model("gpt9", task),
        lambda: build_model("xu2026", task, init="he"),
        lambda: build_model("nanda2023", task),
        lambda: set_readout(model, 5),
        lambda: task.probes(10_000),
        lambda: task.batch(0),
        lambda: RollingSED(window=2, k=3),
        lambda: RollingSED(window=3, k=0),
        lambda: RollingSED(window=0),
        lambda: window_bounds(0, 5, 2, "centred"),
        lambda: ParamSubspace.attention(model, mats="QZ"),
        lambda: ParamSubspace.attention(model, layers=[7]),
        lambda: ParamSubspace.attention(model, heads=[9]),
        lambda: ParamSubspace.from_names(model, []),
        lambda: S.unflatten(torch.zeros(3)),
        lambda: S.random_basis(0),
        lambda: S.project(torch.zeros(S.dim), S.random_basis(2), "rotate"),
        lambda: centroids(model, probes[0], probes[1], site="blocks.7.hook_resid_pre"),
        lambda: centroids(model, probes[0], probes[1], readout="max"),
        lambda: centroids(model, probes[0] + 100, probes[1]),
        lambda: centroid_response(model, S, torch.zeros(1, 5), probes),
        lambda: centroid_response(model, S, d, probes, method="exact"),
        lambda: centroid_response(model, S, d, probes, method="fd", eps_rel=-1.0),
        lambda: coupling(model, S, d, probes, n_random=0),
        lambda: GradientCapture(sources=("weights",)),
        lambda: GradientCapture(window=1, k=2),
        lambda: SubspaceProjection(S, k=3, mode="flip"),
        lambda: SubspaceProjection(S, k=3, basis="pca"),
        lambda: SubspaceProjection(S, k=3, apply_to="weights"),
        lambda: SubspaceProjection(S, k=0),
        lambda: SubspaceProjection(S, k=S.dim + 1),
        lambda: SubspaceProjection(S, k=3, window=2),
        lambda: SubspaceProjection(S, basis=torch.randn(2, 7)),
        lambda: Trainer(model, task, TrainConfig(eval_every=0)),
        lambda: Trainer(model, task, TrainConfig(grad_clip=-1.0)),
        lambda: Run(tmp_path / "x", {}, wandb_mode="later"),
        lambda: Run(blocker / "sub", {}, wandb_mode="disabled"),
        lambda: Run(tmp_path / "nope", {}, wandb_mode="disabled", resume=True),
        lambda: run_grid([Cell("a", "no_colon")], tmp_path / "g"),
        lambda: run_grid([], tmp_path / "g", backend="slurm"),
    ]


def test_bad_api_calls_raise_one_sentence_value_errors(paper_model, tmp_path):
    cases = api_cases(paper_model, tmp_path)
    assert len(cases) >= 30
    for i, call in enumerate(cases):
        with pytest.raises(SedLensError) as info:
            call()
        msg = str(info.value)
        assert isinstance(info.value, ValueError)
        assert msg and "\n" not in msg and msg.rstrip().endswith((".", ")")), (i, msg)
