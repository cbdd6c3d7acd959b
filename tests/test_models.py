import pytest
import torch
from torch import nn

from bayesflat.models import (
    MLP,
    ConvNet32,
    ResNet18,
    SmallCNN,
    available_models,
    build_model,
    reset_parameters,
    resnet18,
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
        (ResNet18(width=4), (5, 3072), (5, 3, 32, 32)),
        (ResNet18(num_classes=3, in_channels=1, width=4, image_size=8), (5, 64), (5, 1, 8, 8)),
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


@pytest.mark.parametrize("name", ["mlp", "cnn", "convnet32", "resnet18"])
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


@pytest.mark.parametrize("name", ["mlp", "cnn", "convnet32", "resnet18"])
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
    if name in ("convnet32", "resnet18"):
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
    assert available_models() == ("cnn", "convnet32", "mlp", "resnet18")
    assert isinstance(build_model("mlp"), MLP)
    assert isinstance(build_model("CNN", width=4, batch_norm=True), SmallCNN)
    assert isinstance(build_model("convnet32", width=8), ConvNet32)
    mlp = build_model("mlp", hidden=(32,), activation="tanh")
    assert isinstance(mlp[2], nn.Tanh) and mlp[1].out_features == 32


def test_build_model_errors():
    with pytest.raises(
        ValueError, match="unknown model 'resnet'; available: cnn, convnet32, mlp, resnet18"
    ):
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


def test_resnet18_parameter_count():
    # stem conv + BN; per stage: 3x3 convs, the 1x1 shortcut from stage 2 on, BN scale and shift
    stem = 3 * 64 * 9 + 2 * 64
    stages = 4 * 64 * 64 * 9 + 4 * 2 * 64
    for c_in, c in ((64, 128), (128, 256), (256, 512)):
        stages += c_in * c * 9 + 3 * c * c * 9 + c_in * c + 5 * 2 * c
    assert n_params(resnet18()) == stem + stages + 512 * 10 + 10 == 11_173_962
    assert n_params(resnet18(num_classes=100)) == 11_173_962 + 512 * 90 + 90
    assert n_params(resnet18(in_channels=1)) == 11_173_962 - 2 * 64 * 9
    model = build_model("ResNet18", num_classes=100)
    assert isinstance(model, ResNet18) and model.classifier.out_features == 100


def test_resnet18_cifar_layout():
    model = resnet18().eval()
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    sizes = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
    ]
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 10)
    assert sizes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]


def test_resnet18_batchnorm_train_and_eval():
    torch.manual_seed(0)
    model = resnet18(width=8)
    x = torch.rand(6, 3, 16, 16)
    bn = model.stem[1]
    model.train()
    with torch.no_grad():
        batch = model(x)
        # training mode normalises with the batch's statistics: an example's logits
        # depend on the rest of the batch, and the running statistics move
        assert not torch.allclose(model(x[:3])[0], batch[0], atol=1e-4)
    assert int(bn.num_batches_tracked) == 2 and not torch.equal(bn.running_mean, torch.zeros(8))
    model.eval()
    running = bn.running_mean.clone()
    with torch.no_grad():
        evaluated = model(x)
        torch.testing.assert_close(model(x[:3]), evaluated[:3])  # per-example in eval mode
    assert torch.equal(bn.running_mean, running) and int(bn.num_batches_tracked) == 2


def test_resnet18_forward_backward():
    torch.manual_seed(1)
    model = resnet18(num_classes=4).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stem[0].weight.grad.abs().sum() > 0 and model.classifier.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expected 3\\*32\\*32 = 3072"):
        model(torch.rand(2, 100))
