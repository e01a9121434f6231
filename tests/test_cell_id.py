"""CellId: which run of an experiment's grid a cell is; its name is the run directory's, as on disk."""

from pathlib import Path

import pytest

from sed_lens.errors import SedLensError
from sed_lens.experiments import coupling, intervention
from sed_lens.experiments.cell_id import INTERVENTION, MULTITASK, SINGLE, CellId, parse_cells

ROOT = Path(__file__).resolve().parents[1]


def test_every_committed_run_name_round_trips():
    names = [p.stem for p in sorted((ROOT / "docs" / "reproduction" / "runs").rglob("*.json"))]
    cells = [CellId.parse(n) for n in names]
    assert [c.name for c in cells] == names and [str(c) for c in cells] == names
    assert {c.kind for c in cells} >= {SINGLE, INTERVENTION}


def test_the_experiments_name_their_cells_through_cell_ids():
    cfg = coupling.CouplingConfig(ops=("add", "mul"), seeds=(42, 7), multitask=True, multitask_seeds=(5,))
    cells = [CellId.parse(c.name) for c in coupling.cells(cfg)]
    assert cells == [CellId.single("add", 42), CellId.single("add", 7), CellId.single("mul", 42),
                     CellId.single("mul", 7), CellId.multitask(5)]
    assert [c.name for c in cells] == ["add-s42", "add-s7", "mul-s42", "mul-s7", "multitask-s5"]
    ids = [CellId.parse(c.name) for c in intervention.cells(intervention.InterventionConfig(seeds=(42,)))]
    assert [c.name for c in ids] == ["A-control-s42", "B-remove-sed-s42", "C-keep-sed-s42", "D-remove-random-s42",
                                     "E-keep-random-s42"]
    assert ids[1] == CellId.intervention("B", "remove-sed", 42) and ids[1].condition == "B"


def test_names_read_back_typed():
    assert CellId.parse("sq-s2024") == CellId(SINGLE, 2024, op="sq")
    assert CellId.parse("multitask-s137").is_multitask and CellId.parse("multitask-s137").seed == 137
    assert CellId.parse("D-remove-random-s42") == CellId(INTERVENTION, 42, condition="D", label="remove-random")
    assert list(parse_cells({"add-s1": 1, "multitask-s1": 2})) == [CellId.single("add", 1), CellId(MULTITASK, 1)]


@pytest.mark.parametrize("name", ["", "add", "add-s", "add-sx", "-s1", "add-s042", "a/b-s1", "add_s1", "A-control"])
def test_a_malformed_name_is_one_clear_error(name):
    with pytest.raises(SedLensError, match="grid cell"):
        CellId.parse(name)


@pytest.mark.parametrize("kwargs", [{"kind": "other", "seed": 1}, {"kind": SINGLE, "seed": 1},
                                    {"kind": MULTITASK, "seed": 1, "op": "add"}, {"kind": SINGLE, "seed": "1", "op": "add"},
                                    {"kind": INTERVENTION, "seed": 1, "condition": "A"}])
def test_a_cell_id_names_exactly_what_its_kind_needs(kwargs):
    with pytest.raises(SedLensError):
        CellId(**kwargs)
