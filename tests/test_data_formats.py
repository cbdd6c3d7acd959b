"""Readers of users' data formats, checked on small files written to each format's specification."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from bayesflat.data import (
    DataSplit,
    available_formats,
    channel_stats,
    detect_format,
    load,
    load_ood,
    ood_sets,
    read_cifar_binary,
    read_cifar_python,
    read_image_folder,
    read_svhn_mat,
    write_cifar_binary,
    write_cifar_folder,
    write_cifar_python,
    write_idx,
    write_image_folder,
    write_svhn_mat,
)

CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def images(n, channels=3, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def balanced_labels(n, classes, seed=0):
    return np.random.default_rng(seed).permutation(np.arange(n) % classes)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """A CIFAR-10 binary archive of 40 training images (two batches) and 20 test images."""
    x = images(40)
    y = np.concatenate([balanced_labels(20, 10, seed=s) for s in (2, 3)])  # balanced per batch
    tx, ty = images(20, seed=1), balanced_labels(20, 10, seed=1)
    root = tmp_path_factory.mktemp("download") / "cifar-10-batches-bin"
    write_cifar_folder(root, (x, y), (tx, ty), classes=CIFAR10_NAMES, batches=2)
    return root, x, y, tx, ty


# --- CIFAR binary ----------------------------------------------------------------


def test_cifar10_record_layout_from_spec(tmp_path):
    # One record by hand: label byte, then the red, green and blue planes, each row-major.
    x = images(2, seed=3)
    raw = b"".join(
        bytes([label]) + x[i, 0].tobytes() + x[i, 1].tobytes() + x[i, 2].tobytes()
        for i, label in enumerate((7, 2))
    )
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(raw)
    read = read_cifar_binary(path)
    assert read.x.dtype == torch.uint8 and read.x.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(read.x.numpy(), x)
    assert read.y.tolist() == [7, 2] and read.classes == tuple(str(k) for k in range(10))
    assert write_cifar_binary(tmp_path / "again.bin", x, [7, 2]).read_bytes() == raw
    # pixel (row 1, column 2) of the green plane sits at 1 + 1024 + 32 * 1 + 2
    assert raw[1 + 1024 + 32 + 2] == x[0, 1, 1, 2]


def test_cifar100_records_and_names(tmp_path):
    x = images(6, seed=4)
    fine, coarse = np.array([0, 99, 50, 3, 3, 7]), np.array([19, 0, 4, 1, 1, 2])
    raw = b"".join(bytes([c, f]) + img.tobytes() for img, f, c in zip(x, fine, coarse, strict=True))
    path = tmp_path / "train.bin"
    path.write_bytes(raw)
    names = [f"fine{k}" for k in range(100)]
    (tmp_path / "fine_label_names.txt").write_text("\n".join(names) + "\n\n")
    read = read_cifar_binary(path)
    np.testing.assert_array_equal(read.x.numpy(), x)
    assert read.y.tolist() == fine.tolist() and read.classes == tuple(names)
    coarse_read = read_cifar_binary(path, label="coarse")
    assert coarse_read.y.tolist() == coarse.tolist()
    assert coarse_read.classes == tuple(str(k) for k in range(20))  # no coarse names file
    assert write_cifar_binary(tmp_path / "w.bin", x, fine, coarse=coarse).read_bytes() == raw
    with pytest.raises(ValueError, match="no coarse labels"):
        read_cifar_binary(
            write_cifar_binary(tmp_path / "test_batch.bin", x, fine % 10), label="coarse"
        )


def test_cifar_folder_load(cifar10):
    root, x, y, tx, ty = cifar10
    assert sorted(os.listdir(root)) == [
        "batches.meta.txt",
        "data_batch_1.bin",
        "data_batch_2.bin",
        "test_batch.bin",
    ]
    assert detect_format(root) == "cifar-binary"
    data = load(root)
    assert isinstance(data, DataSplit) and data.source == f"cifar-binary:{root}"
    assert data.classes == CIFAR10_NAMES and data.num_classes == 10 and data.channels == 3
    assert data.image_shape == (32, 32) and data.num_train == 40
    np.testing.assert_array_equal(data.x_train.numpy(), x)  # batches in order
    np.testing.assert_array_equal(data.y_train.numpy(), y)
    np.testing.assert_array_equal(data.x_test.numpy(), tx)  # the archive's own test batch
    np.testing.assert_array_equal(data.y_test.numpy(), ty)
    assert data.x_val.shape == (0, 3, 32, 32)
    # statistics of the training images only, per channel, population std
    v = x.astype(np.float64) / 255
    np.testing.assert_allclose(data.mean.numpy(), v.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(data.std.numpy(), v.std(axis=(0, 2, 3)), rtol=1e-6)
    # the download folder around the extracted archive is entered
    assert load(root.parent).source == f"cifar-binary:{root}"
    # one batch file alone: its records are the pool, test carved from it
    one = load(root / "data_batch_1.bin", test_size=0.5)
    assert len(one.y_train) == len(one.y_test) == 10


def test_cifar_validation_split(cifar10):
    root, x, y, tx, _ = cifar10
    data = load(root, val_size=0.25, seed=3)
    assert len(data.y_val) == 10 and len(data.y_train) == 30
    assert sorted(data.y_val.tolist()) == list(range(10))  # stratified: one per class
    rows = {img.tobytes() for img in x}
    train, val = ({img.tobytes() for img in s.numpy()} for s in (data.x_train, data.x_val))
    assert train | val == rows and not train & val
    np.testing.assert_array_equal(data.x_test.numpy(), tx)
    v = data.x_train.numpy().astype(np.float64) / 255  # statistics of the 30, not the 40
    np.testing.assert_allclose(data.mean.numpy(), v.mean(axis=(0, 2, 3)), rtol=1e-6)
    again = load(root, val_size=0.25, seed=3)
    assert torch.equal(again.x_val, data.x_val)
    assert not torch.equal(load(root, val_size=0.25, seed=4).y_val, data.y_val)


def test_cifar_binary_errors(tmp_path):
    path = write_cifar_binary(tmp_path / "data_batch_1.bin", images(3), [1, 2, 3])
    truncated = tmp_path / "test_batch.bin"
    truncated.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"test_batch\.bin.*9214 bytes is not a whole.*3073-byte"):
        read_cifar_binary(truncated)
    bad = tmp_path / "data_batch_2.bin"
    bad.write_bytes(bytes([10]) + bytes(3072))
    with pytest.raises(
        ValueError, match=r"data_batch_2\.bin.*label 10 of example 0 is out of range"
    ):
        read_cifar_binary(bad)
    odd = tmp_path / "odd"
    odd.write_bytes(bytes(3073 * 3074))
    with pytest.raises(ValueError, match="fits both"):
        read_cifar_binary(odd)
    assert read_cifar_binary(odd, variant="cifar100").x.shape == (3073, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_cifar_binary(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="32x32"):
        write_cifar_binary(tmp_path / "x.bin", images(1, size=8), [0])


# --- CIFAR python ----------------------------------------------------------------


def test_cifar_python_matches_binary(tmp_path, cifar10):
    _, x, y, tx, ty = cifar10
    root = write_cifar_folder(
        tmp_path / "cifar-10-batches-py",
        (x, y),
        (tx, ty),
        classes=CIFAR10_NAMES,
        python=True,
        batches=3,
    )
    assert detect_format(root) == "cifar-python"
    data = load(root)
    np.testing.assert_array_equal(data.x_train.numpy(), x)
    np.testing.assert_array_equal(data.y_train.numpy(), y)
    np.testing.assert_array_equal(data.x_test.numpy(), tx)
    assert data.classes == CIFAR10_NAMES
    # the file is the documented dict
    with open(root / "data_batch_1", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    assert batch[b"data"].shape == (14, 3072) and batch[b"data"].dtype == np.uint8
    assert batch[b"labels"] == y[:14].tolist()


def test_cifar100_python(tmp_path):
    x, fine = images(40), balanced_labels(40, 100)
    coarse = fine // 5
    root = write_cifar_folder(
        tmp_path / "cifar-100-python",
        (x, fine, coarse),
        (x[:10], fine[:10], coarse[:10]),
        python=True,
    )
    assert sorted(os.listdir(root)) == ["meta", "test", "train"]
    read = read_cifar_python(root / "train", label="coarse")
    assert read.y.tolist() == coarse.tolist() and len(read.classes) == 20
    data = load(root, label="coarse")
    assert data.num_classes == 20 and len(data.y_test) == 10


def test_cifar_python_old_numpy_module_and_protocol_5(tmp_path):
    x, y = images(3), [0, 1, 2]
    old = tmp_path / "data_batch_1"
    write_cifar_python(old, x, y)
    # files pickled under numpy 1 name numpy.core.multiarray
    raw = old.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    old.write_bytes(raw)
    np.testing.assert_array_equal(read_cifar_python(old).x.numpy(), x)
    new = tmp_path / "data_batch_2"
    new.write_bytes(pickle.dumps({b"data": x.reshape(3, -1), b"labels": np.arange(3)}, protocol=5))
    np.testing.assert_array_equal(read_cifar_python(new).x.numpy(), x)


def _python2_batch(x, labels):
    """A CIFAR-10 batch as Python 2's cPickle wrote it (protocol 2, str opcodes, numpy 1 names)."""

    def string(b):  # BINSTRING: a Python 2 str, bytes under encoding="bytes"
        return b"T" + struct.pack("<i", len(b)) + b

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
        + b"(K\x01" + b"M" + struct.pack("<H", len(x)) + b"M\x00\x0c\x86"  # version, (n, 3072)
        + b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89" + string(x.tobytes()) + b"tb"
    )  # fmt: skip
    items = b"".join(b"K" + bytes([v]) for v in labels)
    return (
        b"\x80\x02}(" + string(b"batch_label") + string(b"training batch 1 of 5")
        + string(b"labels") + b"](" + items + b"e" + string(b"data") + array + b"u."
    )  # fmt: skip


