"""ScanKey: what a coupling scan measured, typed; its string form is the one JSON and .pt files hold."""

import json
from pathlib import Path

import pytest

from sed_lens.analysis.scan_key import RANDOM, ScanKey, parse_keys, stream_name
from sed_lens.errors import SedLensError

ROOT = Path(__file__).resolve().parents[1]


def committed_keys() -> set[str]:
    """Every measured key in the committed reproduction results (each run's cell.json, kept compact)."""
    keys: set[str] = set()
    for path in sorted((ROOT / "docs" / "reproduction" / "runs").rglob("*.json")):
        summary = json.loads(path.read_text())["summary"]
        for by_op in summary.get("coupling", {}).values():
            keys |= set(by_op)
        for by_seed in summary.get("scans", {}).values():
            for scan in by_seed.values():
                for part in ("series", "summary"):
                    for by_op in scan[part].values():
                        keys |= set(by_op)
    return keys


def test_every_key_of_the_committed_results_round_trips():
    keys = committed_keys()
    parsed = {k: ScanKey.parse(k) for k in keys}
    assert all(str(key) == k and key.to_str() == k for k, key in parsed.items())
    # the committed results hold every kind of key: main measurements, window and finite-difference variants
    assert {ScanKey("gradient", "leading"), ScanKey("update", "trailing")} <= set(parsed.values())
    assert any(key.window is not None for key in parsed.values())
    assert any(key.fd_eps is not None for key in parsed.values())


@pytest.mark.parametrize("key", [
    ScanKey("update", "leading"), ScanKey("gradient", "trailing"), ScanKey("task_gradient", "leading", "add"),
    ScanKey("task_gradient", "trailing", "sq"), ScanKey("gradient", "trailing", window=40),
    ScanKey("task_gradient", "leading", "mul", window=1), ScanKey("update", "leading", fd_eps=0.005),
    ScanKey("task_gradient", "leading", "add", fd_eps=0.001), ScanKey("gradient", "leading", fd_eps=1e-5),
    ScanKey("update", "leading", inputs="per_op"), ScanKey("gradient", "trailing", inputs="per_op"),
    ScanKey("task_gradient", "leading", "mul", inputs="per_op")])
def test_every_key_a_scan_writes_round_trips(key):
    assert ScanKey.parse(str(key)) == key
    assert hash(ScanKey.parse(str(key))) == hash(key)


def test_keys_write_todays_strings_and_read_back_typed():
    key = ScanKey.parse("task_gradient/add/leading/W=5")
    assert (key.source, key.op, key.align, key.window, key.fd_eps) == ("task_gradient", "add", "leading", 5, None)
    assert key.stream == "task_gradient/add" and key.variant == "W=5" and not key.is_main
    assert key.main == ScanKey("task_gradient", "leading", "add") and key.main.is_main and key.main.variant == ""
    assert str(ScanKey("gradient", "leading").with_fd_eps(0.005)) == "gradient/leading/fd_eps=0.005"
    assert ScanKey.parse("update/trailing/fd_eps=0.05").fd_eps == 0.05
    assert str(ScanKey("gradient", "leading", window=20)) == "gradient/leading/W=20"
    assert stream_name("update") == "update" and stream_name("task_gradient", "sq") == "task_gradient/sq"
    # ε as the key writes it (6 significant digits), so a key equals the one read back from its string
    assert ScanKey("gradient", "leading", fd_eps=1 / 3) == ScanKey.parse("gradient/leading/fd_eps=0.333333")


@pytest.mark.parametrize("text", [
    "", "gradient", "leading", "gradient/", "gradient/middle", "weights/leading", "task_gradient/leading",
    "task_gradient//leading", "update/add/leading", "gradient/leading/W=", "gradient/leading/W=five",
    "gradient/leading/W=0", "gradient/leading/W=-2", "gradient/leading/W=05", "gradient/leading/k=3",
    "gradient/leading/fd_eps=0", "gradient/leading/fd_eps=nan", "gradient/leading/fd_eps=0.0050",
    "gradient/leading/W=5/fd_eps=0.005", "gradient/leading/extra/parts", "random"])
def test_a_malformed_key_is_one_clear_error(text):
    with pytest.raises(SedLensError, match="is not a scan key"):
        ScanKey.parse(text)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"source": "weights", "align": "leading"}, "unknown scan stream"),
    ({"source": "gradient", "align": "middle"}, "unknown window alignment"),
    ({"source": "task_gradient", "align": "leading"}, "needs the op"),
    ({"source": "gradient", "align": "leading", "op": "add"}, "only task_gradient"),
    ({"source": "gradient", "align": "leading", "window": 5, "fd_eps": 0.005}, "at most one variant"),
    ({"source": "gradient", "align": "leading", "window": 2.5}, "positive integer"),
    ({"source": "gradient", "align": "leading", "fd_eps": -0.1}, "positive number")])
def test_a_key_that_names_no_measurement_cannot_be_made(kwargs, match):
    with pytest.raises(SedLensError, match=match):
        ScanKey(**kwargs)
    with pytest.raises(SedLensError, match="no finite-difference variant"):
        ScanKey("gradient", "leading", window=5).with_fd_eps(0.005)


def test_the_per_op_inputs_variant_writes_its_own_strings_and_leaves_the_others_unchanged():
    per_op = ScanKey("task_gradient", "leading", "add").with_inputs()
    assert str(per_op) == "task_gradient/add/leading/per_op" and per_op.variant == "per_op"
    assert str(ScanKey("update", "leading").with_inputs("per_op")) == "update/leading/per_op"
    assert str(ScanKey("gradient", "leading", inputs="per_op")) == "gradient/leading/per_op"
    key = ScanKey.parse("task_gradient/mul/leading/per_op")
    assert (key.source, key.op, key.align, key.window, key.fd_eps, key.inputs) == \
        ("task_gradient", "mul", "leading", None, None, "per_op")
    assert not key.is_main and key.main == ScanKey("task_gradient", "leading", "mul") and key.stream == "task_gradient/mul"
    assert key != key.main and ScanKey.parse(str(key.main)).inputs is None  # the standard key's string is unchanged
    assert str(key.main) == "task_gradient/mul/leading"
    for text in ("gradient/leading/per_op/W=5", "gradient/leading/per_task", "gradient/leading/fd_eps=0.005/per_op",
                 "gradient/per_op", "task_gradient/add/per_op"):
        with pytest.raises(SedLensError, match="is not a scan key"):
            ScanKey.parse(text)
    with pytest.raises(SedLensError, match="at most one variant"):
        ScanKey("gradient", "leading", fd_eps=0.005, inputs="per_op")
    with pytest.raises(SedLensError, match="unknown scan key inputs"):
        ScanKey("gradient", "leading", inputs="shared")
    with pytest.raises(SedLensError, match="no finite-difference variant"):
        per_op.with_fd_eps(0.005)
    with pytest.raises(SedLensError, match="no inputs variant"):
        ScanKey("gradient", "leading", window=5).with_inputs()


def test_parse_keys_reads_a_json_map_typed_in_order_without_the_random_entry():
    results = {RANDOM: {"median": 1.0}, "update/leading": 1, "gradient/leading/fd_eps=0.005": 2, "gradient/leading": 3}
    typed = parse_keys(results)
    assert list(typed) == [ScanKey("update", "leading"), ScanKey("gradient", "leading", fd_eps=0.005),
                           ScanKey("gradient", "leading")]
    assert list(typed.values()) == [1, 2, 3]
    with pytest.raises(SedLensError, match="'oops' is not a scan key"):
        parse_keys({"oops": 1})
