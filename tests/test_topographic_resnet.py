"""Topographic ResNet (perfect-square widths, conv bias as in the paper) and the digits data."""
import math

import pytest
import torch
from torch import nn

from datamodules.images import DigitsDataModule
from lightning_modules.topographic_resnet import PRESETS, TopographicClassifier, TopographicResNet
from tests.helpers import write_cifar, write_image_folder


@pytest.mark.parametrize("preset", ["tiny", "resnet18"])
def test_every_conv_is_a_perfect_square_sheet_with_bias(preset):
    net = TopographicResNet(10, 3, stem="imagenet", **PRESETS[preset])
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(math.isqrt(c.out_channels) ** 2 == c.out_channels for c in convs)
    assert all(c.bias is not None for c in convs)
    if preset == "resnet18":
        assert len(convs) == 20  # stem + 16 block convs + 3 downsample convs, as ResNet-18
        assert sorted({c.out_channels for c in convs}) == [64, 144, 256, 529] and net.fc.in_features == 529
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_conv_bias_can_be_turned_off_and_blocks_are_torchvision():
    from torchvision.models.resnet import BasicBlock

    net = TopographicResNet(10, 1, stem="small", conv_bias=False, **PRESETS["tiny"])
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    assert sum(isinstance(m, BasicBlock) for m in net.modules()) == 3
    assert net(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_bad_model_config():
    with pytest.raises(ValueError, match="preset='huge'"):
        TopographicClassifier(preset="huge")
    with pytest.raises(ValueError, match="need lr > 0"):
        TopographicClassifier(lr=0.0)
    with pytest.raises(ValueError, match="must be non-empty and of equal length"):
        TopographicResNet(10, 3, widths=[16, 36], blocks=[1])


def test_digits_split_is_stratified_and_scaled():
    dm = DigitsDataModule()
    dm.setup()
    x_tr, y_tr = dm.train_set.tensors
    x_te, y_te = dm.test_set.tensors
    assert len(y_tr) == 1347 and len(y_te) == 450 and x_tr.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    share = torch.bincount(y_te, minlength=10).float() / len(y_te)
    assert float(share.min()) > 0.09 and float(share.max()) < 0.11  # ~10% per class in both splits
    with pytest.raises(ValueError, match="data.batch_size must be >= 1, got 0"):
        DigitsDataModule(batch_size=0)


@pytest.mark.parametrize("variant, classes, train_n", [("cifar10", 10, 100), ("cifar100", 100, 20)])
def test_cifar_from_python_pickles(tmp_path, variant, classes, train_n):
    from datamodules.images import CIFARDataModule

    write_cifar(tmp_path, variant)
    dm = CIFARDataModule(str(tmp_path), variant=variant, batch_size=4)
    dm.setup()
    assert dm.num_classes == classes and len(dm.train_set) == train_n and len(dm.test_set) == 20
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and int(y.max()) < classes
    xv, _ = next(iter(dm.val_dataloader()))  # no augmentation: the stored image, normalised
    raw = torch.from_numpy(dm.test_set.images[0]).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    std = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    torch.testing.assert_close(xv[0], (raw - mean) / std)


def test_cifar_missing_and_malformed(tmp_path):
    from datamodules.images import CIFARDataModule

    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py' does not exist"):
        CIFARDataModule(str(tmp_path / "nowhere"))
    d = write_cifar(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="is missing data_batch_3"):
        CIFARDataModule(str(tmp_path))


def test_image_folder_tree_with_paper_augmentations(tmp_path):
    from datamodules.images import ImageFolderDataModule

    write_image_folder(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), image_size=24, resize=32, batch_size=4, num_workers=0)
    dm.setup()
    assert dm.num_classes == 3 and dm.train_set.classes == ["cat", "dog", "fish"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 24, 24) and int(y.max()) <= 2
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape[-2:] == (24, 24)
    with pytest.raises(FileNotFoundError, match="image folder .*val' does not exist"):
        (tmp_path / "val").rename(tmp_path / "valid")
        ImageFolderDataModule(str(tmp_path))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        ImageFolderDataModule(str(empty))


@pytest.mark.parametrize("damage, needle", [
    (lambda f: f.write_bytes(b"this is not a pickle"), "data_batch_2 is not a CIFAR python batch (unreadable pickle"),
    (lambda f: f.write_bytes(b""), "data_batch_2 is not a CIFAR python batch (unreadable pickle: EOFError)"),
    (lambda f: f.write_bytes(__import__("pickle").dumps({b"pixels": [1], b"labels": [0]})),
     "expected a dict with keys b'data' and b'labels'"),
    (lambda f: f.write_bytes(__import__("pickle").dumps({b"data": [[0] * 100] * 2, b"labels": [0, 1]})),
     "data (2, 100), labels (2,); expected (N, 3072) and (N,)"),
    (lambda f: f.write_bytes(__import__("pickle").dumps({b"data": [[0] * 3072] * 2, b"labels": [0]})),
     "data (2, 3072), labels (1,)"),
])
def test_malformed_cifar_file_is_a_one_line_cli_error(tmp_path, capsys, damage, needle):
    from recipes.cli import main
    from tests.helpers import run_dir_args

    d = write_cifar(tmp_path / "data")
    damage(d / "data_batch_2")
    code = main(["fit", "--config", "recipes/cbsom_cifar10.yaml", f"--data.init_args.path={tmp_path / 'data'}",
                 "--data.init_args.num_workers=0", *run_dir_args(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ValueError: ") and needle in err[-1], err[-3:]
    assert "Traceback" not in "\n".join(err) and len(err[-1]) < 300


def test_image_folder_with_an_empty_class_or_mismatched_classes(tmp_path):
    from datamodules.images import ImageFolderDataModule

    write_image_folder(tmp_path / "a")
    for f in (tmp_path / "a" / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes dog"):
        ImageFolderDataModule(str(tmp_path / "a"), num_workers=0).setup()
    write_image_folder(tmp_path / "b")
    (tmp_path / "b" / "val" / "fish").rename(tmp_path / "b" / "val" / "shark")
    with pytest.raises(ValueError, match=r"class folders differ .*only in train \['fish'\], only in val \['shark'\]"):
        ImageFolderDataModule(str(tmp_path / "b"), num_workers=0).setup()
