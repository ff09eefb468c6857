import pytest
import torch

from handler.model import DEFAULT_NESTING, EfficientNestedLinear, MRLResNet50, mrl_resnet50


@pytest.mark.parametrize("head", ["mrl", "mrl_e"])
def test_logits_have_every_size(head):
    model = mrl_resnet50(num_classes=7, head=head).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, emb = model(x), model.embed(x)
    assert logits.shape == (3, len(DEFAULT_NESTING), 7)
    assert emb.shape == (3, 2048)
    # Every size's logits come from the first m dims of the same embedding.
    for s, m in enumerate(DEFAULT_NESTING):
        if head == "mrl":
            lin = getattr(model.fc, f"nesting_classifier_{s}")
            expected = emb[:, :m] @ lin.weight.t() + lin.bias
        else:
            lin = model.fc.nesting_classifier_0
            expected = emb[:, :m] @ lin.weight[:, :m].t() + lin.bias
        torch.testing.assert_close(logits[:, s], expected, atol=1e-4, rtol=1e-4)


def test_mrl_e_slicing_matches_explicit_computation():
    torch.manual_seed(0)
    head = EfficientNestedLinear((8, 16, 32, 2048), num_classes=5)
    z = torch.randn(4, 2048, dtype=torch.float64)
    head = head.double()
    w, b = head.nesting_classifier_0.weight, head.nesting_classifier_0.bias
    out = head(z)
    for s, m in enumerate((8, 16, 32, 2048)):
        explicit = torch.stack([torch.stack([sum(z[i, d] * w[c, d] for d in range(m)) + b[c]
                                             for c in range(5)]) for i in range(4)]) if m <= 32 else z[:, :m] @ w[:, :m].t() + b
        torch.testing.assert_close(out[:, s], explicit)


def test_parameter_count_is_torchvision_resnet50():
    model = mrl_resnet50(num_classes=1000, head="mrl_e")
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert len(model.state_dict()) == 320


def test_blurpool_wraps_exactly_the_strided_convs():
    keys = set(mrl_resnet50(blurpool=True).state_dict())
    blurred = sorted(k.removesuffix(".blur_filter") for k in keys if k.endswith(".blur_filter"))
    assert blurred == ["layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
                       "layer4.0.conv2", "layer4.0.downsample.0"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(nesting=(8, 16, 1024)), "last nesting size must be 2048"),
    (dict(nesting=(16, 8, 2048)), "strictly increasing"),
    (dict(head="dense"), "head must be one of"),
    (dict(num_classes=1), "num_classes"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MRLResNet50(**kwargs)
