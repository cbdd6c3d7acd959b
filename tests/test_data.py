import gzip
import struct

import numpy as np
import pytest
import torch

from bayesflat.data import (
    Compose,
    DataSplit,
    DigitsData,
    ImageDataset,
    RandomCrop,
    RandomHorizontalFlip,
    available_ood_sets,
    gaussian_noise,
    image_patches,
    load_digits_split,
    load_idx,
    load_npz,
    ood_sets,
    uniform_noise,
)

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def digits_val():
    return load_digits_split(val_size=0.2)


def _rows(x):
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def test_digits_shapes_dtypes_ranges(digits):
    assert isinstance(digits, DigitsData)
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    assert digits.x_val.shape == (0, 64) and digits.y_val.shape == (0,)
    assert digits.x_heldout.shape == (0, 64) and digits.heldout_classes == ()
    assert digits.num_classes == 10 and digits.classes == tuple(range(10))
    assert digits.image_shape == (8, 8) and digits.num_train == 1437
    for x in (digits.x_train, digits.x_test):
        assert x.dtype == torch.float32
        assert x.min() == 0.0 and x.max() == 1.0
        # pixel counts 0..16 divided by 16
        assert torch.equal(x * 16, torch.round(x * 16))
    for y in (digits.y_train, digits.y_test):
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert "x_train=(1437, 64)" in repr(digits)


def test_digits_matches_sklearn_pixels(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = {
        (r / 16).astype(np.float32).tobytes(): t for r, t in zip(raw.data, raw.target, strict=True)
    }
    for x, y in ((digits.x_train, digits.y_train), (digits.x_test, digits.y_test)):
        assert all(
            pixels[row.tobytes()] == label for row, label in zip(x.numpy(), y.tolist(), strict=True)
        )


def test_digits_split_sizes_and_disjoint(digits_val):
    d = digits_val
    n_train, n_val, n_test = len(d.y_train), len(d.y_val), len(d.y_test)
    assert n_test == 360 and n_train + n_val + n_test == N_DIGITS
    assert n_val == pytest.approx(0.2 * (N_DIGITS - n_test), abs=1)
    train, val, test = _rows(d.x_train), _rows(d.x_val), _rows(d.x_test)
    assert not (train & val) and not (train & test) and not (val & test)


def test_digits_stratified(digits_val):
    from sklearn.datasets import load_digits

    share = np.bincount(load_digits().target, minlength=10) / N_DIGITS
    for y in (digits_val.y_train, digits_val.y_val, digits_val.y_test):
        counts = np.bincount(y.numpy(), minlength=10)
        assert np.all(np.abs(counts - share * len(y)) <= 1), counts


def test_digits_deterministic_and_seeded(digits):
    again = load_digits_split()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(digits, name), getattr(again, name))
    other = load_digits_split(seed=1)
    assert not torch.equal(digits.y_test, other.y_test)


def test_digits_val_split_keeps_test_split(digits, digits_val):
    assert torch.equal(digits.x_test, digits_val.x_test)
    assert _rows(digits_val.x_train) | _rows(digits_val.x_val) == _rows(digits.x_train)


def test_digits_image_layout(digits):
    img = load_digits_split(flatten=False, val_size=0.1)
    assert img.x_train.shape == (1437 - len(img.y_val), 1, 8, 8)
    assert img.x_val.shape[1:] == (1, 8, 8) and img.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(img.x_test.reshape(360, 64), digits.x_test)


