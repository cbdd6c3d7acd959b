"""Data: the embedded digits, users' own image sets, OOD sets, training Datasets.

Nothing is downloaded. :func:`load_digits_split` gives the embedded digits;
:func:`load` reads a user's data set from a file or folder (CIFAR-10/100 binary
or python batches, SVHN ``.mat``, class folders of images, ``.npz``, IDX) and
splits and normalises it. Both return a :class:`DataSplit`: train/validation/
test tensors, class names, the normalisation, and the ways to feed a model::

    data = load("cifar-10-batches-bin", val_size=0.1)
    train = data.train_dataset(augment=True)      # Dataset: crop + flip, standardised
    eval_sets = data.eval_sets()                  # {"test": (x, y), "val": (x, y)}
    eval_sets["ood_svhn"] = load_ood("svhn/test_32x32.mat", data)
    model = build_model("resnet18", num_classes=data.num_classes, in_channels=data.channels)

OOD sets are generated (:func:`ood_sets`: natural-image patches, noise) or read
(:func:`load_ood`). The ``write_*`` functions write each format from its
specification, for tests and benchmarks that need small files.

Modules: ``split`` (:class:`DataSplit`, statistics, splitting), ``digits``,
``ood``, ``datasets`` (:class:`ImageDataset` and batch transforms), ``load``
(format detection), and one module per format: ``cifar``, ``svhn``,
``folder``, ``npz``, ``idx``.
"""

from bayesflat.data._common import LabelledImages
from bayesflat.data.cifar import (
    read_cifar_binary,
    read_cifar_python,
    write_cifar_binary,
    write_cifar_folder,
    write_cifar_python,
)
from bayesflat.data.datasets import Compose, ImageDataset, RandomCrop, RandomHorizontalFlip
from bayesflat.data.digits import load_digits_split
from bayesflat.data.folder import read_image_folder, write_image_folder
from bayesflat.data.idx import load_idx, write_idx
from bayesflat.data.load import available_formats, detect_format, load
from bayesflat.data.npz import load_npz, read_npz
from bayesflat.data.ood import (
    available_ood_sets,
    gaussian_noise,
    image_patches,
    load_ood,
    ood_sets,
    uniform_noise,
)
from bayesflat.data.split import DataSplit, DigitsData, channel_stats
from bayesflat.data.svhn import read_svhn_mat, write_svhn_mat

__all__ = [
    "Compose",
    "DataSplit",
    "DigitsData",
    "ImageDataset",
    "LabelledImages",
    "RandomCrop",
    "RandomHorizontalFlip",
    "available_formats",
    "available_ood_sets",
    "channel_stats",
    "detect_format",
    "gaussian_noise",
    "image_patches",
    "load",
    "load_digits_split",
    "load_idx",
    "load_npz",
    "load_ood",
    "ood_sets",
    "read_cifar_binary",
    "read_cifar_python",
    "read_image_folder",
    "read_npz",
    "read_svhn_mat",
    "uniform_noise",
    "write_cifar_binary",
    "write_cifar_folder",
    "write_cifar_python",
    "write_idx",
    "write_image_folder",
    "write_svhn_mat",
]
