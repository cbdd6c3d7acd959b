"""CIFAR-10 and CIFAR-100, binary and python versions: readers and writers.

The binary version (``cifar-10-binary.tar.gz``, ``cifar-100-binary.tar.gz``) is a
sequence of fixed-size records, one per image:

- CIFAR-10: 1 label byte (0..9), then 3072 pixel bytes: 1024 red, 1024 green,
  1024 blue, each plane row-major 32x32. Files ``data_batch_1.bin`` ..
  ``data_batch_5.bin`` (10,000 records each) and ``test_batch.bin``; class
  names, one per line, in ``batches.meta.txt``.
- CIFAR-100: 1 coarse label byte (0..19), 1 fine label byte (0..99), then the
  same 3072 pixel bytes. Files ``train.bin`` (50,000) and ``test.bin``
  (10,000); names in ``fine_label_names.txt`` and ``coarse_label_names.txt``.

The python version (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``)
stores the same bytes as pickled dicts: ``b"data"`` a uint8 array
``(n, 3072)`` in the record's pixel order, ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` and ``b"coarse_labels"`` (CIFAR-100) as lists of ints; files
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``
(``b"label_names"``), or ``train``, ``test`` and ``meta``
(``b"fine_label_names"``, ``b"coarse_label_names"``).

Unpickling can run any function a file names, so the python batches are read
with a restricted unpickler that builds only numpy arrays, numpy scalars and
plain containers; anything else is refused before it is called. The binary
version needs no such care and is the one to prefer.
"""

from __future__ import annotations

import codecs
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bayesflat import _io
from bayesflat._checks import check_choice, check_int
from bayesflat.data._common import (
    LabelledImages,
    check_file,
    check_labels,
    default_names,
    int_labels,
    uint8_images,
)

__all__ = [
    "read_cifar_binary",
    "read_cifar_python",
    "write_cifar_binary",
    "write_cifar_folder",
    "write_cifar_python",
]

IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32
# Number of classes of each label kind: CIFAR-10 has one kind, CIFAR-100 two.
_NUM_CLASSES = {"cifar10": {"fine": 10}, "cifar100": {"fine": 100, "coarse": 20}}
_LABEL_BYTES = {"cifar10": 1, "cifar100": 2}
_BINARY_NAMES = {"cifar10": "batches.meta.txt", "cifar100": "{label}_label_names.txt"}
_PYTHON_META = {"cifar10": "batches.meta", "cifar100": "meta"}
_PYTHON_KEYS = {
    "cifar10": {"fine": "labels"},
    "cifar100": {"fine": "fine_labels", "coarse": "coarse_labels"},
}
_NAME_KEYS = {
    "cifar10": {"fine": "label_names"},
    "cifar100": {"fine": "fine_label_names", "coarse": "coarse_label_names"},
}
_BATCH_NUMBER = re.compile(r"data_batch_(\d+)(\.bin)?$")


def _record_size(variant: str) -> int:
    return _LABEL_BYTES[variant] + PIXELS


def _check_label_kind(label: str, variant: str, path: str) -> str:
    check_choice(label, "label", ("fine", "coarse"))
    if label not in _NUM_CLASSES[variant]:
        raise ValueError(
            f"{path!r} is a CIFAR-10 batch, which has no coarse labels; use label='fine'"
        )
    return label


def _binary_variant(path: str, variant: str | None) -> str:
    if variant is not None:
        return check_choice(variant, "variant", ("cifar10", "cifar100"))
    name = os.path.basename(path)
    if _BATCH_NUMBER.match(name) or name == "test_batch.bin":
        return "cifar10"
    if name in ("train.bin", "test.bin"):
        return "cifar100"
    size = os.path.getsize(path)
    fits = [v for v in ("cifar10", "cifar100") if size and size % _record_size(v) == 0]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(
            f"{path!r}: {size} bytes is neither a whole number of 3073-byte CIFAR-10 records "
            "nor of 3074-byte CIFAR-100 records; the file is truncated or not a CIFAR batch"
        )
    raise ValueError(
        f"{path!r}: {size} bytes fits both CIFAR-10 and CIFAR-100 records; "
        "pass variant='cifar10' or variant='cifar100'"
    )


def _read_names(path: str) -> tuple[str, ...] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        names = tuple(line.strip() for line in handle if line.strip())
    return names or None


def _class_names(names: Sequence[str] | None, variant: str, label: str) -> tuple[str, ...]:
    return tuple(names) if names else default_names(_NUM_CLASSES[variant][label])


def read_cifar_binary(path, *, label: str = "fine", variant: str | None = None) -> LabelledImages:
    """Read one CIFAR-10 or CIFAR-100 binary batch file.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.bin`` batch, e.g. ``data_batch_1.bin`` or ``train.bin``.
    label : {"fine", "coarse"}, default "fine"
        Which label of a CIFAR-100 record to return (the 100 fine classes or the
        20 superclasses); CIFAR-10 has only ``"fine"``.
    variant : {"cifar10", "cifar100"}, optional
        Record layout. Default: from the file name (``data_batch_*.bin`` and
        ``test_batch.bin`` are CIFAR-10, ``train.bin`` and ``test.bin``
        CIFAR-100), else from the file size (a multiple of 3073 or 3074 bytes).

    Returns
    -------
    LabelledImages
        uint8 images ``(n, 3, 32, 32)``, int64 labels, class names from the
        ``batches.meta.txt`` / ``<label>_label_names.txt`` next to the file
        (label numbers as names when that file is absent).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The size is not a whole number of records (a truncated file), or a
        label is out of range.
    """
    path = check_file(path)
    variant = _binary_variant(path, variant)
    label = _check_label_kind(label, variant, path)
    record = _record_size(variant)
    size = os.path.getsize(path)
    if size == 0 or size % record:
        kind = "CIFAR-10" if variant == "cifar10" else "CIFAR-100"
        layout = "1 label byte" if variant == "cifar10" else "2 label bytes (coarse, fine)"
        raise ValueError(
            f"{path!r}: {size} bytes is not a whole, non-zero number of {record}-byte {kind} "
            f"records ({layout} + 3072 pixel bytes); the file is truncated or not a {kind} batch"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    offset = _LABEL_BYTES[variant]
    column = 0 if variant == "cifar10" or label == "coarse" else 1
    meta = _BINARY_NAMES[variant].format(label=label)
    names = _class_names(_read_names(os.path.join(os.path.dirname(path), meta)), variant, label)
    labels = check_labels(records[:, column], len(names), path, f"{label} label")
    pixels = np.ascontiguousarray(records[:, offset:]).reshape(-1, *IMAGE_SHAPE)
    return LabelledImages(torch.from_numpy(pixels), torch.from_numpy(labels), names)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes with protocol < 3 as _codecs.encode(text, "latin1"); only that
    # use is admitted, not arbitrary codecs.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_EMPTY = np.empty(0, dtype=np.uint8)
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
# numpy moved its internals from numpy.core to numpy._core (2.0); files of either era name
# the functions by their module of the time, and both resolve to the installed function.
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = _EMPTY.__reduce__()[0]
    _ALLOWED_GLOBALS[(f"{_module}.multiarray", "scalar")] = np.int64(0).__reduce__()[0]
    _ALLOWED_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = _EMPTY.__reduce_ex__(5)[0]
for _module in ("builtins", "__builtin__"):  # Python 3 and Python 2 spellings
    for _type in (
        bool,
        bytearray,
        bytes,
        complex,
        dict,
        float,
        frozenset,
        int,
        list,
        set,
        str,
        tuple,
    ):
        _ALLOWED_GLOBALS[(_module, _type.__name__)] = _type


class _RefusedGlobal(ValueError):
    """A pickle names a global outside the admitted set."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays, numpy scalars and plain containers, nothing else."""

    def __init__(self, file, path: str) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"{self.path!r}: refusing to unpickle {module}.{name}: a CIFAR python batch "
                "holds only numpy arrays, lists and dicts, so this file is not one or has been "
                "altered. Use the binary version of the data set (cifar-10-binary.tar.gz or "
                "cifar-100-binary.tar.gz) with format='cifar-binary'."
            ) from None