def test_heldout_classes_remapped(digits):
    kept = (7, 3, 5)
    d = load_digits_split(classes=kept)
    assert d.classes == kept and d.num_classes == 3
    assert d.heldout_classes == (0, 1, 2, 4, 6, 8, 9)
    assert set(d.y_train.tolist()) == {0, 1, 2} and set(d.y_test.tolist()) == {0, 1, 2}
    # label k is digit kept[k]; the kept test images are those of the full split
    full_x, full_y = digits.x_test, digits.y_test
    mask = torch.isin(full_y, torch.tensor(kept))
    assert torch.equal(d.x_test, full_x[mask])
    assert torch.equal(torch.tensor(kept)[d.y_test], full_y[mask])
    # the held-out OOD set is the rest of the test split, with original digits
    assert torch.equal(d.x_heldout, full_x[~mask])
    assert torch.equal(d.y_heldout, full_y[~mask])
    assert len(d.y_test) + len(d.y_heldout) == 360


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_size": 0.0}, "test_size"),
        ({"test_size": 1.5}, "test_size"),
        ({"val_size": 1.0}, "val_size"),
        ({"val_size": -0.1}, "val_size"),
        ({"classes": (1, 1, 2)}, "repeat"),
        ({"classes": (3, 10)}, "digits 0..9"),
        ({"classes": (4,)}, "at least 2"),
        ({"classes": (1.5, 2)}, "integers"),
        ({"classes": ("a", 2)}, "sequence of digits"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_split(**kwargs)


def test_image_patches():
    p = image_patches(100, seed=3)
    assert p.shape == (100, 64) and p.dtype == torch.float32
    assert p.min() >= 0 and p.max() <= 1
    assert torch.equal(p, image_patches(100, seed=3))
    assert not torch.equal(p, image_patches(100, seed=4))
    # every patch holds structure, not one flat grey
    assert (p.std(dim=1) > 0.015).all()
    assert len(_rows(p)) == 100
    img = image_patches(5, size=6, seed=3, flatten=False)
    assert img.shape == (5, 1, 6, 6)


def test_image_patches_errors():
    with pytest.raises(ValueError, match="n must be"):
        image_patches(-1)
    with pytest.raises(ValueError, match="size must be"):
        image_patches(3, size=0)
    with pytest.raises(ValueError, match="does not fit"):
        image_patches(3, size=200, downscale=4)
    with pytest.raises(ValueError, match="only"):
        image_patches(10**6)


def test_noise_sets(digits):
    u = uniform_noise(50, shape=(1, 8, 8), seed=1)
    assert u.shape == (50, 1, 8, 8) and u.dtype == torch.float32
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u, uniform_noise(50, shape=(1, 8, 8), seed=1))

    g = gaussian_noise(digits.x_train, 4000, seed=2)
    assert g.shape == (4000, 64) and g.dtype == torch.float32
    assert g.min() >= 0 and g.max() <= 1
    assert torch.equal(g, gaussian_noise(digits.x_train, 4000, seed=2))
    # pixels the digits never use (std 0) stay at their mean; the others are noisy
    std = digits.x_train.std(dim=0)
    assert torch.equal(g[:, std == 0], digits.x_train[:1, std == 0].expand(4000, -1))
    busy = std > 0.3
    assert (g[:, busy].std(dim=0) > 0.15).all()
    assert len(gaussian_noise(digits.x_test)) == 360
    with pytest.raises(ValueError, match="reference"):
        gaussian_noise(torch.zeros(0, 64))


def test_ood_sets_default(digits):
    sets = ood_sets(digits)
    assert list(sets) == ["patches", "noise"]
    for x in sets.values():
        assert x.shape == (360, 64) and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(sets["patches"], image_patches(360))
    assert torch.equal(sets["patches"], ood_sets()["patches"])


def test_ood_sets_layout_and_names():
    d = load_digits_split(classes=range(5), flatten=False)
    sets = ood_sets(d)
    assert list(sets) == ["patches", "noise", "heldout"]
    assert all(x.shape[1:] == (1, 8, 8) for x in sets.values())
    assert len(sets["patches"]) == len(d.x_test)
    every = ood_sets(d, names=available_ood_sets(), n=20)
    assert list(every) == list(available_ood_sets())
    assert every["uniform"].shape == (20, 1, 8, 8)
    assert torch.equal(every["inverted"], 1 - d.x_test)
    assert torch.equal(every["heldout"], d.x_heldout)
    with pytest.raises(ValueError, match="available: patches"):
        ood_sets(d, names=["pathces"])


