import pytest
import torch
import torch.nn.functional as F

from handler.checkpoint import load_mrl_resnet50
from handler.engine import Engine


@pytest.mark.parametrize("graph,fusion", [("eager", False), ("jit", False), ("jit", True)])
def test_engine_matches_the_model_at_every_batch_size_in_any_order(tiny_checkpoint, graph, fusion):
    model, card = load_mrl_resnet50(tiny_checkpoint)
    engine = Engine(model, graph=graph, input_size=32, batch_sizes=(1, 2, 3, 4), onednn_fusion=fusion)
    assert engine.onednn_fusion == (graph == "jit" and fusion)
    torch.manual_seed(1)
    for b in (4, 1, 3, 2, 4, 1):
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            want = F.softmax(model(x), dim=-1)
            emb_want = model.embed(x)
        probs, emb = engine(x)
        assert probs.shape == (b, len(card.nesting), len(card.classes))
        torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(emb, emb_want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("supported,want", [(True, "bf16"), (False, "fp32")])
def test_numerics_fall_back_to_fp32_only_where_bf16_is_missing(monkeypatch, supported, want):
    import handler.numerics as numerics
    monkeypatch.setattr(numerics, "bf16_supported", lambda device: supported)
    assert numerics.resolve_numerics("bf16") == want
    assert numerics.resolve_numerics("fp32") == "fp32"


def test_a_bf16_card_is_served_in_fp32_on_a_cpu_without_bf16(tiny_checkpoint, monkeypatch):
    import handler.numerics as numerics
    from handler.service import MRLService
    from handler.thresholds import OperatingPoints

    monkeypatch.setattr(numerics, "bf16_supported", lambda device: False)
    model, card = load_mrl_resnet50(tiny_checkpoint, numerics="bf16")
    service = MRLService(model, card, OperatingPoints.fixed(card.nesting), batch_sizes=(1,))
    assert service.engine.numerics == "fp32" and service.card.numerics == "bf16"
    with pytest.raises(ValueError, match="not supported"):
        Engine(model, numerics="bf16", input_size=32)  # asked for explicitly: refused, not swapped


def test_a_restarted_worker_loads_the_cached_frozen_graph_and_answers_the_same(tiny_checkpoint, tmp_path, caplog):
    model, _ = load_mrl_resnet50(tiny_checkpoint)
    cache = tmp_path / "graph_cache"
    first = Engine(model, graph="jit", input_size=32, batch_sizes=(1, 2), graph_cache=cache, cache_key="sha-a")
    [saved] = cache.iterdir()
    assert not first.graph_cached and not saved.name.startswith(".")  # renamed into place, whole
    again = Engine(model, graph="jit", input_size=32, batch_sizes=(1, 2), graph_cache=cache, cache_key="sha-a")
    assert again.graph_cached
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(first(x), again(x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Another checkpoint (or numerics) is another file: never the wrong graph.
    other = Engine(model, graph="jit", input_size=32, batch_sizes=(1,), graph_cache=cache, cache_key="sha-b")
    assert not other.graph_cached and len(list(cache.iterdir())) == 2
    # A damaged file is traced again and replaced, with a warning; no failure.
    saved.write_bytes(b"not a torchscript archive")
    with caplog.at_level("WARNING"):
        damaged = Engine(model, graph="jit", input_size=32, batch_sizes=(1, 2), graph_cache=cache, cache_key="sha-a")
    assert not damaged.graph_cached and "could not be loaded" in caplog.text
    assert Engine(model, graph="jit", input_size=32, batch_sizes=(1, 2), graph_cache=cache,
                  cache_key="sha-a").graph_cached


def test_an_unwritable_graph_cache_costs_a_trace_and_a_warning_only(tiny_checkpoint, tmp_path, caplog):
    model, _ = load_mrl_resnet50(tiny_checkpoint)
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING"):
        engine = Engine(model, graph="jit", input_size=32, batch_sizes=(1,), graph_cache=blocked / "cache",
                        cache_key="sha-a")
    assert not engine.graph_cached and "could not cache" in caplog.text
    assert engine(torch.randn(1, 3, 32, 32))[0].shape[0] == 1
