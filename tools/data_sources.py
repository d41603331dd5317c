"""Datasets for the training and validation tools.

One entry point, :func:`create_image_dataset`, covers:

- ``fashion-mnist``: the 60k/10k Fashion-MNIST images read from local idx files. Debian's
  ``dataset-fashion-mnist`` package puts them in ``/usr/share/datasets/fashion-mnist``; the
  environment variable ``FOVEAL_FASHION_MNIST`` or ``--data-dir`` can point elsewhere. When no
  copy is found, torchvision's downloader fetches one into ``--data-dir``.
- a folder of images (class sub-folders, optionally under ``train/`` and ``val/``), through timm;
- any timm dataset spec: ``torch/<name>``, ``hfds/<name>``, ...

Images come out as PIL images in the mode the model expects (``L`` for one channel, else ``RGB``),
so timm's transforms apply unchanged.
"""
import gzip
import importlib.util
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import timm.data.auto_augment
import torch.utils.data
from PIL import Image, ImageOps

__all__ = [
    "DatasetProfile",
    "FashionMNIST",
    "ConvertMode",
    "create_image_dataset",
    "set_transform",
    "LabelledImageFiles",
    "foolbox_imagenet_samples",
    "dataset_profile",
    "dataset_num_classes",
    "FASHION_MNIST_CLASSES",
]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _pillow_rejects_zero_bit_posterize() -> bool:
    try:
        ImageOps.posterize(Image.new("L", (1, 1)), 0)
    except ValueError:
        return True
    return False


def _posterize(img, bits_to_keep, **kwargs):
    # zero bits keep nothing: the black image older Pillow returned
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


# timm's RandAugment "inc1" policies (every published recipe here) ask for 0-bit posterize at the top
# magnitude; Pillow 13 raises on that, so about 1 image in 600 would crash a training run. The ops
# are looked up in NAME_TO_OP when a transform is built, so the fix must be in before that.
_TIMM_POSTERIZE = timm.data.auto_augment.posterize
if _pillow_rejects_zero_bit_posterize():
    for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if timm.data.auto_augment.NAME_TO_OP.get(_name) is _TIMM_POSTERIZE:
            timm.data.auto_augment.NAME_TO_OP[_name] = _posterize

_TRAIN_SPLITS = ("train", "training")
_EVAL_SPLITS = ("test", "val", "valid", "validation", "eval", "evaluation")


@dataclass(frozen=True)
class DatasetProfile:
    """What a dataset implies for the model and the transforms when the user does not say."""
    num_classes: int
    in_chans: int
    input_size: tuple
    mean: tuple
    std: tuple
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    label_names: Sequence[str] = ()


_FASHION_MNIST_PROFILE = DatasetProfile(
    num_classes=10,
    in_chans=1,
    input_size=(1, 28, 28),
    mean=(0.2860,),
    std=(0.3530,),
    label_names=FASHION_MNIST_CLASSES,
)
_PROFILES = {
    "fashion-mnist": _FASHION_MNIST_PROFILE,
    "torch/fashion_mnist": _FASHION_MNIST_PROFILE,
}


def dataset_profile(name: str) -> Optional[DatasetProfile]:
    """The built-in defaults for a dataset name, or None for datasets that carry none."""
    return _PROFILES.get(name.lower())