def test_cifar_python_reads_python2_pickles(tmp_path):
    x, y = images(3, seed=12), [4, 0, 9]
    path = tmp_path / "data_batch_1"
    path.write_bytes(_python2_batch(x, y))
    read = read_cifar_python(path)
    np.testing.assert_array_equal(read.x.numpy(), x)
    assert read.y.tolist() == y


@pytest.mark.parametrize(
    ("module", "name", "argument"),
    [
        ("os", "system", "touch {marker}"),
        ("builtins", "eval", "open({marker!r}, 'w')"),
        ("posix", "system", "touch {marker}"),
        ("subprocess", "call", "touch {marker}"),
    ],
)
def test_cifar_python_refuses_code(tmp_path, module, name, argument):
    marker = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    text = argument.format(marker=str(marker))
    # GLOBAL module.name, then call it with one string: what a malicious pickle does
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(text))
    path.write_bytes(payload + text.encode() + b"\x85R.")
    with pytest.raises(ValueError, match=rf"refusing to unpickle {module}\.{name}.*binary version"):
        read_cifar_python(path)
    with pytest.raises(ValueError, match="refusing"):
        load(path)
    assert not marker.exists()


def test_cifar_python_errors(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match="is a dict, got list"):
        read_cifar_python(path)
    path.write_bytes(pickle.dumps({b"data": images(2).reshape(2, -1)}, protocol=2))
    with pytest.raises(ValueError, match="b'labels'.*b'fine_labels'"):
        read_cifar_python(path)
    path.write_bytes(pickle.dumps({b"data": images(2).reshape(2, -1), b"labels": [3, 12]}))
    with pytest.raises(ValueError, match="label 12 of example 1 is out of range; expected 0..9"):
        read_cifar_python(path)
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="not a readable CIFAR python batch"):
        read_cifar_python(path)


