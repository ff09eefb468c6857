"""The soak tool, for one minute (the >= 70-minute run is by hand, `python -m bench.soak --minutes 75`). Mixed
valid and invalid traffic from 12 clients against a real TorchServe, a key renewal half way."""
import pytest

from bench import soak

pytestmark = pytest.mark.integration


def test_a_one_minute_soak_answers_everything_as_expected_and_renews_its_key(tmp_path):
    report = soak.main(["--minutes", "1", "--sample-s", "10", "--renew-after-s", "30", "--port", "18280",
                        "--out", str(tmp_path / "soak.json")])
    summary = report["summary"]
    assert summary["unexpected_errors"] == 0, summary["by_kind"]
    assert summary["renewals"] == 1 and summary["renewals_ok"], report["renewals"]
    assert len(report["samples"]) >= 5 and summary["requests"] > 100
    kinds = summary["by_kind"]
    assert set(kinds) == {"valid", "corrupt", "unknown_option", "bad_dim", "empty"}
    assert all(set(kinds[k]) == {"400"} for k in kinds if k != "valid"), kinds
    # valid requests: 200, except those sent with the old key during the renewal
    assert kinds["valid"].get("400", 0) == summary["renewal_races"] and set(kinds["valid"]) <= {"200", "400"}
    assert (tmp_path / "soak.png").stat().st_size > 10_000
