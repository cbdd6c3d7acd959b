"""One entry point for users' own data: recognise the format, read, split, normalise."""

from __future__ import annotations

import os

import numpy as np
import torch

from bayesflat._checks import check_choice
from bayesflat.data import cifar, folder, idx, npz, svhn
from bayesflat.data._common import LabelledImages
from bayesflat.data.split import DataSplit, channel_stats, check_fraction, stratified_split

__all__ = ["available_formats", "detect_format", "load"]

_FORMATS = ("cifar-binary", "cifar-python", "svhn", "image-folder", "npz", "idx")
_PICKLE_START = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"(dp")


def available_formats() -> tuple[str, ...]:
    """Names :func:`load`'s ``format`` accepts."""
    return _FORMATS


def _folder_format(root: str) -> str | None:
    layout = cifar.cifar_layout(root)
    if layout is not None:
        return layout[0]
    if svhn.svhn_layout(root) is not None:
        return "svhn"
    if (idx.idx_layout(root) or {}).get("train_images"):
        return "idx"
    if _split_folders(root) is not None or folder.has_class_folders(root):
        return "image-folder"
    if folder.has_loose_images(root):
        return "image-folder"
    return None


def _split_folders(root: str) -> tuple[str, str] | None:
    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(train) and os.path.isdir(test) and folder.has_class_folders(train):
        return train, test
    return None


def _file_format(path: str) -> str | None:
    name = os.path.basename(path).lower()
    with open(path, "rb") as handle:
        head = handle.read(128)
    if name.endswith(".npz") or head.startswith(b"PK\x03\x04"):
        return "npz"
    if name.endswith(".mat") or head.startswith(b"MATLAB 5.0 MAT-file"):
        return "svhn"
    # Names before magic numbers: a CIFAR record may start with bytes that look like IDX's.
    if name.endswith(".bin"):
        return "cifar-binary"
    if "-ubyte" in name:
        return "idx"
    if head.startswith(_PICKLE_START):
        return "cifar-python"
    if idx.has_idx_magic(head):
        return "idx"
    return None


