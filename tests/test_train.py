import re

import pytest
import torch

from models import checkpoint
from models.data import ClutteredDigits, ClutterSpec
from models.train import TrainConfig, build_model, train
from models.warn import WARN, Architecture


def test_a_few_steps_lower_the_loss(tiny_config):
    torch.manual_seed(0)
    ds = ClutteredDigits("train", seed=0, spec=ClutterSpec(train_per_scan=1, test_per_scan=1))
    images, targets = ds.images[:32], ds.targets[:32]
    model = WARN(tiny_config).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True)
    losses = []
    for _ in range(30):
        loss = model.loss(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]  # memorizing 32 images; seeds 0-3 reach 0.02-0.65


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    arch = Architecture(depth=10, width=1, attention_width=2)
    cfg = TrainConfig(arch=arch, epochs=2, batch_size=16, max_steps=3, train_per_scan=1, out=str(out))
    meta = train(cfg)
    return cfg, out, meta


def test_training_writes_a_checkpoint_with_metrics(trained):
    cfg, out, meta = trained
    model, loaded = checkpoint.load(out / "model.pt")
    assert model.config.class_names == [str(i) for i in range(10)]
    assert loaded["metrics"]["images"] > 0 and "pointing_game" in loaded["metrics"]
    assert loaded["train"]["seed"] == 0 and loaded["dataset"] == "cluttered-digits"
    assert not model.training


def test_save_load_round_trip(tmp_path, tiny_config):
    model = WARN(tiny_config).eval()
    checkpoint.save(tmp_path / "m.pt", model, metrics={"top1_accuracy": 0.5})
    again, meta = checkpoint.load(tmp_path / "m.pt")
    x = torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(again(x).probabilities, model(x).probabilities)
    assert meta["metrics"] == {"top1_accuracy": 0.5}


def test_resume_continues_from_the_last_epoch(trained, capsys):
    cfg, out, _ = trained
    state = checkpoint.read(out / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 3
    resumed = TrainConfig(**{**cfg.__dict__, "max_steps": 5})
    meta = train(resumed)
    out_text, err_text = capsys.readouterr()
    assert "resumed from" in out_text
    assert out_text.rstrip().endswith(f"wrote {out / 'model.pt'} (export it with: warn-export {out / 'model.pt'})")
    assert re.search(r"epoch 2/\d+[^\r]*\n", err_text)  # the epoch's progress bar stays on screen
    assert meta["steps"] == 5
    assert checkpoint.read(out / "last.pt")["epoch"] == 2


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.load(bad)
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a WARN checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")


def test_build_model_uses_dataset_geometry():
    assert build_model(TrainConfig(dataset="cifar10"), list("abcdefghij")).config.input_size == (32, 32)
