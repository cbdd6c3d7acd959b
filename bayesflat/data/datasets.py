"""Training images as a map-style Dataset with batched augmentation.

Transforms act on a whole batch of intensities ``(B, C, H, W)`` at once as
tensor operations, and draw their randomness from PyTorch's default (global)
CPU generator only, one call per transform per batch (``torch.randint`` /
``torch.rand`` without a ``generator`` argument). So a caller that seeds or
forks the global generator around a batch, e.g.
``with torch.random.fork_rng(): torch.manual_seed(s); xb, yb = ds.batch(idx)``,
gets the same augmentation every time, on any device (the draws are made on the
CPU and moved to the images' device).

Fast path: :meth:`ImageDataset.batch` augments an index batch in one go and
returns ``(inputs, labels)`` tensors; :meth:`ImageDataset.__getitems__` wraps
it for ``torch.utils.data.DataLoader`` (which calls ``__getitems__`` with the
batch's indices when the dataset defines it, then collates the per-example
pairs it returns). Per-example ``ds[i]`` is ``ds.batch([i])`` for example ``0``:
the same transform, but a different sequence of draws than one batched call,
so the two paths give different (each reproducible) augmentations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bayesflat._checks import check_int, check_positive
from bayesflat.data.split import intensities, standardize

__all__ = ["Compose", "ImageDataset", "RandomCrop", "RandomHorizontalFlip"]


def _check_batch(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} works on image batches (B, C, H, W), got shape {tuple(x.shape)}")


class RandomCrop:
    """Random ``H x W`` crop of each image zero-padded by ``padding`` pixels on every side.

    For an image ``(C, H, W)`` and offsets ``(i, j)`` drawn uniformly from
    ``{0, ..., 2 * padding}^2``, the output is ``pad(x)[:, i:i+H, j:j+W]``: the
    image shifted by ``(padding - i, padding - j)`` pixels, with zeros (black)
    shifted in. As ``torchvision.transforms.RandomCrop(size, padding)``, the
    CIFAR recipe with ``padding = 4``. One ``torch.randint`` call per batch.

    Parameters
    ----------
    padding : int, default 4
        Zero padding on each side, in pixels; 0 returns the batch unchanged.
    """

    def __init__(self, padding: int = 4) -> None:
        self.padding = check_int(padding, "padding", 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Crop every image of ``x`` ``(B, C, H, W)`` at its own random offset."""
        _check_batch(x, "RandomCrop")
        p = self.padding
        if p == 0:
            return x
        b, c, h, w = x.shape
        offsets = torch.randint(0, 2 * p + 1, (2, b)).to(x.device)
        padded = F.pad(x, (p, p, p, p)).reshape(b, c, -1)
        # One gather: flat index (row * padded width + column) of every output pixel.
        rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
        flat = rows[:, :, None] * (w + 2 * p) + cols[:, None, :]  # (B, H, W)
        return padded.gather(2, flat.reshape(b, 1, -1).expand(b, c, -1)).reshape(b, c, h, w)

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p``, independently.

    One ``torch.rand(B)`` call per batch; image ``k`` is flipped when its draw
    is below ``p``.

    Parameters
    ----------
    p : float, default 0.5
        Flip probability, in [0, 1].
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = check_positive(p, "p", allow_zero=True)
        if self.p > 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Flip the images of ``x`` ``(B, C, H, W)`` chosen at random."""
        _check_batch(x, "RandomHorizontalFlip")
        flip = (torch.rand(x.shape[0]) < self.p).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply batch transforms in order; their draws are made in that order."""

    def __init__(self, *transforms: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transforms = transforms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through every transform."""
        for transform in self.transforms:
            x = transform(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


class ImageDataset(Dataset):
    """Labelled images, standardised and optionally augmented a batch at a time.

    An example's input is ``(T(v) - mean_c) / std_c``: ``v`` the image's
    intensities (``pixel / 255`` for uint8, float values as stored), ``T`` the
    transform (identity when None), ``mean_c`` and ``std_c`` the per-channel
    statistics (no standardisation when None). The transform sees intensities,
    so the random crop pads with black, as on the raw image.

    Parameters
    ----------
    images : torch.Tensor
        ``(n, C, H, W)`` uint8 or float (rows ``(n, d)`` without a transform).
    labels : torch.Tensor
        int64 ``(n,)``.
    mean, std : torch.Tensor, optional
        Per-channel statistics, ``(C,)``, in intensity units.
    transform : callable, optional
        Batch transform ``(B, C, H, W) -> (B, C, H, W)`` of intensities,
        drawing from the global generator (e.g. :class:`RandomCrop`).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        if (mean is None) != (std is None):
            raise ValueError("give mean and std together, or neither")
        if transform is not None and images.dim() != 4:
            raise ValueError(
                f"a transform needs images (n, C, H, W), got {tuple(images.shape)}; "
                "load the data as images (e.g. flatten=False)"
            )
        self.images, self.labels = images, labels
        self.mean, self.std, self.transform = mean, std, transform

    def __len__(self) -> int:
        """Number of examples n."""
        return len(self.labels)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of a batch of examples, augmented together.

        Parameters
        ----------
        indices : sequence of int or torch.Tensor
            Example indices, in batch order.

        Returns
        -------
        inputs : torch.Tensor
            float32 ``(B, C, H, W)`` on the images' device.
        labels : torch.Tensor
            int64 ``(B,)``.
        """
        index = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(intensities(x))
        if self.mean is not None:
            x = standardize(x, self.mean, self.std)
        else:
            x = intensities(x)
        return x, self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch of :meth:`batch` as ``(input, label)`` pairs, for ``DataLoader``."""
        x, y = self.batch(indices)
        return list(zip(x.unbind(0), y.unbind(0), strict=True))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One example, ``(input (C, H, W), label)``: :meth:`batch` of ``[index]``."""
        x, y = self.batch([index])
        return x[0], y[0]

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same dataset with images and labels on ``device`` (uint8 stays uint8)."""
        return ImageDataset(
            self.images.to(device),
            self.labels.to(device),
            mean=self.mean,
            std=self.std,
            transform=self.transform,
        )

    def __repr__(self) -> str:
        return (
            f"ImageDataset(n={len(self)}, images={tuple(self.images.shape[1:])} "
            f"{self.images.dtype}, standardized={self.mean is not None}, "
            f"transform={self.transform!r})"
        )