# --- SVHN --------------------------------------------------------------------------


def test_svhn_mat_from_spec(tmp_path):
    from scipy.io import loadmat, savemat

    x, digits = images(5, seed=6), np.array([0, 1, 9, 0, 5])
    # X (H, W, C, n) uint8 and y (n, 1) with 10 for the digit 0, as distributed
    path = tmp_path / "hand.mat"
    savemat(path, {"X": x.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [9], [10], [5]])})
    read = read_svhn_mat(path)
    np.testing.assert_array_equal(read.x.numpy(), x)
    assert read.y.tolist() == digits.tolist() and read.classes == tuple("0123456789")
    written = loadmat(write_svhn_mat(tmp_path / "w.mat", x, digits))
    assert written["X"].shape == (32, 32, 3, 5) and written["X"].dtype == np.uint8
    assert written["y"].ravel().tolist() == [10, 1, 9, 10, 5]
    np.testing.assert_array_equal(written["X"], x.transpose(2, 3, 1, 0))


def test_svhn_errors(tmp_path):
    from scipy.io import savemat

    path = tmp_path / "bad.mat"
    savemat(path, {"X": images(2).transpose(2, 3, 1, 0), "y": np.array([[3], [11]])})
    with pytest.raises(ValueError, match=r"bad\.mat.*label 11 of example 1 is out of range"):
        read_svhn_mat(path)
    savemat(path, {"X": images(2).transpose(2, 3, 1, 0)})
    with pytest.raises(ValueError, match="no variable 'y'"):
        read_svhn_mat(path)
    hdf = tmp_path / "v73.mat"
    # 116 bytes of text, 8 of subsystem offset, version 0x0200 and "IM": a v7.3 (HDF5) header
    hdf.write_bytes(b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(512))
    with pytest.raises(ValueError, match="v7.3"):
        read_svhn_mat(hdf)