def _resolve(path: object, format: str | None) -> tuple[str, str]:
    """``(format, folder or file to read)``; descends into a lone subfolder of a download."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path!r}")
    if format is not None:
        check_choice(format, "format", _FORMATS)
    if os.path.isdir(path):
        found = _folder_format(path)
        subfolders = [e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
        if found is None and len(subfolders) == 1:  # e.g. <download>/cifar-10-batches-bin/
            inner = _folder_format(subfolders[0])
            if inner is not None and format in (None, inner):
                return inner, subfolders[0]
        if format is not None:
            return format, path
        if found is None:
            raise ValueError(
                f"cannot tell the data format of the folder {path!r}: expected an extracted "
                "CIFAR archive (data_batch_*.bin, test_batch.bin / train.bin, test.bin, or the "
                "python batches), SVHN's train_32x32.mat / test_32x32.mat, MNIST-style "
                "*-images-idx3-ubyte / *-labels-idx1-ubyte files, class subfolders of images, "
                f"or train/ and test/ folders of them; pass format= one of {', '.join(_FORMATS)}"
            )
        return found, path
    if format is not None:
        return format, path
    found = _file_format(path)
    if found is None:
        raise ValueError(
            f"cannot tell the data format of the file {path!r} from its name or first bytes; "
            f"pass format= one of {', '.join(_FORMATS)}"
        )
    return found, path


def detect_format(path) -> str:
    """The format :func:`load` would read ``path`` as.

    Folders are recognised by their layout (file names of an extracted CIFAR
    archive, SVHN's ``*_32x32.mat``, MNIST-style ``*-ubyte`` files, class
    subfolders of images), files by extension and first bytes (``.npz``/zip,
    ``.mat``/MATLAB header, IDX magic, ``.bin``, pickle).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The format cannot be told; the message lists the formats.
    """
    return _resolve(path, None)[0]


def read_path(
    path,
    format: str | None = None,
    *,
    label: str = "fine",
    mode: str = "auto",
    size=None,
    unlabelled: bool = False,
) -> tuple[str, LabelledImages, LabelledImages | None, str]:
    """Read ``path``: ``(format, training pool, test split or None, path read)``.

    With ``unlabelled``, a folder of images without class subfolders is read
    as one class (for OOD sets).
    """
    fmt, root = _resolve(path, format)
    if fmt in ("cifar-binary", "cifar-python"):
        if os.path.isdir(root):
            pool, test = cifar.read_cifar_folder(root, fmt, label=label)
        else:
            read = cifar.read_cifar_binary if fmt == "cifar-binary" else cifar.read_cifar_python
            pool, test = read(root, label=label), None
    elif fmt == "svhn":
        if os.path.isdir(root):
            layout = svhn.svhn_layout(root)
            if layout is None:
                raise ValueError(f"{root!r} holds neither train_32x32.mat nor test_32x32.mat")
            pool = svhn.read_svhn_mat(layout[0])
            test = svhn.read_svhn_mat(layout[1]) if layout[1] else None
        else:
            pool, test = svhn.read_svhn_mat(root), None
    elif fmt == "image-folder":
        if not os.path.isdir(root):
            raise ValueError(f"format 'image-folder' needs a folder, got the file {root!r}")
        split = _split_folders(root)
        if split is not None:
            pool = folder.read_image_folder(split[0], mode=mode, size=size)
            test = folder.read_image_folder(split[1], mode=mode, size=size, classes=pool.classes)
        elif unlabelled and not folder.has_class_folders(root) and folder.has_loose_images(root):
            pool, test = folder.read_loose_images(root, mode=mode, size=size), None
        else:
            pool, test = folder.read_image_folder(root, mode=mode, size=size), None
    elif fmt == "npz":
        pool, test = npz.read_npz(root)
    else:
        if not os.path.isdir(root):
            raise ValueError(
                f"{root!r} is a single IDX array; an IDX data set is the folder holding "
                "train-images-idx3-ubyte and train-labels-idx1-ubyte (and t10k-*): pass the folder"
            )
        pool, test = idx.read_idx_folder(root)
    if test is not None and tuple(test.x.shape[1:]) != tuple(pool.x.shape[1:]):
        raise ValueError(
            f"{root!r}: test images have shape {tuple(test.x.shape[1:])} but training images "
            f"{tuple(pool.x.shape[1:])}"
        )
    return fmt, pool, test, root


def load(
    path,
    format: str | None = None,
    *,
    val_size: float = 0.0,
    test_size: float = 0.2,
    seed: int = 0,
    label: str = "fine",
    mode: str = "auto",
    size: int | tuple[int, int] | None = None,
) -> DataSplit:
    """Load a labelled image set from a file or folder as a fixed, normalised split.

    Formats (``format=``, else recognised by :func:`detect_format`):

    - ``"cifar-binary"``: an extracted CIFAR-10/100 binary archive, or one
      ``.bin`` batch (:func:`read_cifar_binary`);
    - ``"cifar-python"``: the python version, read with a restricted
      unpickler (:func:`read_cifar_python`);
    - ``"svhn"``: a folder with ``train_32x32.mat`` (and ``test_32x32.mat``),
      or one such file (:func:`read_svhn_mat`);
    - ``"image-folder"``: class subfolders of images, or ``train/`` and
      ``test/`` folders of class subfolders (:func:`read_image_folder`);
    - ``"npz"``: arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``,
      ``classes`` (:func:`read_npz`);
    - ``"idx"``: a folder of MNIST-style IDX files (:func:`load_idx`).

    Splits: a format's own test split (CIFAR's test batch, SVHN's
    ``test_32x32.mat``, ``test/``, ``t10k-*``, ``x_test``) is the test split;
    without one, a stratified ``test_size`` fraction of the data is. The
    validation split is a stratified ``val_size`` fraction of the rest; what
    remains is the training split. Both draws are
    ``sklearn.model_selection.train_test_split`` with ``random_state=seed``,
    and each split keeps the order of the files.

    Normalisation: ``mean`` and ``std`` are the per-channel statistics of the
    training split's intensities only (:func:`channel_stats`); images stay as
    stored (uint8) and are standardised when used, ``z = (v - mean_c) / std_c``
    (see :class:`DataSplit`).

    Parameters
    ----------
    path : str or os.PathLike
        File or folder. A folder holding only one subfolder that is a data set
        (a download folder around the extracted archive) is entered.
    format : str, optional
        One of :func:`available_formats`; default detected.
    val_size : float, default 0.0
        Fraction of the training data moved to the validation split, in [0, 1).
    test_size : float, default 0.2
        Fraction held out as test split when the format has none, in (0, 1);
        ignored otherwise.
    seed : int, default 0
        Seed of the splits.
    label : {"fine", "coarse"}, default "fine"
        CIFAR-100's 100 classes or 20 superclasses.
    mode : {"auto", "RGB", "L"}, default "auto"
        Image folders: convert every image to RGB or grey (auto: grey when all are).
    size : int or (int, int), optional
        Image folders: resize every image to ``(height, width)``.

    Returns
    -------
    DataSplit
        ``x_*`` as stored (uint8 ``(n, C, H, W)`` for image formats), labels,
        class names, ``mean``/``std``; use ``train_dataset()`` (a Dataset,
        optionally augmented), ``eval_sets()`` and ``inputs(x)`` for model
        inputs, ``num_train`` for ``num_data``, ``num_classes`` and
        ``channels`` to build the model.

    Raises
    ------
    FileNotFoundError
        ``path`` or a file a layout needs does not exist.
    ValueError
        Unknown format, a truncated or malformed file, labels out of range, an
        empty image folder, fewer than two classes, or splits that cannot be
        stratified.

    Examples
    --------
    >>> data = load("cifar-10-batches-bin", val_size=0.1)  # doctest: +SKIP
    >>> train = data.train_dataset(augment=True)  # doctest: +SKIP
    >>> model = build_model("resnet18", num_classes=data.num_classes)  # doctest: +SKIP
    """
    val_size = check_fraction("val_size", val_size, allow_zero=True)
    test_size = check_fraction("test_size", test_size, allow_zero=False)
    fmt, pool, test, root = read_path(path, format, label=label, mode=mode, size=size)
    if len(pool.classes) < 2:
        raise ValueError(f"{root!r} holds {len(pool.classes)} class; a classifier needs at least 2")
    labels = pool.y.numpy()
    train_idx = np.arange(len(labels))
    if test is None:
        train_idx, test_idx = stratified_split(labels, test_size, seed, "test_size")
        index = torch.from_numpy(np.sort(test_idx))
        test = LabelledImages(pool.x[index], pool.y[index], pool.classes)
    val_idx = train_idx[:0]
    if val_size > 0:
        kept, taken = stratified_split(labels[train_idx], val_size, seed, "val_size")
        train_idx, val_idx = train_idx[kept], train_idx[taken]

    def take(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if len(indices) == len(labels):  # the whole pool, in order: no copy
            return pool.x, pool.y
        index = torch.from_numpy(np.sort(indices))
        return pool.x[index], pool.y[index]

    x_train, y_train = take(train_idx)
    x_val, y_val = take(val_idx)
    mean, std = channel_stats(x_train)
    return DataSplit(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=test.x,
        y_test=test.y,
        classes=tuple(pool.classes),
        x_heldout=x_train[:0],
        y_heldout=y_train[:0],
        image_shape=tuple(x_train.shape[2:]) if x_train.dim() == 4 else (),
        mean=mean,
        std=std,
        source=f"{fmt}:{root}",
    )
