import json

import pytest

from handler.thresholds import SCHEMA, SETS_SCHEMA, OperatingPoints, add_set, load_thresholds, parse_thresholds

NESTING = (8, 16, 2048)


def doc(**over):
    d = {"schema": SCHEMA, "default": "balanced",
         "operating_points": {"balanced": {"thresholds": {"8": 0.9, "16": None}},
                              "exact": {"thresholds": {"8": None, "16": None}}},
         "meta": {"nesting": [8, 16, 2048], "checkpoint_sha256": "abc", "numerics": "bf16"}}
    d.update(over)
    return d


def parse(d, **expect):
    return parse_thresholds(d, **{"nesting": NESTING, "checkpoint_sha256": "abc", "numerics": "bf16", **expect})


def test_valid_file_parses(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(doc()))
    points = load_thresholds(tmp_path / "t.json", nesting=NESTING, checkpoint_sha256="abc", numerics="bf16")
    assert points.points == {"balanced": (0.9, None), "exact": (None, None)}
    assert points.default == "balanced" and points.fitted


@pytest.mark.parametrize("expect, message", [
    (dict(checkpoint_sha256="def"), "fit on checkpoint sha256 abc but the model is sha256 def"),
    (dict(nesting=(8, 32, 2048)), r"nesting \[8, 16, 2048\] but the model has \[8, 32, 2048\]"),
    (dict(numerics="fp32"), "numerics 'bf16' but the model serves 'fp32'"),
])
def test_mismatch_with_the_model_names_both_sides(expect, message):
    with pytest.raises(ValueError, match=message):
        parse(doc(), **expect)


@pytest.mark.parametrize("value", [1.5, -0.1, "0.5", float("nan")])
def test_out_of_range_threshold_is_refused(value):
    d = doc()
    d["operating_points"]["balanced"]["thresholds"]["8"] = value
    with pytest.raises(ValueError, match="threshold for size 8 must be in"):
        parse(d)


def test_missing_size_and_unknown_default_are_refused():
    d = doc()
    del d["operating_points"]["balanced"]["thresholds"]["16"]
    with pytest.raises(ValueError, match="needs thresholds for sizes"):
        parse(d)
    with pytest.raises(ValueError, match="default operating point 'fast'"):
        parse(doc(default="fast"))
    with pytest.raises(ValueError, match="schema"):
        parse(doc(schema="v0"))


def test_fixed_points_answer_at_the_largest_size():
    points = OperatingPoints.fixed(NESTING)
    assert points.points == {"fixed_2048": (None, None)} and not points.fitted


def test_alert_lines_parse_and_bad_ones_are_refused():
    d = doc()
    d["operating_points"]["balanced"]["alert_disagreement"] = 0.012
    assert parse(d).alert_disagreement == {"balanced": 0.012}
    assert parse(doc()).alert_disagreement == {}  # older files: no line, no alert
    for bad in (0, -0.1, 1.5, float("nan"), "0.01"):
        d["operating_points"]["balanced"]["alert_disagreement"] = bad
        with pytest.raises(ValueError, match="alert_disagreement must be in"):
            parse(d)


def test_a_file_fit_in_any_of_the_accepted_numerics_loads():
    """The server accepts the card's numerics or the one this CPU serves it in, and names both."""
    assert parse(doc(), numerics=("fp32", "bf16")).fitted
    with pytest.raises(ValueError, match="serves 'fp32' or 'int8'"):
        parse(doc(), numerics=("fp32", "int8"))


def fp32_doc(t8=0.8):
    d = doc()
    d["operating_points"]["balanced"]["thresholds"]["8"] = t8
    d["meta"] = {**d["meta"], "numerics": "fp32"}
    return d


def test_a_file_with_a_set_per_numerics_mode_serves_each_mode_its_own_set():
    both = add_set(doc(), fp32_doc())
    assert both["schema"] == SETS_SCHEMA and sorted(both["sets"]) == ["bf16", "fp32"]
    # A bf16 card: on a CPU with bf16 the worker serves bf16; without, fp32 (threshold_numerics' order).
    assert parse(both, numerics=("bf16",)).points["balanced"] == (0.9, None)
    assert parse(both, numerics=("bf16", "fp32")).points["balanced"] == (0.8, None)
    # Adding a set of a mode already there replaces it; the others stay.
    again = add_set(both, fp32_doc(0.7))
    assert parse(again, numerics="fp32").points["balanced"] == (0.7, None)
    assert parse(again, numerics="bf16").points["balanced"] == (0.9, None)


def test_a_mode_without_a_set_is_refused_naming_the_sets_the_file_holds():
    only_fp32 = add_set(fp32_doc(), fp32_doc())
    with pytest.raises(ValueError, match=r"sets for numerics \['fp32'\] but the model serves 'bf16'.*--numerics bf16"):
        parse(only_fp32, numerics="bf16")
    with pytest.raises(ValueError, match="one file holds sets for one model"):
        add_set(doc(), {**fp32_doc(), "meta": {**fp32_doc()["meta"], "checkpoint_sha256": "other"}})
    mislabeled = {"schema": SETS_SCHEMA, "sets": {"bf16": {k: v for k, v in fp32_doc().items() if k != "schema"}}}
    with pytest.raises(ValueError, match="set under 'bf16' must be fit in bf16"):
        parse(mislabeled, numerics="bf16")