def test_ood_sets_heldout_needs_classes(digits):
    with pytest.raises(ValueError, match="classes="):
        ood_sets(digits, names="heldout")


# --- npz ---------------------------------------------------------------------


def test_load_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 3, 4), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0, 2, 1], dtype=np.int32)
    path = tmp_path / "set.npz"
    np.savez_compressed(path, images=x, labels=y)
    xt, yt = load_npz(path, x_key="images", y_key="labels")
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    np.testing.assert_array_equal(xt.numpy(), x.astype(np.float32))
    np.testing.assert_array_equal(yt.numpy(), y)
    xo, none = load_npz(str(path), x_key="images", y_key=None)
    assert none is None and torch.equal(xo, xt)


def test_load_npz_float_integer_labels(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, x=np.zeros((2, 3)), y=np.array([1.0, 0.0]))
    assert load_npz(path)[1].tolist() == [1, 0]


def test_load_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_npz(tmp_path / "missing.npz")

    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((3, 2)), y=np.zeros(3, dtype=int))
    with pytest.raises(KeyError, match="no array named 'images'.*holds: x, y"):
        load_npz(good, x_key="images")

    short = tmp_path / "short.npz"
    np.savez(short, x=np.zeros((3, 2)), y=np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="3 examples but 'y' has 2 labels"):
        load_npz(short)

    frac = tmp_path / "frac.npz"
    np.savez(frac, x=np.zeros((2, 2)), y=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="integer labels"):
        load_npz(frac)

    matrix = tmp_path / "matrix.npz"
    np.savez(matrix, x=np.zeros((2, 2)), y=np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        load_npz(matrix)

    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_npz(npy)

    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(junk)


# --- IDX -----------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, code: int, big_endian_dtype: str) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(big_endian_dtype).tobytes()


def test_load_idx_images_gz(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(images, 0x08, ">u1")))
    loaded = load_idx(path)
    assert loaded.dtype == torch.uint8 and loaded.shape == (5, 28, 28)
    np.testing.assert_array_equal(loaded.numpy(), images)


def test_load_idx_labels_plain(tmp_path):
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(labels, 0x08, ">u1"))
    assert load_idx(path).tolist() == labels.tolist()


@pytest.mark.parametrize(
    ("code", "dtype", "torch_dtype"),
    [
        (0x09, ">i1", torch.int8),
        (0x0B, ">i2", torch.int16),
        (0x0C, ">i4", torch.int32),
        (0x0D, ">f4", torch.float32),
        (0x0E, ">f8", torch.float64),
    ],
)
def test_load_idx_types_big_endian(tmp_path, code, dtype, torch_dtype):
    values = np.array([[-3, 1, 2], [100, -7, 0]]).astype(dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(_idx_bytes(values, code, dtype))
    loaded = load_idx(path)
    assert loaded.dtype == torch_dtype and loaded.shape == (2, 3)
    np.testing.assert_array_equal(loaded.numpy(), values.astype(dtype[1:]))


def test_load_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_idx(tmp_path / "missing-idx3-ubyte")

    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file: wrong magic number '00010801'"):
        load_idx(wrong)

    code = tmp_path / "code"
    code.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="wrong magic number"):
        load_idx(code)

    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((4, 3), dtype=np.uint8), 0x08, ">u1")[:-2])
    with pytest.raises(ValueError, match=r"size mismatch: shape \(4, 3\) of uint8 needs 12 bytes"):
        load_idx(short)

    long = tmp_path / "long"
    long.write_bytes(_idx_bytes(np.zeros(3, dtype=">i4"), 0x0C, ">i4") + b"\x00")
    with pytest.raises(ValueError, match="needs 12 bytes, found 13"):
        load_idx(long)

    header = tmp_path / "header"
    header.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 2))
    with pytest.raises(ValueError, match="header is cut short"):
        load_idx(header)

    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")[:-6])
    with pytest.raises(ValueError, match="cannot be decompressed"):
        load_idx(broken_gz)


