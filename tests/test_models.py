import pytest
import torch
from torch import nn

from bayesflat.models import (
    MLP,
    ConvNet32,
    SmallCNN,
    available_models,
    build_model,
    reset_parameters,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    assert n_params(MLP()) == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10 == 26_122
    assert n_params(MLP(hidden=())) == 64 * 10 + 10
    assert n_params(MLP(in_features=20, hidden=(5,), num_classes=3)) == 20 * 5 + 5 + 5 * 3 + 3
    conv1, conv2, head = 1 * 16 * 9 + 16, 16 * 32 * 9 + 32, 32 * 4 * 4 * 10 + 10
    assert n_params(SmallCNN()) == conv1 + conv2 + head == 9_930
    # BatchNorm drops the conv biases and adds a scale and shift per channel
    assert n_params(SmallCNN(batch_norm=True)) == 9_930 - 16 - 32 + 2 * (16 + 32)
    convs = 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9
    bn = 2 * (32 + 32 + 64 + 64 + 128 + 128)
    assert n_params(ConvNet32()) == convs + bn + 128 * 10 + 10 == 288_746


@pytest.mark.parametrize(
    ("model", "flat", "image"),
    [
        (MLP(), (5, 64), (5, 1, 8, 8)),
        (SmallCNN(), (5, 64), (5, 1, 8, 8)),
        (SmallCNN(batch_norm=True), (5, 64), (5, 1, 8, 8)),
        (SmallCNN(in_channels=3, num_classes=4, image_size=6), (5, 108), (5, 3, 6, 6)),
        (ConvNet32(), (5, 3072), (5, 3, 32, 32)),
    ],
)
def test_output_shapes_flat_and_image(model, flat, image):
    model.eval()
    x = torch.rand(image)
    out = model(x)
    n_classes = model(x[:1]).shape[1]
    assert out.shape == (5, n_classes) and out.dtype == torch.float32
    torch.testing.assert_close(model(x.reshape(flat)), out)


def test_cnn_rejects_wrong_input():
    with pytest.raises(ValueError, match="expected 1\\*8\\*8 = 64"):
        SmallCNN()(torch.rand(2, 63))
    with pytest.raises(ValueError, match="got shape"):
        SmallCNN()(torch.rand(2, 8, 8))


@pytest.mark.parametrize("name", ["mlp", "cnn", "convnet32"])
def test_deterministic_under_seed(name):
    torch.manual_seed(0)
    a = build_model(name)
    torch.manual_seed(0)
    b = build_model(name)
    torch.manual_seed(1)
    c = build_model(name)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize("name", ["mlp", "cnn", "convnet32"])
def test_reset_parameters_reinitialises(name):
    torch.manual_seed(0)
    model = build_model(name)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            assert callable(getattr(module, "reset_parameters", None)), module
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if name == "convnet32":
        model.train()
        model(torch.rand(4, 3, 32, 32))  # moves BatchNorm running statistics
    torch.manual_seed(0)
    assert reset_parameters(model) is model
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key]), key


def test_reset_parameters_requires_method():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match="'1' \\(Scale\\) owns parameters"):
        reset_parameters(nn.Sequential(nn.Linear(3, 3), Scale()))


def test_build_model():
    assert available_models() == ("cnn", "convnet32", "mlp")
    assert isinstance(build_model("mlp"), MLP)
    assert isinstance(build_model("CNN", width=4, batch_norm=True), SmallCNN)
    assert isinstance(build_model("convnet32", width=8), ConvNet32)
    mlp = build_model("mlp", hidden=(32,), activation="tanh")
    assert isinstance(mlp[2], nn.Tanh) and mlp[1].out_features == 32


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'; available: cnn, convnet32, mlp"):
        build_model("resnet")
    with pytest.raises(TypeError, match="must be a str"):
        build_model(MLP)
    with pytest.raises(TypeError):
        build_model("mlp", depth=3)
    with pytest.raises(ValueError, match="unknown activation 'swish'; available: relu"):
        build_model("mlp", activation="swish")
    with pytest.raises(ValueError, match="hidden width must be an integer >= 1"):
        MLP(hidden=(128, 0))
    with pytest.raises(ValueError, match="num_classes"):
        SmallCNN(num_classes=0)
    with pytest.raises(ValueError, match="even"):
        SmallCNN(image_size=7)
    with pytest.raises(ValueError, match="width"):
        ConvNet32(width=0)
