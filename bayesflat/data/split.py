"""The split object every loader returns, its normalisation and the stratified splitting.

Storage: images stay as read, uint8 pixel values 0..255 for image formats, and
are turned into model inputs only when used, a batch at a time (the training
:class:`~bayesflat.data.ImageDataset`) or once per evaluation set
(:meth:`DataSplit.inputs`). The model input of a pixel of channel ``c`` is

    z = (v - mean_c) / std_c,    v = pixel / 255 (uint8) or the stored float value,

with ``v`` the intensity as a fraction of full scale and ``mean_c``, ``std_c``
the per-channel mean and standard deviation of the training split's
intensities. Why uint8: CIFAR-10's 50,000 training images take
50,000 x 3,072 B = 154 MB as uint8 but 614 MB as float32 (SVHN's 73,257: 225 MB
against 900 MB), while standardising a minibatch of 128 costs 128 x 3,072
multiply-adds, nothing beside one ResNet-18 forward pass (0.56 GFLOP per image).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from bayesflat.data.packaged import stratified_indices

__all__ = ["DataSplit", "DigitsData", "channel_stats"]

# Images per chunk when accumulating statistics of float data: bounds the float64 copy.
_CHUNK = 4096


def intensities(x: torch.Tensor) -> torch.Tensor:
    """Intensity as a fraction of full scale: ``x / 255`` for uint8, float values unchanged.

    Returns a float32 tensor, ``x`` itself when it already is one.
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of intensities, over images and pixels.

    ``mean_c = (1 / M) sum_i v_i`` and ``std_c = sqrt((1 / M) sum_i (v_i - mean_c)^2)``
    (population, ``ddof = 0``) over the ``M = n * H * W`` intensities ``v`` of
    channel ``c`` (``v = pixel / 255`` for uint8). uint8 images are counted
    exactly with a 256-bin histogram per channel; float images are summed in
    float64, in chunks of images. Rows ``(n, d)`` count as one channel. A
    channel of zero spread gets ``std_c = 1``, so standardising leaves it finite.

    Parameters
    ----------
    x : torch.Tensor
        Images ``(n, C, H, W)`` or rows ``(n, d)``, at least one.

    Returns
    -------
    mean, std : torch.Tensor
        float32, shape ``(C,)``, in intensity units (fractions of full scale).
    """
    if len(x) == 0:
        raise ValueError("channel statistics need at least one training image")
    channels = x.shape[1] if x.dim() == 4 else 1
    mean = torch.empty(channels, dtype=torch.float64)
    var = torch.empty(channels, dtype=torch.float64)
    if x.dtype == torch.uint8:
        levels = torch.arange(256, dtype=torch.float64) / 255.0
        for c in range(channels):
            values = x[:, c] if x.dim() == 4 else x
            counts = torch.bincount(values.reshape(-1), minlength=256).double()
            total = counts.sum()
            mean[c] = (counts * levels).sum() / total
            var[c] = (counts * (levels - mean[c]) ** 2).sum() / total
    else:
        rows = x.reshape(len(x), channels, -1)
        count = rows.shape[0] * rows.shape[2]
        total = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, len(rows), _CHUNK):
            total += rows[start : start + _CHUNK].double().sum(dim=(0, 2))
        mean = total / count
        squares = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK].double() - mean[:, None]
            squares += (chunk * chunk).sum(dim=(0, 2))
        var = squares / count
    std = var.sqrt()
    std[std == 0] = 1.0
    return mean.float(), std.float()


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Model inputs ``(v - mean_c) / std_c`` of images or rows, ``v`` = :func:`intensities`.

    ``x`` is ``(n, C, ...)`` or rows ``(n, C * k)`` laid out channel-major;
    ``mean`` and ``std`` have ``C`` entries. Always returns a new float32 tensor.
    """
    channels = mean.numel()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)
    if len(out) == 0:
        return out
    if out[0].numel() % channels:
        raise ValueError(
            f"inputs of shape {tuple(x.shape[1:])} do not split into {channels} channels"
        )
    if x.dtype == torch.uint8:
        out.div_(255.0)
    view = out.view(len(out), channels, -1)
    view.sub_(mean.to(out.device)[:, None]).div_(std.to(out.device)[:, None])
    return out


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class DataSplit:
    """A fixed train/validation/test split of a labelled image set, with its normalisation.

    Every loader returns one: :func:`bayesflat.data.load` for files,
    :func:`bayesflat.data.load_digits_split` for the embedded digits.
    ``DigitsData`` is another name for this class.

    Attributes
    ----------
    x_train, x_val, x_test : torch.Tensor
        Images as stored, ``(n, C, H, W)``: uint8 pixel values 0..255 from image
        files, float32 intensities in [0, 1] for digits (also ``(n, 64)`` rows).
        ``x_val`` has ``n = 0`` when no validation split was asked for. Feed the
        model :meth:`inputs` of them, or use :meth:`eval_sets` and
        :meth:`train_dataset`.
    y_train, y_val, y_test : torch.Tensor
        int64 labels in ``0 .. num_classes - 1``, shape ``(n,)``.
    classes : tuple
        What each label stands for: label ``k`` is ``classes[k]`` (a digit for
        digits, a class name for files).
    x_heldout, y_heldout : torch.Tensor
        Test images of classes left out of training and their original classes
        (digits with ``classes=``); empty otherwise.
    heldout_classes : tuple of int
        The digits left out of training, ascending; empty otherwise.
    image_shape : tuple of int
        Height and width of one image, in pixels.
    mean, std : torch.Tensor
        float32 ``(C,)``: the standardisation ``z = (v - mean_c) / std_c`` of
        intensities ``v`` (fractions of full scale) that :meth:`inputs`
        applies; statistics of the training split for files, ``0`` and ``1``
        (inputs used as stored) for digits.
    source : str
        Where the data came from, ``"<format>:<path>"`` or ``"digits"``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple
    x_heldout: torch.Tensor
    y_heldout: torch.Tensor
    heldout_classes: tuple[int, ...] = ()
    image_shape: tuple[int, ...]
    mean: torch.Tensor
    std: torch.Tensor
    source: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes the model is trained on."""
        return len(self.classes)

    @property
    def num_train(self) -> int:
        """Training-set size N, the ``num_data`` of the posterior."""
        return int(self.y_train.shape[0])

    @property
    def class_names(self) -> tuple[str, ...]:
        """``classes`` as strings, e.g. for plots and trace attributes."""
        return tuple(str(c) for c in self.classes)

    @property
    def channels(self) -> int:
        """Number of image channels C (the ``in_channels`` of a convolutional model)."""
        return int(self.mean.numel())

    @property
    def standardized(self) -> bool:
        """Whether :meth:`inputs` standardises (False: intensities used as stored)."""
        return not (bool((self.mean == 0).all()) and bool((self.std == 1).all()))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs of images: ``(v - mean_c) / std_c`` with ``v`` their intensities.

        Parameters
        ----------
        x : torch.Tensor
            Images laid out like ``x_test``: uint8 pixel values (``v = x / 255``)
            or float intensities (``v = x``), e.g. ``x_test`` or an OOD set.

        Returns
        -------
        torch.Tensor
            float32 of the shape of ``x``; ``x`` itself (as float32) when the
            split does not standardise.
        """
        if tuple(x.shape[1:]) != tuple(self.x_train.shape[1:]):
            raise ValueError(
                f"inputs must be laid out like the training images, (n, "
                f"{', '.join(map(str, self.x_train.shape[1:]))}); got {tuple(x.shape)}"
            )
        if not self.standardized:
            return intensities(x)
        return standardize(x, self.mean, self.std)

    def eval_sets(self) -> OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Labelled evaluation sets as model inputs: ``"test"``, and ``"val"`` when not empty.

        Returns
        -------
        OrderedDict of str to (torch.Tensor, torch.Tensor)
            Name to ``(inputs, labels)``, inputs from :meth:`inputs`; the form
            the driver's ``eval_sets`` takes.
        """
        sets = OrderedDict(test=(self.inputs(self.x_test), self.y_test))
        if len(self.y_val):
            sets["val"] = (self.inputs(self.x_val), self.y_val)
        return sets

    def train_dataset(self, *, augment: bool = False, padding: int = 4, flip: bool = True):
        """The training split as a Dataset that standardises, and optionally augments, per batch.

        Parameters
        ----------
        augment : bool, default False
            Apply a random crop of the image zero-padded by ``padding`` pixels
            and, with ``flip``, a random horizontal flip (the CIFAR recipe).
            Augmentation changes the likelihood being sampled: each step sees
            a random transform of the data, not the data.
        padding : int, default 4
            Zero padding of the random crop, in pixels (4 for 32x32 CIFAR).
        flip : bool, default True
            Include the horizontal flip; turn it off for digits and text,
            whose mirror images are other symbols.

        Returns
        -------
        ImageDataset
            Map-style; ``batch(indices)`` is its fast path.
        """
        from bayesflat.data.datasets import (
            Compose,
            ImageDataset,
            RandomCrop,
            RandomHorizontalFlip,
        )

        transform = None
        if augment:
            steps = [RandomCrop(padding)] + ([RandomHorizontalFlip()] if flip else [])
            transform = Compose(*steps)
        mean, std = (self.mean, self.std) if self.standardized else (None, None)
        return ImageDataset(self.x_train, self.y_train, mean=mean, std=std, transform=transform)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{name}={tuple(getattr(self, name).shape)}"
            for name in ("x_train", "x_val", "x_test", "x_heldout")
        )
        classes = self.classes if len(self.classes) <= 10 else f"<{len(self.classes)} classes>"
        source = f", source={self.source!r}" if self.source else ""
        return f"DataSplit({sizes}, classes={classes}{source})"


DigitsData = DataSplit


def check_fraction(name: str, value: object, *, allow_zero: bool) -> float:
    """Return ``value`` as a float in ``[0, 1)`` (``allow_zero``) or ``(0, 1)``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not ((value >= 0 if allow_zero else value > 0) and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be a fraction in {interval}, got {value!r}")
    return float(value)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, argname: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, taken)`` of a stratified split taking ``ceil(fraction * n)`` examples.

    ``sklearn.model_selection.train_test_split`` with ``stratify=labels`` and
    ``random_state=seed`` (:func:`~bayesflat.data.packaged.stratified_indices`, the same
    split without importing scikit-learn): each class keeps its share in both parts, and
    the same seed gives the same split.
    """
    try:
        kept, taken = stratified_indices(labels, fraction, seed)
    except ValueError as err:
        raise ValueError(
            f"{argname}={fraction} cannot split {len(labels)} examples of "
            f"{len(np.unique(labels))} classes stratified by class ({err}); "
            f"every class needs at least 2 examples and each part at least one per class"
        ) from err
    return kept, taken