class ConvertMode:
    """Convert a PIL image to ``mode`` (picklable, so it survives DataLoader workers)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw): big-endian header of dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path} is not an idx file of uint8 data (magic {magic:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, found {array.size} values")
    return array.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST from a folder holding the four idx files (gzipped or not)."""

    def __init__(self, root: str, split: str = "train", transform=None):
        split = split.lower()
        if split in _TRAIN_SPLITS:
            split = "train"
        elif split in _EVAL_SPLITS:
            split = "test"
        else:
            raise ValueError(f"Fashion-MNIST has the splits 'train' and 'test', got split={split!r}")
        root = Path(root)
        image_stem, label_stem = _FASHION_MNIST_FILES[split]
        image_path, label_path = _find_idx(root, image_stem), _find_idx(root, label_stem)
        if image_path is None or label_path is None:
            raise FileNotFoundError(f"no Fashion-MNIST {split} idx files in {root}")
        self.root = root
        self.split = split
        self.images = _read_idx(image_path)
        self.targets = _read_idx(label_path).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise ValueError(f"{root}: {len(self.images)} images but {len(self.targets)} labels")
        self.classes = list(FASHION_MNIST_CLASSES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def _fashion_mnist_folders(data_dir: Optional[str]):
    if data_dir:
        yield Path(data_dir)
        yield Path(data_dir) / "FashionMNIST" / "raw"
    if os.environ.get("FOVEAL_FASHION_MNIST"):
        yield Path(os.environ["FOVEAL_FASHION_MNIST"])
    for folder in FASHION_MNIST_DIRS:
        yield Path(folder)


def _load_fashion_mnist(split: str, data_dir: Optional[str], download: bool) -> FashionMNIST:
    for folder in _fashion_mnist_folders(data_dir):
        if _find_idx(folder, _FASHION_MNIST_FILES["test"][0]) is not None:
            return FashionMNIST(str(folder), split)
    if not download:
        raise FileNotFoundError(
            "Fashion-MNIST not found (looked in --data-dir, $FOVEAL_FASHION_MNIST and "
            f"{', '.join(FASHION_MNIST_DIRS)}). Install Debian's copy with "
            "`apt-get install -y dataset-fashion-mnist`, or pass --dataset-download to fetch it."
        )
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    root = Path(data_dir or Path.home() / ".cache" / "foveal" / "data")
    print(f"Fashion-MNIST not found locally; downloading it with torchvision into {root}", flush=True)
    try:
        TorchvisionFashionMNIST(str(root), train=True, download=True)
        TorchvisionFashionMNIST(str(root), train=False, download=True)
    except Exception as e:
        raise RuntimeError(
            f"Downloading Fashion-MNIST failed ({type(e).__name__}: {e}). This machine seems to be "
            "offline: install Debian's copy with `apt-get install -y dataset-fashion-mnist`, or put "
            "the four idx files in a folder and pass it as --data-dir."
        ) from e
    return FashionMNIST(str(root / "FashionMNIST" / "raw"), split)


def create_image_dataset(
        name: str,
        split: str,
        data_dir: Optional[str] = None,
        in_chans: int = 3,
        is_training: bool = False,
        download: bool = False,
        limit: Optional[int] = None,
        seed: int = 42,
):
    """Build a map-style dataset of (PIL image, label); :func:`set_transform` adds the transform.

    Args:
        name: ``fashion-mnist``, ``folder`` (images under ``data_dir``), a path to an image folder,
            or a timm dataset spec (``torch/cifar10``, ``hfds/<repo>``, ...).
        split: split name; folders look for a matching sub-folder (``train``, ``val``, ...).
        data_dir: root folder of the data (download target for ``torch/`` and ``fashion-mnist``).
        in_chans: channels the model takes; images are converted to ``L`` (1) or ``RGB`` (3).
        is_training: build the training variant (matters for iterable timm datasets).
        download: allow downloading when the dataset supports it.
        limit: keep only the first ``limit`` samples (quick runs and tests).
        seed: seed for timm datasets that shuffle internally.
    """
    from timm.data import create_dataset

    mode = "L" if in_chans == 1 else "RGB"
    if name.lower() == "fashion-mnist":
        dataset = _load_fashion_mnist(split, data_dir, download)
    else:
        if name == "folder" or os.path.isdir(name):
            root, spec = (data_dir if name == "folder" else name), ""
        else:
            root, spec = data_dir, name
        if spec == "" and not (root and os.path.isdir(root)):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        dataset = create_dataset(
            spec, root=root, split=split, is_training=is_training, download=download,
            input_img_mode=mode, seed=seed,
        )
    if not isinstance(dataset, torch.utils.data.Dataset) or isinstance(dataset, torch.utils.data.IterableDataset):
        raise ValueError(f"dataset {name!r} is iterable; the tools need a map-style dataset")
    set_transform(dataset, None, in_chans)
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return dataset


def set_transform(dataset, transform, in_chans: int) -> None:
    """Give ``dataset`` (or the dataset under a Subset) the mode conversion, then ``transform``."""
    from torchvision import transforms

    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    steps = [ConvertMode("L" if in_chans == 1 else "RGB")]
    if transform is not None:
        steps.append(transform)
    dataset.transform = transforms.Compose(steps)


def dataset_num_classes(dataset) -> Optional[int]:
    """Number of classes a dataset declares (None when it does not say)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    for holder in (dataset, getattr(dataset, "reader", None)):
        if holder is None:
            continue
        class_to_idx = getattr(holder, "class_to_idx", None)
        if class_to_idx:
            return len(class_to_idx)
        classes = getattr(holder, "classes", None)
        if classes:
            return len(classes)
    return None


class LabelledImageFiles(torch.utils.data.Dataset):
    """Images whose label is part of their name, read from a folder or a zip/wheel archive."""

    def __init__(self, items, transform=None):
        self.items = list(items)  # (name, bytes-or-path, label)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def name(self, index: int) -> str:
        return self.items[index][0]

    def __getitem__(self, index: int):
        _, source, label = self.items[index]
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
        if self.transform is not None:
            img = self.transform(img)
        return img, label


_FOOLBOX_IMAGENET = re.compile(r"(?:^|/)imagenet_(\d+)_(\d+)\.(?:jpg|jpeg|png)$")
FOOLBOX_HELP = (
    "the labelled ImageNet samples ship in the foolbox package: `pip install --no-deps foolbox`, or "
    "`pip download --no-deps foolbox -d DIR` and pass the wheel (or its foolbox/data folder)"
)


def foolbox_imagenet_samples(source: Optional[str] = None) -> LabelledImageFiles:
    """The 20 labelled ImageNet validation images of the foolbox package (``imagenet_<i>_<label>.jpg``).

    Args:
        source: a foolbox wheel or zip, a folder holding the images (or ``foolbox/data`` under it);
            by default the ``data`` folder of an installed foolbox package (found without importing it).
    """
    if source is None:
        spec = importlib.util.find_spec("foolbox")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"foolbox is not installed; {FOOLBOX_HELP}")
        source = os.path.join(list(spec.submodule_search_locations)[0], "data")
    items = []
    if os.path.isfile(source) and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for member in sorted(archive.namelist()):
                m = _FOOLBOX_IMAGENET.search(member)
                if m:
                    items.append((os.path.basename(member), archive.read(member), int(m.group(2))))
    elif os.path.isdir(source):
        for folder in (Path(source), Path(source) / "data", Path(source) / "foolbox" / "data"):
            for path in sorted(folder.glob("imagenet_*")):
                m = _FOOLBOX_IMAGENET.search(path.name)
                if m:
                    items.append((path.name, str(path), int(m.group(2))))
            if items:
                break
    else:
        raise FileNotFoundError(f"{source!r} is neither a folder nor a zip/wheel; {FOOLBOX_HELP}")
    if not items:
        raise FileNotFoundError(f"no imagenet_<index>_<label> images in {source!r}; {FOOLBOX_HELP}")
    return LabelledImageFiles(items)