def test_svhn_folder_and_ood_for_cifar(tmp_path, cifar10):
    x, y = images(30, seed=7), balanced_labels(30, 10, seed=7)
    tx, ty = images(12, seed=8), balanced_labels(12, 10, seed=8)
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    write_svhn_mat(svhn / "train_32x32.mat", x, y)
    write_svhn_mat(svhn / "test_32x32.mat", tx, ty)
    assert detect_format(svhn) == "svhn" and detect_format(svhn / "test_32x32.mat") == "svhn"
    data = load(svhn)
    np.testing.assert_array_equal(data.x_test.numpy(), tx)
    assert data.classes == tuple("0123456789")

    cifar = load(cifar10[0])
    ood = load_ood(svhn, cifar)  # the test split of a data set
    mean, std = cifar.mean[None, :, None, None], cifar.std[None, :, None, None]
    expected = (torch.from_numpy(tx).float() / 255 - mean) / std
    torch.testing.assert_close(ood, expected)
    assert torch.equal(load_ood(svhn / "test_32x32.mat", cifar), ood)
    some = load_ood(svhn, cifar, n=5, seed=1)
    assert some.shape == (5, 3, 32, 32)
    assert all(any(torch.equal(s, o) for o in ood) for s in some)


# --- image folders ---------------------------------------------------------------


def test_image_folder_round_trip(tmp_path):
    x, y = images(12, size=6, seed=9), balanced_labels(12, 3)
    root = write_image_folder(tmp_path / "pets", x, y, ["dog", "cat", "bird"])
    assert sorted(os.listdir(root)) == ["bird", "cat", "dog"]
    read = read_image_folder(root)
    assert read.classes == ("bird", "cat", "dog")  # sorted folder names
    order = np.argsort(np.array(["dog", "cat", "bird"])[y], kind="stable")  # class, then file
    np.testing.assert_array_equal(read.x.numpy(), x[order])
    assert [read.classes[k] for k in read.y] == [["dog", "cat", "bird"][k] for k in y[order]]
    assert detect_format(root) == "image-folder"


