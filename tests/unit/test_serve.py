"""model_store.serve and build_archive: what `make serve` serves is what model_store holds, and how."""
from model_store.serve import EXAMPLES, ROOT, served_models


def test_served_models_are_the_bundled_archives_present(tmp_path):
    assert served_models(tmp_path) == []
    (tmp_path / "han1000.mar").touch()
    (tmp_path / "other.mar").touch()  # not bundled: TorchServe loads it, but there is no example to print
    assert served_models(tmp_path) == ["han1000"]
    (tmp_path / "mrl_resnet50.mar").touch()
    assert served_models(tmp_path) == list(EXAMPLES)


def test_the_config_loads_every_archive_and_each_example_exists():
    settings = dict(line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines()
                    if line and not line.startswith("#"))
    # Exactly the bundled archives (han1000.mar only exists once its checkpoint is trained); never
    # "all", which registers model_store's own folders as models too.
    assert settings["load_models"].split(",") == [f"{m}.mar" for m in EXAMPLES]
    for example in EXAMPLES.values():
        assert (ROOT / "examples" / example).is_file()


def test_an_archive_refuses_a_batch_delay_torchserve_would_read_as_100_ms(tmp_path):
    import pytest

    from model_store.build_archive import BATCH_DELAY_MS, build, parse_args

    assert BATCH_DELAY_MS >= 1
    with pytest.raises(ValueError, match="at least 1 ms, got 0.*100 ms"):
        build(parse_args(["--checkpoint", str(tmp_path / "none.pt"), "--batch-delay", "0"]))


def test_the_committed_configs_batch_greedily_and_the_bench_says_which_way_it_ran(tmp_path):
    """config.properties and the runtime image's start the agent with greedy batching
    (tests/integration/test_batching.py shows what it does); a config without it is TorchServe's."""
    from bench.report import batching_line
    from model_store.serve import ROOT, batching

    assert batching() == "greedy" and batching(ROOT / "deploy" / "kserve" / "config.properties") == "greedy"
    plain = tmp_path / "config.properties"
    plain.write_text((ROOT / "config.properties").read_text().replace(" -Dmrl.batching=greedy", ""))
    assert batching(plain) == "torchserve"
    assert batching_line({"batch_delay_ms": 1, "batching": "greedy"}).startswith("greedy batching")
    assert batching_line({"batch_delay_ms": 5}) == "maxBatchDelay 5 ms"  # runs from before it