# --- the split object and the training Dataset ----------------------------------


def test_digits_split_is_the_general_split(digits):
    assert isinstance(digits, DataSplit) and DigitsData is DataSplit
    assert digits.source == "digits" and not digits.standardized and digits.channels == 1
    assert digits.class_names == tuple("0123456789")
    # digits inputs are the stored intensities, no copy
    assert digits.inputs(digits.x_test) is digits.x_test
    sets = digits.eval_sets()
    assert list(sets) == ["test"] and sets["test"][0] is digits.x_test
    ds = digits.train_dataset()
    assert len(ds) == 1437
    x, y = ds.batch([3, 0])
    assert torch.equal(x, digits.x_train[[3, 0]]) and torch.equal(y, digits.y_train[[3, 0]])
    with pytest.raises(ValueError, match="flatten=False"):
        digits.train_dataset(augment=True)


def _marked(n=3, c=2, size=5):
    """uint8 images whose pixels are all distinct and non-zero: a crop reveals its offset."""
    return (torch.arange(n * c * size * size) % 250 + 1).to(torch.uint8).reshape(n, c, size, size)


def test_random_crop_is_a_window_of_the_zero_padded_image():
    x = _marked().float()
    torch.manual_seed(0)
    out = RandomCrop(2)(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for image, crop in zip(padded, out, strict=True):
        windows = [image[:, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert sum(torch.equal(crop, w) for w in windows) == 1
    assert RandomCrop(0)(x) is x
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        RandomCrop(2)(x[0])


def test_random_crop_offsets_uniform():
    # 9 x 9 offsets for padding 4, each with probability 1/81: chi-square with 80 dof
    from scipy.stats import chi2

    x = torch.zeros(8100, 1, 1, 1)
    x[:, :, 0, 0] = 1.0
    torch.manual_seed(1)
    out = RandomCrop(4)(x)
    # a 1x1 image crops to its only pixel at offset (4, 4) and to the zero padding elsewhere
    hits = int(out.sum())
    assert 100 - 4 * 10 < hits < 100 + 4 * 10  # Binomial(8100, 1/81): mean 100, sd 9.9
    torch.manual_seed(1)
    offsets = torch.randint(0, 9, (2, 8100))
    counts = torch.bincount(offsets[0] * 9 + offsets[1], minlength=81).double()
    assert int(out.sum()) == int(counts[4 * 9 + 4])  # the crop uses exactly these draws
    stat = float(((counts - 100) ** 2 / 100).sum())
    assert stat < chi2.ppf(0.999, 80)


def test_horizontal_flip():
    x = _marked(n=2000, c=1, size=3).float()
    torch.manual_seed(2)
    out = RandomHorizontalFlip()(x)
    flipped = (out != x).flatten(1).any(dim=1)
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(
        out[~flipped], x[~flipped]
    )
    assert abs(int(flipped.sum()) - 1000) < 4 * 22.4  # Binomial(2000, 1/2): sd 22.4
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x)
    with pytest.raises(ValueError, match="probability"):
        RandomHorizontalFlip(1.5)


def _colour_split():
    x = _marked(n=12, c=3, size=6)
    y = torch.arange(12) % 3
    mean, std = torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.1, 0.2, 0.3])
    return ImageDataset(
        x, y, mean=mean, std=std, transform=Compose(RandomCrop(2), RandomHorizontalFlip())
    )


