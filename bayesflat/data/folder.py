"""Image folders: one subfolder of images per class. Reader and writer (Pillow).

Layout: ``root/<class name>/<image file>``. Class names are the subfolder names,
sorted, and label ``k`` is the ``k``-th name; images within a class are read in
sorted file-name order, so the result does not depend on the file system.
Files whose extension is not an image format Pillow reads (``.png``, ``.jpg``,
``.jpeg``, ``.bmp``, ``.gif``, ``.tif``, ``.tiff``, ``.webp``, ``.ppm``,
``.pgm``) and hidden entries are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bayesflat import _io
from bayesflat._checks import check_choice, check_int
from bayesflat.data._common import LabelledImages, check_dir, int_labels, uint8_images

__all__ = ["read_image_folder", "write_image_folder"]

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
# Pillow modes that hold one grey channel; every other mode is converted to RGB.
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(root: str) -> list[str]:
    return sorted(
        name
        for name in os.listdir(root)
        if not name.startswith(".") and os.path.isdir(os.path.join(root, name))
    )


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        side = check_int(size, "size", 1)
        return side, side
    if isinstance(size, tuple | list) and len(size) == 2:
        return check_int(size[0], "size[0] (height)", 1), check_int(size[1], "size[1] (width)", 1)
    raise ValueError(f"size must be None, an int or (height, width), got {size!r}")


def has_class_folders(root: str) -> bool:
    """True when some subfolder of ``root`` holds an image file."""
    return any(
        any(_is_image(f) for f in os.listdir(os.path.join(root, c))) for c in _class_folders(root)
    )


def read_image_folder(
    path,
    *,
    mode: str = "auto",
    size: int | tuple[int, int] | None = None,
    classes: Sequence[str] | None = None,
) -> LabelledImages:
    """Read a folder of class subfolders of images.

    Parameters
    ----------
    path : str or os.PathLike
        The root folder, holding one subfolder per class.
    mode : {"auto", "RGB", "L"}, default "auto"
        Pillow mode every image is converted to: 3-channel RGB or 1-channel
        grey ``L``. ``"auto"``: ``L`` when every image is grey, else ``RGB``
        (so one colour image makes the whole set colour, consistently).
    size : int or (int, int), optional
        Resize every image to ``(height, width)`` (an int: square) with
        bilinear interpolation. Default: keep the stored size, which must then
        be the same for all images.
    classes : sequence of str, optional
        The class names in label order, e.g. those of the training folder when
        reading its test folder; every subfolder must be one of them (a class
        may have no subfolder). Default: the sorted subfolder names.

    Returns
    -------
    LabelledImages
        uint8 images ``(n, C, H, W)`` with ``C`` 3 (RGB) or 1 (L), int64
        labels, the class names.

    Raises
    ------
    FileNotFoundError
        The folder does not exist.
    ValueError
        No class subfolder holds an image, a class subfolder is empty, a
        subfolder is not among ``classes``, an image cannot be read, or images
        differ in size and ``size`` is not given (the message names the file).
    """
    root = check_dir(path)
    check_choice(mode, "mode", ("auto", "RGB", "L"))
    target = _check_size(size)
    folders = _class_folders(root)
    files = {
        c: sorted(f for f in os.listdir(os.path.join(root, c)) if _is_image(f)) for c in folders
    }
    if not any(files.values()):
        raise ValueError(
            f"{root!r} holds no images in class subfolders; expected <root>/<class>/<image> with "
            f"extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    empty = [c for c in folders if not files[c]]
    if empty:
        raise ValueError(
            f"class folder {os.path.join(root, empty[0])!r} holds no images; remove it or add "
            f"images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    names = tuple(folders) if classes is None else tuple(str(c) for c in classes)
    unknown = [c for c in folders if c not in names]
    if unknown:
        raise ValueError(
            f"{os.path.join(root, unknown[0])!r} is not one of the {len(names)} classes "
            f"{names[:10]}{' ...' if len(names) > 10 else ''}"
        )

    paths = [os.path.join(root, c, f) for c in folders for f in files[c]]
    labels = np.array([names.index(c) for c in folders for _ in files[c]], dtype=np.int64)
    return LabelledImages(_read_images(paths, mode, target), torch.from_numpy(labels), names)


def has_loose_images(root: str) -> bool:
    """True when ``root`` holds image files directly (a folder of unlabelled images)."""
    return any(_is_image(f) and os.path.isfile(os.path.join(root, f)) for f in os.listdir(root))


def read_loose_images(path, *, mode: str = "auto", size=None) -> LabelledImages:
    """Read the images directly in a folder, unlabelled: one class named after the folder.

    ``mode`` and ``size`` as for :func:`read_image_folder`; files in sorted name order.
    """
    root = check_dir(path)
    check_choice(mode, "mode", ("auto", "RGB", "L"))
    target = _check_size(size)
    files = sorted(f for f in os.listdir(root) if _is_image(f))
    if not files:
        raise ValueError(f"{root!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    images = _read_images([os.path.join(root, f) for f in files], mode, target)
    name = os.path.basename(os.path.normpath(root))
    return LabelledImages(images, torch.zeros(len(files), dtype=torch.int64), (name,))


def _read_images(paths: list[str], mode: str, target: tuple[int, int] | None) -> torch.Tensor:
    """Decode ``paths`` into one uint8 tensor ``(n, C, H, W)``; see :func:`read_image_folder`."""
    from PIL import Image, UnidentifiedImageError

    def open_image(file: str):
        try:
            return Image.open(file)
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {file!r}: {err}") from err

    if mode == "auto":
        grey = True
        for file in paths:  # Image.open reads only the header
            with open_image(file) as image:
                if image.mode not in _GREY_MODES:
                    grey = False
                    break
        mode = "L" if grey else "RGB"

    arrays = []
    first_size = None
    for file in paths:
        with open_image(file) as image:
            try:
                image = image.convert(mode)
            except OSError as err:
                raise ValueError(f"cannot read image {file!r}: {err}") from err
            if target is not None and image.size != target[::-1]:
                image = image.resize(target[::-1], Image.Resampling.BILINEAR)
            if first_size is None:
                first_size = (image.size, file)
            elif image.size != first_size[0]:
                w0, h0 = first_size[0]
                w, h = image.size
                raise ValueError(
                    f"image {file!r} is {h}x{w} (height x width) but {first_size[1]!r} is "
                    f"{h0}x{w0}; images must share one size: pass size=(height, width) to resize"
                )
            arrays.append(np.asarray(image, dtype=np.uint8))
    stacked = np.stack(arrays)
    images = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images))


def write_image_folder(path, x, y, classes: Sequence[str], *, ext: str = "png") -> Path:
    """Write images as class subfolders: ``path/<classes[y_i]>/<i>.<ext>``.

    Parameters
    ----------
    path : str or os.PathLike
        Root folder, created if missing.
    x : torch.Tensor or numpy.ndarray
        uint8 images ``(n, C, H, W)``, ``C`` 1 (grey) or 3 (RGB).
    y : array-like of int
        Labels ``(n,)`` in ``0 .. len(classes) - 1``.
    classes : sequence of str
        Folder name of each label; a folder is made for every class that has
        at least one image.
    ext : str, default "png"
        File format by extension; use a lossless one (png, bmp, tiff) when the
        pixels must read back unchanged.

    Returns
    -------
    pathlib.Path
        The root folder.
    """
    from PIL import Image

    images = uint8_images(x, "x")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"x must have 1 or 3 channels, got {images.shape[1]}")
    names = [str(c) for c in classes]
    labels = int_labels(y, len(images), "y", len(names))
    root = Path(path)
    width = max(5, len(str(len(images))))
    suffix = ext.lstrip(".") if isinstance(ext, str) else ext
    image_format = Image.registered_extensions().get(f".{str(suffix).lower()}")
    if image_format is None:
        raise ValueError(
            f"ext={ext!r} is not an image format Pillow writes; use a lossless one such as "
            "'png', 'bmp' or 'tiff'"
        )
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        with _io.atomic_path(folder / f"{i:0{width}d}.{suffix}", fsync=False) as temporary:
            Image.fromarray(pixels).save(temporary, format=image_format)
    return root
