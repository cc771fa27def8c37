"""tests/miniature_baselines.py: the Fashion-MNIST reader on a tiny IDX set written here in the
package's gzip format, its one-line error when files are missing, and the weighted kNN."""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import miniature_baselines as mb  # noqa: E402


def write_idx_gz(path, array):
    """IDX as in the dataset: magic (0, 0, 0x08 = uint8, number of dims), big-endian int32 dims,
    then the bytes; gzip-compressed.  2051 = images (3 dims), 2049 = labels (1 dim)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_set(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where the files are unzipped
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    data = {}
    for split, n in (("train", 40), ("t10k", 20)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx_gz(src / f"{split}-images-idx3-ubyte.gz", images)
        write_idx_gz(src / f"{split}-labels-idx1-ubyte.gz", labels)
        data[split] = images, labels
    return src, tmp_path / "cache", data


def test_idx_header_is_the_standard_one(tmp_path):
    write_idx_gz(tmp_path / "a.gz", np.zeros((2, 28, 28)))
    write_idx_gz(tmp_path / "b.gz", np.zeros(2))
    with gzip.open(tmp_path / "a.gz") as fa, gzip.open(tmp_path / "b.gz") as fb:
        assert struct.unpack(">4I", fa.read(16)) == (2051, 2, 28, 28)
        assert struct.unpack(">2I", fb.read(8)) == (2049, 2)


def test_reader_returns_the_written_images_and_labels(tiny_set):
    src, cache, data = tiny_set
    for train, split in ((True, "train"), (False, "t10k")):
        ds = mb.fashion_mnist(str(src), train=train)
        images, labels = data[split]
        assert len(ds) == len(labels)
        assert torch.equal(ds.data, torch.from_numpy(images))
        assert torch.equal(ds.targets, torch.from_numpy(labels).long())
        image, label = ds[3]  # through torchvision's own __getitem__ (a PIL image)
        assert np.array_equal(np.asarray(image), images[3]) and label == labels[3]
    assert any("FashionMNIST" in d for d, _, _ in os.walk(cache))  # unzipped there, not in src


def test_balanced_subset_takes_equal_classes(tiny_set):
    src, cache, _ = tiny_set
    labels = mb.fashion_mnist(str(src), train=True).targets
    rows = mb.balanced_subset(labels, 20, 10, torch.Generator().manual_seed(0))
    assert len(rows.unique()) == 20
    assert torch.equal(labels[rows].bincount(minlength=10), torch.full((10,), 2))


def test_missing_files_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        mb.main(["--data", str(tmp_path / "none")])
    assert err.value.code == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and out.out == ""
    assert "apt-get install dataset-fashion-mnist" in lines[0] and "download=True" in lines[0]


def test_bad_flag_one_line_exit_2(capsys):
    for argv, flag in ((["--n-train", "15"], "--n-train"), (["--knn-k", "0"], "--knn-k")):
        with pytest.raises(SystemExit) as err:
            mb.parse_args(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and len(lines) == 1 and flag in lines[0]


def test_weighted_knn_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10  # 4 orthogonal directions, one per class
    memory_labels = torch.arange(200) % 4
    memory = centres[memory_labels] + torch.randn(200, 16, generator=g)
    query_labels = torch.arange(40) % 4
    query = centres[query_labels] + torch.randn(40, 16, generator=g)
    weighted, nearest = mb.weighted_knn(query, memory, memory_labels, 4, k=20, tau=0.07)
    assert torch.equal(weighted, query_labels) and torch.equal(nearest, query_labels)
    # Swapping two classes' labels in the memory swaps the predictions.
    swapped = torch.tensor([1, 0, 2, 3])[memory_labels]
    weighted, _ = mb.weighted_knn(query, memory, swapped, 4, k=20, tau=0.07)
    assert torch.equal(weighted, torch.tensor([1, 0, 2, 3])[query_labels])


def test_weighted_knn_weights_votes_by_similarity():
    # k = 3: one very close neighbour of class 0 outvotes two far ones of class 1 at tau 0.07,
    # while plain majority (a huge tau) follows the two.
    memory = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    assert mb.weighted_knn(query, memory, labels, 2, k=3, tau=0.07)[0].item() == 0
    assert mb.weighted_knn(query, memory, labels, 2, k=3, tau=1e3)[0].item() == 1


def test_trained_network_is_the_checkpoints_model(tmp_path):
    """--checkpoint rows read the very weights the trainer saved (small stem included)."""
    model = mb.imagenet_train.ResNetEmbedding(16, "small")
    torch.nn.init.normal_(model.net.fc.weight)
    ckpt = {
        "model": model.state_dict(),
        "bank": torch.zeros(4, 16),
        "args": {"dim": 16, "stem": "small", "algo": "ir"},
        "num_train": 4,
        "epoch": 3,
    }
    torch.save(ckpt, tmp_path / "ckpt.pt")
    net, name = mb.trained(str(tmp_path / "ckpt.pt"))
    x = torch.randn(2, 3, 32, 32)
    model.eval(), net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    assert isinstance(net.net.maxpool, torch.nn.Identity) and "ir epoch 3" in name


def test_panel_script_refuses_unknown_panels_and_lesions():
    """tests/miniature_figure2.sh: a wrong panel or lesion is one line and exit status 2, before
    any training starts."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "miniature_figure2.sh")
    for args, message in (([], "usage:"), (["b", "gray"], "crop, flip or none, got gray")):
        res = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr
