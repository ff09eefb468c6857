"""The public loader on our format and on the three official RAIVNLab/MRL layouts."""
import os

import pytest
import torch
import torch.nn.functional as F

from handler.checkpoint import load_mrl_resnet50
from handler.model import DEFAULT_NESTING, mrl_resnet50

LAYERS = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))


def reference_forward(state, x, head):
    """An independent functional ResNet50 (v1.5, BlurPool) over an official state dict."""
    sd = {k.removeprefix("module."): v for k, v in state.items()}

    def conv(x, name, stride=1, padding=0):
        if f"{name}.conv.weight" in sd:  # BlurPool: depthwise 3x3 binomial blur, then the conv
            f = sd[f"{name}.blur_filter"]
            x = F.conv2d(x, f, padding=1, groups=x.shape[1])
            return F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
        return F.conv2d(x, sd[f"{name}.weight"], stride=stride, padding=padding)

    def bn(x, name):
        return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(conv(x, "conv1", 2, 3), "bn1")), 3, 2, 1)
    for li, (blocks, _, stride) in enumerate(LAYERS, start=1):
        for bi in range(blocks):
            p = f"layer{li}.{bi}"
            s = stride if bi == 0 else 1
            out = F.relu(bn(conv(x, f"{p}.conv1"), f"{p}.bn1"))
            out = F.relu(bn(conv(out, f"{p}.conv2", s, 1), f"{p}.bn2"))
            out = bn(conv(out, f"{p}.conv3"), f"{p}.bn3")
            idn = bn(conv(x, f"{p}.downsample.0", s), f"{p}.downsample.1") if bi == 0 else x
            x = F.relu(out + idn)
    z = x.mean((2, 3))
    if head == "mrl":
        return torch.stack([z[:, :m] @ sd[f"fc.nesting_classifier_{i}.weight"].t() + sd[f"fc.nesting_classifier_{i}.bias"]
                            for i, m in enumerate(DEFAULT_NESTING)], 1)
    w = sd.get("fc.weight", sd.get("fc.nesting_classifier_0.weight"))
    b = sd.get("fc.bias", sd.get("fc.nesting_classifier_0.bias"))
    return torch.stack([z[:, :m] @ w[:, :m].t() + b for m in DEFAULT_NESTING], 1)


def official_state(head, old_notation=False, seed=0):
    """Random weights in the official layout: DDP prefix, BlurPool keys, 1000 classes."""
    torch.manual_seed(seed)
    model = mrl_resnet50(num_classes=1000, head=head, blurpool=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.clone()
        if k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("running_mean") or (k.endswith(".weight") and v.ndim == 1) or k.endswith("bias"):
            v.uniform_(-0.5, 0.5) if not k.endswith("weight") else v.uniform_(0.5, 1.5)
        if old_notation:
            k = k.replace("fc.nesting_classifier_0.", "fc.")
        state["module." + k] = v
    return state


@pytest.mark.parametrize("head, old", [("mrl", False), ("mrl_e", False), ("mrl_e", True)],
                         ids=["mrl", "mrl_e", "old_fc_notation"])
def test_official_layouts_load_and_match_reference(tmp_path, head, old):
    state = official_state(head, old)
    assert "module.layer2.0.conv2.conv.weight" in state and "module.layer3.0.downsample.0.blur_filter" in state
    path = tmp_path / "official.pt"
    torch.save(state, path)
    model, card = load_mrl_resnet50(path)
    assert (card.head, card.blurpool, len(card.classes)) == (head, True, 1000)
    assert card.classes[0] == "tench" and card.preprocessing.crop == 224
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # 5e-5: two fp32 paths through 53 convs; oneDNN's AVX2 kernels (an AMD EPYC here) sum in
        # another order than its AVX-512 ones and were seen 1.4e-5 apart. A layout or loading bug
        # is off by orders of magnitude more.
        torch.testing.assert_close(model(x), reference_forward(state, x, head), atol=5e-5, rtol=1e-4)


def test_our_format_round_trips(tiny_checkpoint):
    model, card = load_mrl_resnet50(tiny_checkpoint)
    again, _ = load_mrl_resnet50(tiny_checkpoint)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)
    assert card.name == "tiny" and card.numerics == "fp32" and len(card.classes) == 10


def test_mismatched_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    state = official_state("mrl")
    state.pop("module.layer1.0.conv1.weight")
    state["module.layer9.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys \['layer1.0.conv1.weight'\]; unexpected keys \['layer9.extra'\]"):
        load_mrl_resnet50(tmp_path / "bad.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"state_dict": exploit}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_mrl_resnet50(tmp_path / "evil.pt")
    assert not marker.exists()
