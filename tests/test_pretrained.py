"""--init-weights: loading a local state dict into a backbone, its report and its errors."""
from __future__ import annotations

import sys

import pytest
import torch

import fixmatch
from fixmatch.cli import main
from fixmatch.config import Config
from fixmatch.models import create_model
from fixmatch.models.pretrained import InitWeightsError, load_init_weights, read_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _imagenet_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return create_model("resnet18", 1000, image_size=224).state_dict()


def _assert_loaded(model: torch.nn.Module, source: dict[str, torch.Tensor], head: str) -> None:
    own = model.state_dict()
    for key, tensor in source.items():
        if key.startswith(head + "."):
            assert own[key].shape != tensor.shape or not torch.equal(own[key], tensor), key
        else:
            assert torch.equal(own[key], tensor), key


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_loads_backbone_and_reinitialises_head(tmp_path, fmt: str) -> None:
    source = _imagenet_resnet18()
    path = tmp_path / f"r18.{fmt}"
    if fmt == "pt":
        torch.save(source, path)
    else:
        save_file = pytest.importorskip("safetensors.torch").save_file
        save_file(source, str(path))
    torch.manual_seed(2)
    model = create_model("resnet18", 10, image_size=96)
    fresh_head = model.fc.weight.detach().clone()
    report = load_init_weights(model, path)
    _assert_loaded(model, source, "fc")
    assert torch.equal(model.fc.weight, fresh_head) and model.fc.weight.shape == (10, 512)
    assert sorted(report.head_skipped) == ["fc.bias", "fc.weight"]
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(source) - 2
    assert "classifier head re-initialised" in report.summary() and "\n" not in report.summary()


def test_reports_missing_and_unexpected_keys(tmp_path) -> None:
    source = _imagenet_resnet18()
    del source["layer4.1.bn2.running_var"]
    source["projector.weight"] = torch.zeros(3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "ckpt.pth")
    report = load_init_weights(create_model("resnet18", 10, image_size=224), tmp_path / "ckpt.pth")
    assert report.missing == ["layer4.1.bn2.running_var"]
    assert report.unexpected == ["projector.weight"]
    assert "missing: layer4.1.bn2.running_var" in report.summary()


def test_shape_mismatch_is_a_one_line_error(tmp_path) -> None:
    torch.save(_imagenet_resnet18(), tmp_path / "r18.pt")
    cifar_stem = create_model("resnet18", 10, image_size=32)
    with pytest.raises(InitWeightsError) as info:
        load_init_weights(cifar_stem, tmp_path / "r18.pt")
    msg = str(info.value)
    assert "conv1.weight" in msg and "(64, 3, 7, 7)" in msg and "(64, 3, 3, 3)" in msg and "\n" not in msg


def test_unreadable_files(tmp_path, monkeypatch) -> None:
    with pytest.raises(InitWeightsError, match="not found"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InitWeightsError, match="not a torch file of tensors"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole-module.pt")  # a pickled module, not a state dict
    with pytest.raises(InitWeightsError, match=r"import torch\.nn\.modules\.linear\.Linear.*model\.state_dict\(\)"):
        read_state_dict(tmp_path / "whole-module.pt")
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(InitWeightsError, match="no state dict"):
        read_state_dict(tmp_path / "nostate.pt")
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(InitWeightsError, match="not a readable safetensors file"):
        read_state_dict(tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if the package were not installed
    with pytest.raises(InitWeightsError, match=r"pip install 'fixmatch\[safetensors\]'"):
        read_state_dict(tmp_path / "w.safetensors")


def test_fixmatch_checkpoint_gives_its_ema_weights(tmp_path) -> None:
    raw, ema = create_model("cnn_small", 10).state_dict(), create_model("cnn_small", 10).state_dict()
    torch.save({"format": "fixmatch-checkpoint", "model": raw, "ema": ema, "step": 3}, tmp_path / "last.pt")
    loaded = read_state_dict(tmp_path / "last.pt")
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_unrelated_checkpoint_is_refused(tmp_path) -> None:
    torch.save({"encoder.w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InitWeightsError, match="none of the 1 tensors"):
        load_init_weights(create_model("cnn_small", 10), tmp_path / "other.pt")


def test_vit_position_embedding_is_resized(tmp_path) -> None:
    torch.manual_seed(0)
    source = create_model("vit_tiny_p4", 100, image_size=32).state_dict()
    torch.save(source, tmp_path / "vit.pt")
    model = create_model("vit_tiny_p4", 10, image_size=16)
    report = load_init_weights(model, tmp_path / "vit.pt")
    assert model.encoder.pos_embedding.shape == (1, 17, 192)
    assert torch.equal(model.encoder.pos_embedding[:, 0], source["encoder.pos_embedding"][:, 0])
    assert torch.equal(model.conv_proj.weight, source["conv_proj.weight"])
    assert report.head_skipped == ["heads.head.weight", "heads.head.bias"] and not report.missing


QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=1, eval_every=1,
             eval_batch_size=512, progress=False, device="cpu", steps=1, lr=1e-9, wd=0.0)


def test_training_starts_from_the_file_and_says_so(tmp_path, capsys) -> None:
    torch.manual_seed(5)
    source = create_model("cnn_small", 3, in_channels=3).state_dict()  # another head: 3 classes
    torch.save(source, tmp_path / "init.pt")
    fixmatch.train(Config(**QUICK, init_weights=str(tmp_path / "init.pt")), out=tmp_path / "run")
    assert "init weights from" in capsys.readouterr().out
    trained = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    conv = "features.0.weight"
    torch.testing.assert_close(trained[conv], source[conv], atol=1e-6, rtol=0)  # lr 1e-9: one step moves nothing
    assert trained["fc.weight"].shape[0] == 10


def test_train_command_refuses_a_mismatched_file_before_writing(tmp_path, capsys) -> None:
    torch.save(create_model("resnet18", 10, image_size=224).state_dict(), tmp_path / "r18.pt")
    code = main(["train", "--dataset", "synthetic", "--model", "cnn_small", "--num-labels", "40", "--steps", "1",
                 "--device", "cpu", "--no-progress", "--init-weights", str(tmp_path / "r18.pt"),
                 "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fixmatch: error: --init-weights: none of the") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
