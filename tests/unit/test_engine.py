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
    import handler.engine as engine_mod
    monkeypatch.setattr(engine_mod, "bf16_supported", lambda device: supported)
    assert engine_mod.resolve_numerics("bf16") == want
    assert engine_mod.resolve_numerics("fp32") == "fp32"


def test_a_bf16_card_is_served_in_fp32_on_a_cpu_without_bf16(tiny_checkpoint, monkeypatch):
    import handler.engine as engine_mod
    from handler.service import MRLService
    from handler.thresholds import OperatingPoints

    monkeypatch.setattr(engine_mod, "bf16_supported", lambda device: False)
    model, card = load_mrl_resnet50(tiny_checkpoint, numerics="bf16")
    service = MRLService(model, card, OperatingPoints.fixed(card.nesting), batch_sizes=(1,))
    assert service.engine.numerics == "fp32" and service.card.numerics == "bf16"
    with pytest.raises(ValueError, match="not supported"):
        Engine(model, numerics="bf16", input_size=32)  # asked for explicitly: refused, not swapped