def _unpickle(path: str) -> dict[str, object]:
    with open(path, "rb") as handle:
        try:
            obj = _ArrayUnpickler(handle, path).load()
        except _RefusedGlobal:
            raise
        except Exception as err:
            raise ValueError(f"{path!r} is not a readable CIFAR python batch: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r}: a CIFAR python batch is a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _decode_names(values: object) -> tuple[str, ...]:
    return tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values)


def read_cifar_python(path, *, label: str = "fine") -> LabelledImages:
    """Read one CIFAR-10 or CIFAR-100 python batch (a pickled dict) with a restricted unpickler.

    Only ``numpy.ndarray``, ``numpy.dtype``, numpy's array and scalar
    reconstructors and the built-in containers may be constructed; a pickle
    naming anything else (``os.system``, ``builtins.eval``, ...) is refused
    before the name is resolved, with a ``ValueError``.

    Parameters
    ----------
    path : str or os.PathLike
        A batch, e.g. ``data_batch_1``, ``test_batch``, ``train``.
    label : {"fine", "coarse"}, default "fine"
        For a CIFAR-100 batch, ``b"fine_labels"`` or ``b"coarse_labels"``.

    Returns
    -------
    LabelledImages
        uint8 images ``(n, 3, 32, 32)``, int64 labels, class names from the
        ``batches.meta`` / ``meta`` next to the file (label numbers as names
        when it is absent).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The pickle names a global outside the admitted set, is not a CIFAR
        batch dict, or holds labels out of range.
    """
    path = check_file(path)
    batch = _unpickle(path)
    if "labels" in batch:
        variant = "cifar10"
    elif "fine_labels" in batch:
        variant = "cifar100"
    else:
        raise ValueError(
            f"{path!r}: a CIFAR python batch has b'labels' (CIFAR-10) or b'fine_labels' "
            f"(CIFAR-100); this one holds {sorted(batch)}"
        )
    label = _check_label_kind(label, variant, path)
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim < 2:
        raise ValueError(f"{path!r}: b'data' must be a uint8 array (n, 3072)")
    if data.size != len(data) * PIXELS:
        raise ValueError(f"{path!r}: b'data' must have shape (n, 3072), got {data.shape}")
    names = None
    meta_path = os.path.join(os.path.dirname(path), _PYTHON_META[variant])
    if os.path.isfile(meta_path):
        meta = _unpickle(meta_path)
        key = _NAME_KEYS[variant][label]
        if key in meta:
            names = _decode_names(meta[key])
    names = _class_names(names, variant, label)
    key = _PYTHON_KEYS[variant][label]
    raw = np.asarray(batch[key])
    if raw.shape != (len(data),) or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(
            f"{path!r}: b'{key}' must be {len(data)} integer labels, got {raw.dtype} {raw.shape}"
        )
    labels = check_labels(raw, len(names), path, f"{label} label")
    pixels = np.ascontiguousarray(data.reshape(-1, *IMAGE_SHAPE))
    return LabelledImages(torch.from_numpy(pixels), torch.from_numpy(labels), names)


def _check_write(x, y, coarse) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    images = uint8_images(x, "x", channels=3)
    if images.shape[2:] != (32, 32):
        raise ValueError(f"x must hold 32x32 images, got {images.shape[2:]}")
    n = len(images)
    if coarse is None:
        return images, int_labels(y, n, "y", 10), None
    return images, int_labels(y, n, "y", 100), int_labels(coarse, n, "coarse", 20)


