"""Backbones: published parameter counts, torchvision names, stems, FLOPs, weight decay, forward/backward.

Shape-only checks build the models on the ``meta`` device (no memory, no compute), so the big
ones cost milliseconds; the forward/backward passes run on the CPU at small inputs, batch 2.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fixmatch.cli import main
from fixmatch.core.optim import parameter_groups
from fixmatch.models import ModelError, count_parameters, create_model, list_models
from fixmatch.models.summary import count_flops, describe_models
from fixmatch.models.vit import resize_pos_embedding
from fixmatch.models.wideresnet import BasicBlock

MODELS = list_models()

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def meta_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes, **kwargs)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- parameter counts at the published configuration ---------------------------------------------------
# (kwargs, classes, published count, source). Within 1%; torchvision's exact counts are also checked below.
PUBLISHED = {
    "cnn_small": ({}, 10, 242e3, "cnn.py's docstring (~242k)"),
    "wrn28_2": ({}, 10, 1.47e6, "FixMatch paper"),
    "wrn28_8": ({}, 100, 23.4e6, "FixMatch official code"),
    "wrn37_2": ({}, 10, 5.93e6, "official code --scales=4 (google-research/fixmatch#34: about 6M)"),
    "resnet18": ({"image_size": 224}, 1000, 11.69e6, "torchvision"),
    "resnet34": ({"image_size": 224}, 1000, 21.80e6, "torchvision"),
    "resnet50": ({"image_size": 224}, 1000, 25.56e6, "torchvision"),
    "resnet101": ({"image_size": 224}, 1000, 44.55e6, "torchvision"),
    "resnet152": ({"image_size": 224}, 1000, 60.19e6, "torchvision"),
    "densenet121": ({"image_size": 224}, 1000, 7.98e6, "torchvision"),
    "mobilenetv3_small": ({"image_size": 224}, 1000, 2.54e6, "torchvision"),
    "mobilenetv3_large": ({"image_size": 224}, 1000, 5.48e6, "torchvision"),
    "vit_b16": ({"image_size": 224}, 1000, 86.57e6, "torchvision"),
    # ViT-Ti/S are published with 16x16 patches at 224 (DeiT: 5.7M, 22.1M); the _p4 models are that network
    # with 4x4 patches: only the patch projection and the position embedding differ.
    "vit_tiny_p4": ({"image_size": 224, "patch_size": 16}, 1000, 5.72e6, "DeiT-Ti"),
    "vit_small_p4": ({"image_size": 224, "patch_size": 16}, 1000, 22.05e6, "DeiT-S"),
}

EXACT = {"wrn28_2": 1_467_610, "wrn37_2": 5_929_434, "resnet18": 11_689_512, "resnet34": 21_797_672,
         "resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808, "densenet121": 7_978_856,
         "mobilenetv3_small": 2_542_856, "mobilenetv3_large": 5_483_032, "vit_b16": 86_567_656}


def test_every_model_has_a_published_count() -> None:
    assert set(PUBLISHED) == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_published(name: str) -> None:
    kwargs, classes, published, _ = PUBLISHED[name]
    n = count_parameters(meta_model(name, classes, **kwargs))
    assert abs(n - published) / published < 0.01, (name, n, published)
    if name in EXACT:
        assert n == EXACT[name]


def test_wrn37_2_is_the_official_scales4_network() -> None:
    model = meta_model("wrn37_2")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 16
    assert [b.conv1.out_channels for b in blocks[::4]] == [32, 64, 128, 256]
    assert [b.conv1.stride[0] for b in blocks[::4]] == [1, 2, 2, 2]
    assert [b.activate_before_residual for b in blocks] == [True] + [False] * 15
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 37  # stem + 32 block convolutions + 4 projection shortcuts, the "37"
    # The TF code's convolutions carry a bias: one per output channel of every convolution.
    assert count_parameters(model) + sum(c.out_channels for c in convs) == 5_933_770
    assert model.fc.in_features == 256
    # WRN-28-2 counted the same way gives its 28.
    assert sum(isinstance(m, nn.Conv2d) for m in meta_model("wrn28_2").modules()) == 28


# --- torchvision names ------------------------------------------------------------------------------------
def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


# torchvision.models.resnet18(): state_dict() keys and shapes, in order, written out from its definition
# (conv1 7x7/2, bn1, layer1-4 of two BasicBlocks, downsample = [1x1 conv, BN] in layer2-4's first block, fc).
TORCHVISION_RESNET18 = (
    [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64)
    + [("layer1.0.conv1.weight", (64, 64, 3, 3))] + _bn("layer1.0.bn1", 64)
    + [("layer1.0.conv2.weight", (64, 64, 3, 3))] + _bn("layer1.0.bn2", 64)
    + [("layer1.1.conv1.weight", (64, 64, 3, 3))] + _bn("layer1.1.bn1", 64)
    + [("layer1.1.conv2.weight", (64, 64, 3, 3))] + _bn("layer1.1.bn2", 64)
    + [("layer2.0.conv1.weight", (128, 64, 3, 3))] + _bn("layer2.0.bn1", 128)
    + [("layer2.0.conv2.weight", (128, 128, 3, 3))] + _bn("layer2.0.bn2", 128)
    + [("layer2.0.downsample.0.weight", (128, 64, 1, 1))] + _bn("layer2.0.downsample.1", 128)
    + [("layer2.1.conv1.weight", (128, 128, 3, 3))] + _bn("layer2.1.bn1", 128)
    + [("layer2.1.conv2.weight", (128, 128, 3, 3))] + _bn("layer2.1.bn2", 128)
    + [("layer3.0.conv1.weight", (256, 128, 3, 3))] + _bn("layer3.0.bn1", 256)
    + [("layer3.0.conv2.weight", (256, 256, 3, 3))] + _bn("layer3.0.bn2", 256)
    + [("layer3.0.downsample.0.weight", (256, 128, 1, 1))] + _bn("layer3.0.downsample.1", 256)
    + [("layer3.1.conv1.weight", (256, 256, 3, 3))] + _bn("layer3.1.bn1", 256)
    + [("layer3.1.conv2.weight", (256, 256, 3, 3))] + _bn("layer3.1.bn2", 256)
    + [("layer4.0.conv1.weight", (512, 256, 3, 3))] + _bn("layer4.0.bn1", 512)
    + [("layer4.0.conv2.weight", (512, 512, 3, 3))] + _bn("layer4.0.bn2", 512)
    + [("layer4.0.downsample.0.weight", (512, 256, 1, 1))] + _bn("layer4.0.downsample.1", 512)
    + [("layer4.1.conv1.weight", (512, 512, 3, 3))] + _bn("layer4.1.bn1", 512)
    + [("layer4.1.conv2.weight", (512, 512, 3, 3))] + _bn("layer4.1.bn2", 512)
    + [("fc.weight", (1000, 512)), ("fc.bias", (1000,))]
)


def test_resnet18_state_dict_equals_torchvision() -> None:
    assert list(shapes(meta_model("resnet18", 1000, image_size=224)).items()) == TORCHVISION_RESNET18
    # The CIFAR stem keeps every name; only conv1's kernel is 3x3.
    cifar = shapes(meta_model("resnet18", 1000, image_size=32))
    assert list(cifar) == [k for k, _ in TORCHVISION_RESNET18]
    assert cifar["conv1.weight"] == (64, 3, 3, 3)


# Sample entries of torchvision's state dicts (names and shapes from its definitions).
TORCHVISION_SAMPLES = {
    "resnet50": {"layer1.0.conv3.weight": (256, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                 "layer2.0.conv2.weight": (128, 128, 3, 3), "layer4.2.bn3.running_var": (2048,),
                 "fc.weight": (1000, 2048)},
    "resnet152": {"layer3.35.conv3.weight": (1024, 256, 1, 1), "layer2.7.bn2.weight": (128,)},
    "densenet121": {"features.conv0.weight": (64, 3, 7, 7), "features.norm0.running_mean": (64,),
                    "features.denseblock1.denselayer1.norm1.weight": (64,),
                    "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
                    "features.denseblock1.denselayer6.conv2.weight": (32, 128, 3, 3),
                    "features.transition1.conv.weight": (128, 256, 1, 1),
                    "features.denseblock3.denselayer24.norm1.weight": (992,),
                    "features.transition3.conv.weight": (512, 1024, 1, 1),
                    "features.denseblock4.denselayer16.conv2.weight": (32, 128, 3, 3),
                    "features.norm5.weight": (1024,), "classifier.weight": (1000, 1024)},
    "mobilenetv3_small": {"features.0.0.weight": (16, 3, 3, 3), "features.0.1.running_mean": (16,),
                          "features.1.block.0.0.weight": (16, 1, 3, 3), "features.1.block.1.fc1.weight": (8, 16, 1, 1),
                          "features.1.block.1.fc2.bias": (16,), "features.1.block.2.0.weight": (16, 16, 1, 1),
                          "features.4.block.2.fc1.weight": (24, 96, 1, 1), "features.11.block.3.0.weight": (96, 576, 1, 1),
                          "features.12.0.weight": (576, 96, 1, 1), "classifier.0.weight": (1024, 576),
                          "classifier.3.weight": (1000, 1024)},
    "mobilenetv3_large": {"features.1.block.0.0.weight": (16, 1, 3, 3), "features.2.block.0.0.weight": (64, 16, 1, 1),
                          "features.4.block.2.fc1.weight": (24, 72, 1, 1), "features.16.0.weight": (960, 160, 1, 1),
                          "classifier.0.weight": (1280, 960), "classifier.3.bias": (1000,)},
    "vit_b16": {"conv_proj.weight": (768, 3, 16, 16), "conv_proj.bias": (768,), "class_token": (1, 1, 768),
                "encoder.pos_embedding": (1, 197, 768),
                "encoder.layers.encoder_layer_0.ln_1.weight": (768,),
                "encoder.layers.encoder_layer_0.self_attention.in_proj_weight": (2304, 768),
                "encoder.layers.encoder_layer_0.self_attention.in_proj_bias": (2304,),
                "encoder.layers.encoder_layer_0.self_attention.out_proj.weight": (768, 768),
                "encoder.layers.encoder_layer_0.mlp.0.weight": (3072, 768),
                "encoder.layers.encoder_layer_11.mlp.3.weight": (768, 3072),
                "encoder.layers.encoder_layer_11.ln_2.bias": (768,), "encoder.ln.weight": (768,),
                "heads.head.weight": (1000, 768), "heads.head.bias": (1000,)},
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_SAMPLES))
def test_torchvision_names_and_shapes(name: str) -> None:
    got = shapes(meta_model(name, 1000, image_size=224))
    for key, shape in TORCHVISION_SAMPLES[name].items():
        assert got.get(key) == shape, key


# --- stems ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, stem", [(28, "cifar"), (32, "cifar"), (64, "cifar"), (96, "imagenet"),
                                        (224, "imagenet"), ((32, 200), "cifar")])
def test_stem_follows_image_size(size, stem: str) -> None:
    resnet = meta_model("resnet50", image_size=size)
    assert resnet.stem_kind == stem
    assert resnet.conv1.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))
    assert resnet.conv1.stride == ((2, 2) if stem == "imagenet" else (1, 1))
    assert isinstance(resnet.maxpool, nn.MaxPool2d if stem == "imagenet" else nn.Identity)
    dense = meta_model("densenet121", image_size=size)
    assert dense.features.conv0.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))
    assert isinstance(dense.features.pool0, nn.MaxPool2d if stem == "imagenet" else nn.Identity)
    mobile = meta_model("mobilenetv3_small", image_size=size)
    assert mobile.features[0][0].stride == ((2, 2) if stem == "imagenet" else (1, 1))


def test_default_stem_is_cifar_and_can_be_forced() -> None:
    assert meta_model("resnet18").stem_kind == "cifar"
    assert meta_model("resnet18", image_size=32, stem="imagenet").stem_kind == "imagenet"
    with pytest.raises(ModelError, match="stem must be one of"):
        meta_model("resnet18", stem="tiny")


# --- forward and backward on the CPU ------------------------------------------------------------------
# Small inputs where the architecture allows: the CIFAR stems take 16x16 (layer4 at 2x2); ViT-B/16 needs
# multiples of 16. The biggest networks still take seconds on a busy 2-core CPU: marked slow.
SLOW = {"resnet50", "resnet101", "resnet152", "densenet121", "wrn28_8", "vit_b16", "vit_small_p4"}
INPUT_SIDE = {"vit_b16": 32}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS])
def test_forward_backward_and_output_shape(name: str) -> None:
    torch.manual_seed(0)
    side = INPUT_SIDE.get(name, 16)
    model = create_model(name, num_classes=7, in_channels=3, image_size=side).train()
    x, y = torch.randn(2, 3, side, side), torch.tensor([1, 5])
    nn.functional.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    model.eval()
    with torch.no_grad():
        out, features = model(x), model.forward_features(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert features.shape == (2, model.num_features)
    head = model.get_submodule(model.head_name)
    torch.testing.assert_close(head(features), out)


def test_imagenet_stem_forward() -> None:
    for name in ("resnet18", "mobilenetv3_small"):
        model = create_model(name, 3, image_size=96).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 96, 96)).shape == (1, 3)


def test_grayscale_input() -> None:
    model = create_model("resnet18", 4, in_channels=1, image_size=28).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)


# --- ViT specifics -------------------------------------------------------------------------------------
def test_vit_takes_other_sizes_by_resizing_its_position_embedding() -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny_p4", 5, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 24)).shape == (2, 5)
    pe = model.encoder.pos_embedding.detach()
    assert resize_pos_embedding(pe, (8, 8)) is pe
    small = resize_pos_embedding(pe, (4, 4))
    assert small.shape == (1, 17, 192)
    torch.testing.assert_close(small[:, 0], pe[:, 0])  # the class token's entry is kept
    # A constant grid stays constant under bicubic resizing.
    const = torch.cat([pe[:, :1], torch.full((1, 64, 192), 0.5)], 1)
    torch.testing.assert_close(resize_pos_embedding(const, (5, 5))[:, 1:], torch.full((1, 25, 192), 0.5))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 18, 18))


def test_vit_needs_a_size_that_is_a_multiple_of_its_patch() -> None:
    with pytest.raises(ModelError, match="cannot build vit_b16.*multiple of the patch size 16"):
        meta_model("vit_b16", image_size=28)


# --- weight decay --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_weight_decay_on_kernels_only(name: str) -> None:
    model = meta_model(name)
    decay, no_decay = parameter_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    ids = {id(p): n for n, p in named.items()}
    decayed = {ids[id(p)] for p in decay["params"]}
    not_decayed = {ids[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(not_decayed) and decayed | not_decayed == set(named)
    # Kernels are exactly the parameters with two or more dimensions, except a ViT's position embedding and
    # class token; norm weights and biases are vectors.
    expected = {n for n, p in named.items() if p.ndim >= 2 and n not in ("class_token", "encoder.pos_embedding")}
    assert decayed == expected
    if name.startswith("vit"):
        assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in decayed
        assert {"class_token", "encoder.pos_embedding", "encoder.ln.weight"} <= not_decayed


# --- FLOPs ---------------------------------------------------------------------------------------------
def test_flops_are_twice_the_multiply_adds() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    macs = 8 * 3 * 9 * 10 * 10 + 800 * 5
    assert count_flops(model, (3, 10, 10)) == 2 * macs


# torchvision's published "GFLOPS" are multiply-adds per 224x224 image.
@pytest.mark.parametrize("name, gmacs", [("resnet18", 1.81), ("resnet50", 4.09), ("densenet121", 2.83),
                                         ("mobilenetv3_large", 0.22), ("vit_b16", 17.56)])
def test_flops_match_published_multiply_adds(name: str, gmacs: float) -> None:
    flops = count_flops(meta_model(name, 1000, image_size=224), (3, 224, 224))
    assert flops / 2e9 == pytest.approx(gmacs, rel=0.02)


def test_describe_models_reports_what_cannot_be_built() -> None:
    rows = {r.name: r for r in describe_models((1, 28, 28), 10, ["resnet18", "vit_b16", "vit_tiny_p4"])}
    assert rows["resnet18"].parameters == count_parameters(meta_model("resnet18", in_channels=1))
    assert rows["resnet18"].note == "cifar stem" and rows["resnet18"].flops > 0
    assert rows["vit_b16"].parameters is None and "multiple of the patch size" in rows["vit_b16"].note
    assert rows["vit_tiny_p4"].flops > 0


@pytest.mark.slow
def test_models_command(capsys) -> None:
    assert main(["models", "--dataset", "stl10"]) == 0
    out = capsys.readouterr().out
    assert "input 3x96x96, 10 classes" in out
    for name in MODELS:
        assert f"\n{name} " in out
    assert "imagenet stem" in out
    assert f"{5_929_434:,}" in out  # wrn37_2, whose count does not depend on the input size


def test_models_command_bad_input(capsys) -> None:
    assert main(["models", "--input-size", "3,32"]) == 2
    assert "C,H,W" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["models", "--dataset", "cifar10", "--input-size", "3,32,32"])
