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