def write_cifar_binary(path, x, y, *, coarse=None) -> Path:
    """Write images as one CIFAR binary batch file.

    Each record is the label byte(s) followed by the 3072 pixel bytes of the
    image, red plane then green then blue, each row-major: 3073 bytes per
    CIFAR-10 record, 3074 (coarse label, fine label, pixels) per CIFAR-100 one.

    Parameters
    ----------
    path : str or os.PathLike
        File to write, e.g. ``data_batch_1.bin``; its folder must exist.
    x : torch.Tensor or numpy.ndarray
        uint8 images ``(n, 3, 32, 32)``.
    y : array-like of int
        Labels ``(n,)``: CIFAR-10 labels 0..9, or CIFAR-100 fine labels 0..99
        when ``coarse`` is given.
    coarse : array-like of int, optional
        CIFAR-100 coarse labels 0..19; given, the file has CIFAR-100 records.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    images, fine, coarse = _check_write(x, y, coarse)
    labels = [fine] if coarse is None else [coarse, fine]
    columns = [np.asarray(lab, dtype=np.uint8)[:, None] for lab in labels]
    records = np.concatenate([*columns, images.reshape(len(images), PIXELS)], axis=1)
    path = Path(path)
    _io.write_bytes(path, records.tobytes())
    return path


def write_cifar_python(path, x, y, *, coarse=None, batch_label: str = "batch") -> Path:
    """Write images as one CIFAR python batch: a dict pickled with protocol 2.

    Keys as in the distributed files: ``b"batch_label"``, ``b"data"`` (uint8
    ``(n, 3072)``, pixels as in the binary records), ``b"labels"`` (CIFAR-10) or
    ``b"fine_labels"`` and ``b"coarse_labels"`` (CIFAR-100) as lists of ints,
    and ``b"filenames"``.

    Parameters
    ----------
    path : str or os.PathLike
        File to write, e.g. ``data_batch_1``.
    x : torch.Tensor or numpy.ndarray
        uint8 images ``(n, 3, 32, 32)``.
    y : array-like of int
        CIFAR-10 labels 0..9, or CIFAR-100 fine labels 0..99 with ``coarse``.
    coarse : array-like of int, optional
        CIFAR-100 coarse labels 0..19.
    batch_label : str, default "batch"
        Stored under ``b"batch_label"``.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    images, fine, coarse = _check_write(x, y, coarse)
    batch: dict[bytes, object] = {
        b"batch_label": batch_label.encode(),
        b"data": images.reshape(len(images), PIXELS),
        b"filenames": [f"image_{i:05d}.png".encode() for i in range(len(images))],
    }
    if coarse is None:
        batch[b"labels"] = fine.tolist()
    else:
        batch[b"fine_labels"] = fine.tolist()
        batch[b"coarse_labels"] = coarse.tolist()
    path = Path(path)
    _io.write_bytes(path, pickle.dumps(batch, protocol=2))
    return path


def _split_parts(part: Sequence, argname: str) -> tuple[object, object, object | None]:
    if not isinstance(part, tuple | list) or len(part) not in (2, 3):
        raise ValueError(
            f"{argname} must be (x, y) for CIFAR-10 or (x, fine, coarse) for CIFAR-100"
        )
    return part[0], part[1], (part[2] if len(part) == 3 else None)


