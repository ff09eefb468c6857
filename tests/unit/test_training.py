import pytest
import torch
import torch.nn.functional as F

from handler.checkpoint import file_sha256
from handler.model import MRLResNet50
from handler.preprocess import Normalizer
from tests.unit.test_data import needs_fashion_mnist
from training.train_mrl import (
    MRLLoss,
    augment,
    build_optimizer,
    demo_preprocessing,
    parse_args,
    recorded_command,
    train,
)


def test_mrl_loss_is_the_weighted_sum_of_per_size_cross_entropies():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4, 10), torch.randint(0, 10, (6,))
    per_size = [F.cross_entropy(logits[:, s], y, label_smoothing=0.1) for s in range(4)]
    assert torch.allclose(MRLLoss(label_smoothing=0.1)(logits, y), sum(per_size))
    w = [1.0, 0.5, 2.0, 0.0]
    assert torch.allclose(MRLLoss(w, label_smoothing=0.1)(logits, y), sum(c * loss for c, loss in zip(w, per_size)))


def test_augment_keeps_shape_and_content_scale():
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 255, (5, 32, 32), dtype=torch.uint8)
    out = augment(batch, 2, gen)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert augment(batch, 0, torch.Generator().manual_seed(1)).float().sum() == batch.float().sum()


def test_augment_equals_a_per_image_crop_and_flip():
    batch = torch.randint(0, 255, (64, 32, 32), dtype=torch.uint8)
    out = augment(batch, 2, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the same draws, in the same order
    dy, dx = torch.randint(0, 5, (64,), generator=gen), torch.randint(0, 5, (64,), generator=gen)
    flip = torch.rand(64, generator=gen) < 0.5
    assert 0 < flip.sum() < 64
    padded = F.pad(batch, (2, 2, 2, 2))
    for i in range(64):
        crop = padded[i, dy[i]: dy[i] + 32, dx[i]: dx[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = MRLResNet50(num_classes=10).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, lr=0.05, weight_decay=5e-4)
    norm = Normalizer(demo_preprocessing(32))
    x = norm(torch.randint(0, 255, (16, 32, 32), dtype=torch.uint8).numpy())
    y = torch.arange(16) % 10
    loss_fn, losses = MRLLoss(), []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@needs_fashion_mnist
def test_training_is_reproducible_and_a_resumed_run_equals_a_straight_one(tmp_path):
    """Same seed and threads: same weights bit for bit, straight through or stopped and resumed."""
    common = ["--epochs", "2", "--limit", "128", "--batch-size", "32", "--threads", str(torch.get_num_threads())]
    straight = train(parse_args(["--out", str(tmp_path / "straight"), *common]))
    sliced = tmp_path / "sliced"
    assert train(parse_args(["--out", str(sliced), "--stop-after", "1", *common])) == sliced / "last.pt"
    assert not (sliced / "final.pt").exists()
    resumed = train(parse_args(["--out", str(sliced), "--resume", *common]))

    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["card"]["training"]["history"] == b["card"]["training"]["history"]
    assert b["card"]["training"]["resumed"] and not a["card"]["training"]["resumed"]
    assert a["card"]["training"]["command"] == "python training/train_mrl.py --out " + str(tmp_path / "straight") \
        + " " + " ".join(common)
    torch.manual_seed(0)  # the weights did move: the comparison is not between two untouched inits
    assert not torch.equal(a["state_dict"]["conv1.weight"], MRLResNet50(num_classes=10).conv1.weight.detach())


def test_the_recorded_command_leaves_out_the_time_slicing_flags():
    argv = ["--out", "runs/x", "--stop-after", "3", "--epochs", "25", "--resume", "--stop-after=4"]
    assert recorded_command(argv) == "python training/train_mrl.py --out runs/x --epochs 25"


@needs_fashion_mnist
def test_init_warm_starts_from_a_checkpoint_and_the_card_records_it(tmp_path, tiny_checkpoint):
    # lr 0: the weights must stay the init's exactly (BN statistics still move in train mode).
    common = ["--epochs", "1", "--limit", "64", "--batch-size", "32", "--lr", "0", "--init", str(tiny_checkpoint)]
    final = train(parse_args(["--out", str(tmp_path / "warm"), *common]))
    got = torch.load(final, weights_only=True)
    init = torch.load(tiny_checkpoint, weights_only=True)
    for k in ("conv1.weight", "layer4.2.conv3.weight", "fc.nesting_classifier_0.weight"):
        assert torch.equal(got["state_dict"][k], init["state_dict"][k]), k
    record = got["card"]["training"]["init"]
    assert record["sha256"] == file_sha256(tiny_checkpoint) and record["training"] == init["card"]["training"]


def test_init_refuses_a_checkpoint_of_other_classes(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="classes/nesting/head"):
        train(parse_args(["--out", str(tmp_path / "x"), "--data", "han1000:train", "--limit", "64",
                          "--init", str(tiny_checkpoint)]))