def test_image_folder_modes_and_sizes(tmp_path):
    from PIL import Image

    grey = write_image_folder(
        tmp_path / "grey", images(4, channels=1, size=5), [0, 1, 0, 1], ["a", "b"]
    )
    assert read_image_folder(grey).x.shape == (4, 1, 5, 5)
    assert read_image_folder(grey, mode="RGB").x.shape == (4, 3, 5, 5)
    # one colour image makes the whole set RGB
    Image.new("RGB", (5, 5), (255, 0, 0)).save(grey / "a" / "zz.png")
    mixed = read_image_folder(grey)
    assert mixed.x.shape == (5, 3, 5, 5)
    assert mixed.x[2, :, 0, 0].tolist() == [255, 0, 0]
    assert torch.equal(mixed.x[0, 0], mixed.x[0, 1])  # grey converted: R = G = B
    Image.new("L", (7, 4)).save(grey / "b" / "big.png")
    with pytest.raises(ValueError, match=r"big\.png' is 4x7 \(height x width\).*size="):
        read_image_folder(grey)
    assert read_image_folder(grey, size=(3, 6)).x.shape == (6, 3, 3, 6)
    assert read_image_folder(grey, size=8, mode="L").x.shape == (6, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images in class subfolders"):
        read_image_folder(empty)
    with pytest.raises(ValueError, match="cannot tell the data format of the folder"):
        load(empty)
    some = write_image_folder(tmp_path / "some", images(2, size=4), [0, 0], ["dogs"])
    (some / "cats").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*cats' holds no images"):
        read_image_folder(some)
    broken = write_image_folder(tmp_path / "broken", images(2, size=4), [0, 1], ["a", "b"])
    (broken / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.png"):
        read_image_folder(broken)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_image_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="at least 2"):
        load(write_image_folder(tmp_path / "one", images(4, size=4), [0] * 4, ["only"]))


def test_image_folder_train_test_layout_and_loose_ood(tmp_path):
    root = tmp_path / "shapes"
    x, y = images(16, size=8, seed=10), balanced_labels(16, 4)
    write_image_folder(root / "train", x, y, ["a", "b", "c", "d"])
    write_image_folder(root / "test", x[:6], np.array([3, 3, 1, 1, 3, 1]), ["a", "b", "c", "d"])
    data = load(root, val_size=0.25)
    assert data.classes == ("a", "b", "c", "d") and data.source == f"image-folder:{root}"
    assert sorted(data.y_test.tolist()) == [1, 1, 1, 3, 3, 3]  # label numbers of train
    assert len(data.y_val) == 4 and len(data.y_train) == 12
    # an OOD folder of images without class subfolders
    loose = tmp_path / "loose"
    loose.mkdir()
    for f in (root / "train" / "a").iterdir():
        f.rename(loose / f.name)
    ood = load_ood(loose, data)
    assert ood.shape == (4, 3, 8, 8)
    with pytest.raises(
        ValueError, match=r"have shape \(3, 8, 8\) but the model takes \(1, 28, 28\)"
    ):
        load_ood(loose, load(_mnist_folder(tmp_path / "mnist")))


# --- npz and IDX through load ------------------------------------------------------


def test_load_npz_layouts(tmp_path):
    x, y = images(20, channels=3, size=6), balanced_labels(20, 4)
    path = tmp_path / "set.npz"
    np.savez(
        path,
        x=x.transpose(0, 2, 3, 1),
        y=y,
        x_test=x[:4].transpose(0, 2, 3, 1),
        y_test=y[:4],
        classes=np.array(["w", "x", "y", "z"]),
    )
    assert detect_format(path) == "npz"
    data = load(path)
    np.testing.assert_array_equal(data.x_train.numpy(), x)  # (n, H, W, C) -> (n, C, H, W)
    np.testing.assert_array_equal(data.x_test.numpy(), x[:4])
    assert data.classes == ("w", "x", "y", "z") and data.x_train.dtype == torch.uint8
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=x[:, 0].astype(np.float64) / 255, y=y)
    data = load(floats, test_size=0.2)
    assert data.x_train.shape == (16, 1, 6, 6) and data.x_train.dtype == torch.float32
    assert len(data.y_test) == 4 and data.classes == ("0", "1", "2", "3")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x, y=y - 1)
    with pytest.raises(ValueError, match="label -1 of example"):
        load(bad)
    np.savez(bad, x=x, y=y, x_test=x)
    with pytest.raises(ValueError, match="both 'x_test' and 'y_test'"):
        load(bad)


def _mnist_folder(root, n=24, test=8):
    root.mkdir(parents=True)
    x, y = images(n + test, channels=1, size=28, seed=11)[:, 0], balanced_labels(n + test, 4)
    write_idx(root / "train-images-idx3-ubyte.gz", x[:n], compress=True)
    write_idx(root / "train-labels-idx1-ubyte.gz", y[:n].astype(np.uint8), compress=True)
    write_idx(root / "t10k-images-idx3-ubyte", x[n:])
    write_idx(root / "t10k-labels-idx1-ubyte", y[n:].astype(np.uint8))
    return root