def write_cifar_folder(
    folder,
    train: Sequence,
    test: Sequence | None = None,
    *,
    classes: Sequence[str] | None = None,
    coarse_classes: Sequence[str] | None = None,
    python: bool = False,
    batches: int = 5,
) -> Path:
    """Write an extracted CIFAR archive: batch files and class names, in the standard layout.

    CIFAR-10 (``train = (x, y)``): ``data_batch_1[.bin]`` .. ``data_batch_<batches>[.bin]``
    (the training images in order, split as evenly as possible), ``test_batch[.bin]``,
    and ``batches.meta.txt`` or ``batches.meta``. CIFAR-100
    (``train = (x, fine, coarse)``): ``train[.bin]``, ``test[.bin]``, and
    ``fine_label_names.txt`` + ``coarse_label_names.txt`` or ``meta``. The
    ``.bin`` names and text files are those of the binary version, the others
    of the python version.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder to write into, created if missing.
    train, test : tuple
        ``(x, y)`` or ``(x, fine, coarse)``, as for :func:`write_cifar_binary`;
        ``test`` may be None (no test file).
    classes, coarse_classes : sequence of str, optional
        Class names (10 or 100; 20 coarse); default the label numbers.
    python : bool, default False
        Write the python version instead of the binary one.
    batches : int, default 5
        Number of CIFAR-10 training batch files.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    batches = check_int(batches, "batches", 1)
    x, y, coarse = _split_parts(train, "train")
    variant = "cifar10" if coarse is None else "cifar100"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write = write_cifar_python if python else write_cifar_binary
    suffix = "" if python else ".bin"
    if variant == "cifar10":
        parts = np.array_split(np.arange(len(x)), batches)
        for i, idx in enumerate(parts, start=1):
            write(folder / f"data_batch_{i}{suffix}", np.asarray(x)[idx], np.asarray(y)[idx])
        test_name = f"test_batch{suffix}"
    else:
        write(folder / f"train{suffix}", x, y, coarse=coarse)
        test_name = f"test{suffix}"
    if test is not None:
        tx, ty, tc = _split_parts(test, "test")
        if (tc is None) != (coarse is None):
            raise ValueError(
                "train and test must both be CIFAR-10 (x, y) or CIFAR-100 (x, fine, coarse)"
            )
        write(folder / test_name, tx, ty, coarse=tc)

    names = {"fine": classes, "coarse": coarse_classes}
    for label, count in _NUM_CLASSES[variant].items():
        given = names[label]
        names[label] = tuple(default_names(count) if given is None else (str(c) for c in given))
        if len(names[label]) != count:
            raise ValueError(f"{label} class names must number {count}, got {len(names[label])}")
    if python:
        meta = {
            _NAME_KEYS[variant][label].encode(): [n.encode() for n in names[label]]
            for label in _NUM_CLASSES[variant]
        }
        _io.write_bytes(folder / _PYTHON_META[variant], pickle.dumps(meta, protocol=2))
    else:
        for label in _NUM_CLASSES[variant]:
            text = "".join(f"{n}\n" for n in names[label]) + "\n"
            _io.write_text(folder / _BINARY_NAMES[variant].format(label=label), text)
    return folder


def _numbered_batches(folder: str, suffix: str) -> list[str]:
    found = []
    for name in os.listdir(folder):
        match = _BATCH_NUMBER.match(name)
        if match and (match.group(2) or "") == suffix:
            found.append((int(match.group(1)), name))
    return [os.path.join(folder, name) for _, name in sorted(found)]


def cifar_layout(folder: str) -> tuple[str, list[str], str | None] | None:
    """Recognise an extracted CIFAR archive: ``(format, training files, test file or None)``.

    ``format`` is ``"cifar-binary"`` or ``"cifar-python"``; None when ``folder``
    holds no CIFAR batch files.
    """
    for fmt, suffix in (("cifar-binary", ".bin"), ("cifar-python", "")):
        train = _numbered_batches(folder, suffix)
        test = os.path.join(folder, f"test_batch{suffix}")
        if not train:
            train = [p for p in [os.path.join(folder, f"train{suffix}")] if os.path.isfile(p)]
            test = os.path.join(folder, f"test{suffix}")
            # CIFAR-100 python files have no extension: demand the meta file as well, so a
            # folder of 'train' and 'test' subfolders is never mistaken for one.
            if train and not suffix and not os.path.isfile(os.path.join(folder, "meta")):
                train = []
        if train:
            return fmt, train, (test if os.path.isfile(test) else None)
    return None


def read_cifar_folder(
    folder: str, fmt: str, *, label: str = "fine"
) -> tuple[LabelledImages, LabelledImages | None]:
    """Read an extracted CIFAR archive into its training pool and test split."""
    layout = cifar_layout(folder)
    if layout is None or layout[0] != fmt:
        expected = (
            "data_batch_<k>.bin / test_batch.bin (CIFAR-10) or train.bin / test.bin (CIFAR-100)"
            if fmt == "cifar-binary"
            else "data_batch_<k> / test_batch (CIFAR-10) or train / test / meta (CIFAR-100)"
        )
        raise ValueError(f"{folder!r} holds no {fmt} batch files; expected {expected}")
    _, train_files, test_file = layout
    read = read_cifar_binary if fmt == "cifar-binary" else read_cifar_python
    parts = [read(path, label=label) for path in train_files]
    train = LabelledImages(
        torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].classes
    )
    return train, (read(test_file, label=label) if test_file else None)
