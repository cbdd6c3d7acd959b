"""Reference networks: an MLP and a small CNN for 8x8 digits, CNNs for 32x32 colour images.

Every network returns logits ``(n, num_classes)`` (unnormalised log-probabilities;
the likelihood applies the softmax) and accepts both flat rows ``(n, C*H*W)``
and images ``(n, C, H, W)``, so one data object feeds any of them. All layers
are standard ``torch.nn`` layers: initialisation is PyTorch's (deterministic
under ``torch.manual_seed``), and :func:`reset_parameters` re-draws it, e.g. to
start a new chain.
"""

from __future__ import annotations

import torch
from torch import nn

from bayesflat._checks import check_int

__all__ = [
    "MLP",
    "BasicBlock",
    "ConvNet32",
    "ResNet18",
    "SmallCNN",
    "available_models",
    "build_model",
    "reset_parameters",
    "resnet18",
]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; available: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _as_images(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Reshape flat rows ``(n, C*H*W)`` to images ``(n, C, H, W)``; pass images through."""
    if x.dim() == 2:
        if x.shape[1] != channels * size * size:
            raise ValueError(
                f"flat input has {x.shape[1]} features; expected {channels}*{size}*{size} = "
                f"{channels * size * size}"
            )
        return x.view(x.shape[0], channels, size, size)
    if x.dim() != 4:
        raise ValueError(
            f"input must be (n, {channels * size * size}) or (n, {channels}, {size}, {size}), "
            f"got shape {tuple(x.shape)}"
        )
    return x


class MLP(nn.Sequential):
    """Fully connected classifier ``in_features -> hidden... -> num_classes``.

    Each hidden layer is ``Linear`` followed by the activation; the last layer
    is ``Linear`` with no activation (logits). Inputs of any shape ``(n, ...)``
    are flattened to ``(n, in_features)``. The digits default, 64-128-128-10,
    has ``64*128+128 + 128*128+128 + 128*10+10 = 26,122`` parameters.

    Parameters
    ----------
    in_features : int, default 64
        Input size (8x8 pixels for digits).
    hidden : sequence of int, default (128, 128)
        Width of each hidden layer; empty gives multinomial logistic regression.
    num_classes : int, default 10
        Number of output logits.
    activation : {"relu", "tanh", "gelu", "silu", "elu", "softplus"}, default "relu"
        Nonlinearity after each hidden layer.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden=(128, 128),
        num_classes: int = 10,
        activation: str = "relu",
    ):
        widths = [check_int(in_features, "in_features", 1)]
        widths += [check_int(h, "hidden width", 1) for h in hidden]
        widths.append(check_int(num_classes, "num_classes", 1))
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(w_in, w_out))
            if i < len(widths) - 2:
                layers.append(_activation(activation))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Small convolutional classifier for ``in_channels x 8 x 8`` images.

    ``conv3x3(width) -> [BN] -> ReLU -> conv3x3(2*width) -> [BN] -> ReLU ->
    maxpool2 -> Linear(2*width * 4*4 -> num_classes)``; convolutions are padded
    to keep the spatial size. With the defaults (width 16, no BatchNorm) it has
    ``160 + 4,640 + 5,130 = 9,930`` parameters.

    Parameters
    ----------
    in_channels : int, default 1
        Input channels.
    num_classes : int, default 10
        Number of output logits.
    width : int, default 16
        Channels of the first convolution; the second has ``2 * width``.
    batch_norm : bool, default False
        Insert ``BatchNorm2d`` after each convolution (whose bias is then dropped).
    image_size : int, default 8
        Height and width of the input, in pixels; even.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        batch_norm: bool = False,
        image_size: int = 8,
    ):
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.image_size = check_int(image_size, "image_size", 1)
        if image_size % 2:
            raise ValueError(f"image_size must be even (one 2x2 pooling), got {image_size}")
        check_int(num_classes, "num_classes", 1)
        check_int(width, "width", 1)
        self.features = nn.Sequential(
            *_conv_block(in_channels, width, batch_norm),
            *_conv_block(width, 2 * width, batch_norm),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width * (image_size // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` of inputs ``(n, C*H*W)`` or ``(n, C, H, W)``."""
        return self.classifier(self.features(_as_images(x, self.in_channels, self.image_size)))


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


class ConvNet32(nn.Module):
    """Small VGG-style classifier for ``in_channels x 32 x 32`` images (CIFAR-sized).

    Three stages of two ``conv3x3 -> BatchNorm -> ReLU`` blocks with ``width``,
    ``2*width``, ``4*width`` channels, a 2x2 max-pool after the first two stages,
    global average pooling, and a ``Linear(4*width -> num_classes)`` head. With
    the defaults (width 32) it has 288,746 parameters.

    Parameters
    ----------
    in_channels : int, default 3
        Input channels.
    num_classes : int, default 10
        Number of output logits.
    width : int, default 32
        Channels of the first stage.
    """

    image_size = 32

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels", 1)
        check_int(num_classes, "num_classes", 1)
        check_int(width, "width", 1)
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            *_conv_block(in_channels, w1, True),
            *_conv_block(w1, w1, True),
            nn.MaxPool2d(2),
            *_conv_block(w1, w2, True),
            *_conv_block(w2, w2, True),
            nn.MaxPool2d(2),
            *_conv_block(w2, w3, True),
            *_conv_block(w3, w3, True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` of inputs ``(n, C*32*32)`` or ``(n, C, 32, 32)``."""
        return self.classifier(self.features(_as_images(x, self.in_channels, self.image_size)))


class BasicBlock(nn.Module):
    """Residual block of ResNet-18/34: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    Both convolutions are 3x3 without bias (BatchNorm follows); the first has
    stride ``stride``. The shortcut is the identity when shape is kept, else a
    1x1 convolution with that stride followed by BatchNorm (He et al. 2016,
    option B).

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    stride : int, default 1
        Stride of the first convolution and of the shortcut; 2 halves height and width.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output ``(n, c_out, H / stride, W / stride)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 in its CIFAR form (He et al. 2016, arXiv:1512.03385), for 32x32 images.

    The ImageNet stem (7x7 stride-2 convolution and max-pool) is replaced by a
    3x3 stride-1 convolution without max-pool, so a 32x32 input keeps full
    resolution in the first stage: ``conv3x3(64) -> BN -> ReLU``, four stages of
    two :class:`BasicBlock` s with ``64, 128, 256, 512`` channels (stride 1, 2,
    2, 2: feature maps 32, 16, 8, 4 pixels), global average pooling, and a
    ``Linear(512 -> num_classes)`` head. Parameters for 10 classes and 3
    input channels, all 11,173,962 of them:

    - stem: ``3*64*9 = 1,728`` + BN ``2*64``;
    - stage 1: ``4 * 64*64*9 = 147,456`` + BN ``4 * 128``;
    - stage 2: ``64*128*9 + 3 * 128*128*9 + 64*128`` (1x1 shortcut) ``= 524,288`` + BN ``5 * 256``;
    - stage 3: ``128*256*9 + 3 * 256*256*9 + 128*256 = 2,097,152`` + BN ``5 * 512``;
    - stage 4: ``256*512*9 + 3 * 512*512*9 + 256*512 = 8,388,608`` + BN ``5 * 1024``;
    - head: ``512*10 + 10 = 5,130``.

    The layers keep PyTorch's default initialisation (not torchvision's
    Kaiming-normal one), so :func:`reset_parameters` re-draws exactly what the
    constructor drew.

    Parameters
    ----------
    num_classes : int, default 10
        Number of output logits.
    in_channels : int, default 3
        Input channels.
    width : int, default 64
        Channels of the first stage; the stages have ``width * (1, 2, 4, 8)``.
    image_size : int, default 32
        Height and width used to reshape flat rows ``(n, C*H*W)``; image
        batches ``(n, C, H, W)`` of any size pass through (global pooling).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 32
    ):
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.image_size = check_int(image_size, "image_size", 1)
        check_int(num_classes, "num_classes", 1)
        check_int(width, "width", 1)
        self.stem = nn.Sequential(*_conv_block(in_channels, width, True))
        stages, c_in = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = width * 2**i
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` of inputs ``(n, C*32*32)`` or ``(n, C, H, W)``."""
        x = self.stem(_as_images(x, self.in_channels, self.image_size))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.classifier(self.pool(x))


def resnet18(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ResNet18:
    """The CIFAR ResNet-18 (:class:`ResNet18`): 11,173,962 parameters for 10 classes.

    Parameters
    ----------
    num_classes : int, default 10
        Number of output logits.
    in_channels : int, default 3
        Input channels.
    **kwargs
        ``width`` and ``image_size``, passed to :class:`ResNet18`.

    Returns
    -------
    ResNet18
        The network, initialised from PyTorch's global random state.
    """
    return ResNet18(num_classes=num_classes, in_channels=in_channels, **kwargs)


_MODELS = {"mlp": MLP, "cnn": SmallCNN, "convnet32": ConvNet32, "resnet18": ResNet18}


def available_models() -> tuple[str, ...]:
    """Names :func:`build_model` accepts, sorted."""
    return tuple(sorted(_MODELS))


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a reference network by name.

    Parameters
    ----------
    name : {"mlp", "cnn", "convnet32", "resnet18"}
        :class:`MLP`, :class:`SmallCNN`, :class:`ConvNet32` or :class:`ResNet18`
        (case-insensitive).
    **kwargs
        Passed to the network's constructor.

    Returns
    -------
    torch.nn.Module
        The network, initialised from PyTorch's global random state.

    Raises
    ------
    ValueError
        Unknown name; the message lists the available ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _MODELS[key](**kwargs)


def reset_parameters(model: nn.Module) -> nn.Module:
    """Re-initialise every parameter of ``model`` in place, as at construction.

    Calls ``reset_parameters()`` on each submodule that owns parameters (for
    BatchNorm this also resets the running statistics). The draw comes from
    PyTorch's global random state: seed it with ``torch.manual_seed`` first for
    a reproducible chain start.

    Parameters
    ----------
    model : torch.nn.Module
        The network.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        A submodule owns parameters but has no ``reset_parameters()``.
    """
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        reset = getattr(module, "reset_parameters", None)
        if not callable(reset):
            raise TypeError(
                f"submodule {name or '<root>'!r} ({type(module).__name__}) owns parameters "
                "but has no reset_parameters(); it cannot be re-initialised"
            )
        reset()
    return model
