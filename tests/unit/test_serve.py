"""model_store.serve: what `make serve` serves is what model_store holds."""
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
    assert settings["load_models"] == "all"  # han1000.mar only exists once its checkpoint is trained
    for example in EXAMPLES.values():
        assert (ROOT / "examples" / example).is_file()