def test_write_idx_from_spec_and_load_folder(tmp_path):
    path = write_idx(tmp_path / "a-idx2-ubyte", np.array([[1, -2, 3]], dtype=np.int16))
    assert path.read_bytes() == b"\x00\x00\x0b\x02" + struct.pack(">II", 1, 3) + struct.pack(
        ">3h", 1, -2, 3
    )
    gz = write_idx(tmp_path / "b.gz", np.arange(3, dtype=np.uint8), compress=True)
    assert gzip.decompress(gz.read_bytes()) == b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes(
        [0, 1, 2]
    )
    with pytest.raises(ValueError, match="no IDX type code"):
        write_idx(tmp_path / "c", np.zeros(2, dtype=np.int64))
    root = _mnist_folder(tmp_path / "mnist")
    assert detect_format(root) == "idx"
    data = load(root, val_size=0.25)
    assert data.x_train.shape == (18, 1, 28, 28) and data.x_test.shape == (8, 1, 28, 28)
    assert data.classes == ("0", "1", "2", "3") and data.channels == 1
    with pytest.raises(ValueError, match="single IDX array.*pass the folder"):
        load(root / "t10k-images-idx3-ubyte")


# --- detection and errors ----------------------------------------------------------


def test_detection_and_errors(tmp_path):
    assert available_formats() == (
        "cifar-binary",
        "cifar-python",
        "svhn",
        "image-folder",
        "npz",
        "idx",
    )
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load(tmp_path / "missing")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="cannot tell the data format of the file.*format="):
        detect_format(text)
    with pytest.raises(ValueError, match="format must be one of"):
        load(text, format="cifar")
    with pytest.raises(ValueError, match="val_size must be a fraction"):
        load(text, val_size=1.0)
    with pytest.raises(ValueError, match="label must be one of"):
        load(write_cifar_binary(tmp_path / "d.bin", images(2), [0, 1]), label="medium")


# --- the split: normalisation, evaluation sets, generated OOD sets -----------------


def test_channel_stats_exact():
    x = torch.from_numpy(images(7, channels=2, size=5))
    mean, std = channel_stats(x)
    v = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean.numpy(), v.mean(axis=(0, 2, 3)), rtol=1e-7)
    np.testing.assert_allclose(std.numpy(), v.std(axis=(0, 2, 3)), rtol=1e-6)
    fm, fs = channel_stats(x.float() / 255)
    torch.testing.assert_close(fm, mean)
    torch.testing.assert_close(fs, std)
    flat_mean, _ = channel_stats(torch.full((3, 10), 0.25))
    constant = channel_stats(torch.full((3, 2, 4, 4), 7, dtype=torch.uint8))
    assert flat_mean.tolist() == [0.25] and constant[1].tolist() == [1.0, 1.0]


def test_inputs_and_eval_sets(cifar10):
    data = load(cifar10[0], val_size=0.25)
    sets = data.eval_sets()
    assert list(sets) == ["test", "val"] and data.standardized
    x, y = sets["test"]
    assert x.dtype == torch.float32 and torch.equal(y, data.y_test)
    manual = (data.x_test.double() / 255 - data.mean.double()[:, None, None]) / data.std.double()[
        :, None, None
    ]
    torch.testing.assert_close(x, manual.float())
    # standardised training inputs have mean 0 and std 1 per channel
    z = data.inputs(data.x_train).double()
    torch.testing.assert_close(
        z.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        z.std(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="laid out like the training images"):
        data.inputs(torch.zeros(2, 1, 32, 32))
    assert "source='cifar-binary:" in repr(data)


def test_generated_ood_sets_for_colour_images(cifar10):
    data = load(cifar10[0])
    sets = ood_sets(data, names=["patches", "noise", "uniform", "inverted"], n=6)
    assert list(sets) == ["patches", "noise", "uniform", "inverted"]
    for name, x in sets.items():
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32), name
    assert sets["patches"].shape[0] == 6 and sets["inverted"].shape[0] == 20
    # inputs of the data's model: standardised intensities
    inverted = 1 - data.x_test.float() / 255
    torch.testing.assert_close(sets["inverted"], data.inputs(inverted))
    patches = sets["patches"] * data.std[:, None, None] + data.mean[:, None, None]
    assert patches.min() >= -1e-6 and patches.max() <= 1 + 1e-6