def test_dataset_reproducible_from_the_global_generator():
    ds = _colour_split()
    idx = [5, 0, 11, 3]
    with torch.random.fork_rng():
        torch.manual_seed(7)
        a = ds.batch(idx)
        torch.manual_seed(7)
        b = ds.batch(idx)
        torch.manual_seed(8)
        c = ds.batch(idx)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], ds.labels[idx])
    assert not torch.equal(a[0], c[0])
    # per-example access runs the same transform on a batch of one
    with torch.random.fork_rng():
        torch.manual_seed(7)
        single = ds[5]
        torch.manual_seed(7)
        assert torch.equal(single[0], ds.batch([5])[0][0])
    # standardisation after augmentation: crop padding is black, -mean/std
    plain = ImageDataset(ds.images, ds.labels, mean=ds.mean, std=ds.std)
    x, _ = plain.batch([1])
    expected = (ds.images[1].float() / 255 - ds.mean[:, None, None]) / ds.std[:, None, None]
    torch.testing.assert_close(x[0], expected)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        aug = ds.batch(range(12))[0]
    black = (-ds.mean / ds.std)[None, :, None, None].expand_as(aug)
    assert torch.isclose(aug, black).any()


def test_dataset_fast_path_through_dataloader():
    from torch.utils.data import DataLoader

    ds = _colour_split()
    with torch.random.fork_rng():
        torch.manual_seed(4)
        pairs = ds.__getitems__([0, 1, 2, 3])
        torch.manual_seed(4)
        direct = ds.batch([0, 1, 2, 3])
        # the DataLoader calls __getitems__ with the batch's indices and collates the pairs
        loader = DataLoader(ds, batch_size=4, shuffle=False)
        torch.manual_seed(5)
        xb, yb = next(iter(loader))
        torch.manual_seed(5)
        again = next(iter(loader))
    assert torch.equal(torch.stack([x for x, _ in pairs]), direct[0])
    assert torch.equal(torch.stack([y for _, y in pairs]), direct[1])
    assert torch.equal(xb, again[0]) and torch.equal(yb, direct[1])
    assert xb.shape == (4, 3, 6, 6) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    with pytest.raises(ValueError, match="differ in length"):
        ImageDataset(ds.images, ds.labels[:3])


# -- scikit-learn's data without importing scikit-learn -----------------------------------------


@pytest.mark.parametrize("packaged", [True, False], ids=["file", "sklearn-loader"])
def test_packaged_digits_and_photographs_equal_scikit_learns(monkeypatch, packaged):
    """Read from the files inside the package, or (when the files are not where they are
    expected) through scikit-learn's loaders: the same arrays and dtypes either way."""
    from sklearn.datasets import load_digits, load_sample_images

    from bayesflat.data import packaged as p

    if not packaged:
        monkeypatch.setattr(p, "sklearn_file", lambda *parts: None)
    pixels, labels = p.digits_table()
    bunch = load_digits()
    assert pixels.dtype == bunch.data.dtype and labels.dtype == bunch.target.dtype
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)
    photos, expected = p.sample_photographs(), load_sample_images().images
    assert len(photos) == len(expected) == 2
    for photo, reference in zip(photos, expected, strict=True):
        assert photo.dtype == reference.dtype == np.uint8
        assert np.array_equal(photo, reference)


def test_stratified_indices_equal_train_test_split():
    """Index for index the split scikit-learn's train_test_split makes (stratified, seeded),
    over random class sizes, fractions and seeds, and refused in the same cases."""
    from sklearn.model_selection import train_test_split

    from bayesflat.data.packaged import stratified_indices

    rng = np.random.default_rng(0)
    compared = refused = 0
    for _ in range(150):
        sizes = rng.integers(1, 25, size=int(rng.integers(2, 7)))
        labels = rng.permutation(np.repeat(np.arange(len(sizes)) * 3, sizes))
        fraction, seed = float(rng.uniform(0.05, 0.9)), int(rng.integers(0, 2**31))
        index = np.arange(len(labels))
        try:
            expected = train_test_split(
                index, test_size=fraction, random_state=seed, stratify=labels
            )
        except ValueError:
            with pytest.raises(ValueError, match="class"):
                stratified_indices(labels, fraction, seed)
            refused += 1
            continue
        for part, reference in zip(stratified_indices(labels, fraction, seed), expected,
                                   strict=True):  # fmt: skip
            assert part.dtype == reference.dtype
            assert np.array_equal(part, reference), (sizes, fraction, seed)
        compared += 1
    assert compared >= 100 and refused >= 10  # both branches are exercised
