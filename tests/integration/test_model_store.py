"""`make serve`'s TorchServe on a model store laid out like the repository's: the bundled archives
beside the folders that hold checkpoints and cards (fashion_mnist/, han1000/). config.properties
must load the archives and nothing else."""
import json
import urllib.request

import pytest

from model_store.serve import start, stop, write_config
from tests.integration.server import PORTS, build_archive

pytestmark = pytest.mark.integration


def test_the_configs_load_models_registers_the_archives_not_the_folders(tiny_checkpoint, tmp_path):
    store = tmp_path / "model_store"
    store.mkdir()
    build_archive(tiny_checkpoint, store)  # mrl_resnet50.mar; han1000.mar not built, as on a fresh clone
    for folder in ("fashion_mnist", "han1000"):  # what the repository's model_store holds beside them
        (store / folder).mkdir()
        (store / folder / "model_card.json").write_text("{}")
    config = write_config(tmp_path / "config.properties", store, PORTS)  # config.properties' load_models
    management = f"http://127.0.0.1:{PORTS['management']}"
    stop(tmp_path)
    try:
        start("mrl_resnet50", 240, root=tmp_path, config=config, model_store=store, management=management)
        token = json.loads((tmp_path / "key_file.json").read_text())["management"]["key"]
        req = urllib.request.Request(f"{management}/models", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            models = [m["modelName"] for m in json.load(resp)["models"]]
    finally:
        stop(tmp_path)
    assert models == ["mrl_resnet50"]
