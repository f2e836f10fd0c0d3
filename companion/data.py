"""CIFAR-10 as in-memory tensors, from whatever copy is at hand, and a batch iterator on the device.

``load_cifar10`` looks in the data root for, in this order:

1. a decoded cache (``cifar10-{train,test}-uint8.pt``) written by an earlier call;
2. the original CIFAR-10 python batches (torchvision's ``cifar-10-batches-py/`` layout);
3. an ``ImageFolder``-style tree ``<split>/<class>/*.jpg`` (in ``cifar10-jpeg/`` or the root itself),
   or a ``.tar.gz`` of one (``cifar10-jpeg.tar.gz``, the offline copy of the book's machines);
4. only when downloading is allowed: torchvision's download of the original.

The first source found is decoded once and cached as uint8 tensors; later calls read the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from companion.runtime import device as best_device

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataNotFoundError",
    "DeviceLoader",
    "data_root",
    "load_cifar10",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the original CIFAR-10 training split (on a 0..1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_ARCHIVE = "cifar10-jpeg.tar.gz"
_TREE = "cifar10-jpeg"
_BATCHES = "cifar-10-batches-py"
_SPLIT_SIZE = {"train": 50_000, "test": 10_000}


class DataNotFoundError(FileNotFoundError):
    """No usable copy of the data set was found, and none could be downloaded."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: the argument, else ``$COMPANION_DATA``, else a per-user cache folder."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("COMPANION_DATA"):
        return Path(os.environ["COMPANION_DATA"]).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "companion"


def _user_cache() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "companion"


def _cache_paths(root: Path, split: str) -> list[Path]:
    """Where the decoded cache may live: in the root, or (root read-only) in the user cache."""
    name = f"cifar10-{split}-uint8.pt"
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]  # one cache per data root
    return [root / name, _user_cache() / f"from-{tag}" / name]


def _check(images: torch.Tensor, labels: torch.Tensor, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(
            f"{origin}: expected uint8 images of shape (N, 3, 32, 32), got {tuple(images.shape)} {images.dtype}; "
            "this is not CIFAR-10 (delete the file or point COMPANION_DATA at a correct copy)"
        )
    if labels.shape != (images.shape[0],) or int(labels.min()) < 0 or int(labels.max()) > 9:
        raise ValueError(f"{origin}: labels must be N integers in 0..9, one per image")
    return images, labels.long()


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        blob = torch.load(path, weights_only=True)
        return _check(blob["images"], blob["labels"], str(path))
    except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"the cache file {path} is unreadable ({err}); delete it and load again") from err


def _writable(folder: Path) -> bool:
    """True if ``folder`` may be written: it allows it by its mode bits, not merely because we are root."""
    folder = folder if folder.exists() else folder.parent
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o200)


def _write_cache(root: Path, split: str, images: torch.Tensor, labels: torch.Tensor, source: str) -> None:
    for path in _cache_paths(root, split):
        if path.parent.exists() and not _writable(path.parent):
            continue  # a read-only data folder (a shared copy): use the user cache instead
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"images": images, "labels": labels, "source": source}, tmp)
            tmp.replace(path)
            return
        except OSError:
            continue  # read-only root: try the user cache next


def _from_batches(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the original python pickles (``data_batch_1..5``, ``test_batch``)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{folder} is incomplete: {name} is missing; delete the folder and download again")
        with open(path, "rb") as f:
            # The CIFAR-10 batches are pickles by design; only load copies you trust.
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"])
    return _check(torch.from_numpy(np.concatenate(images)), torch.tensor(labels), str(folder))


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                raise ValueError(f"{name} is {im.size[0]}x{im.size[1]}, but CIFAR-10 images are 32x32")
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{name} is not a readable image ({err})") from err


def _label_of(parts: tuple[str, ...], origin: str) -> int:
    cls = parts[-2]
    if cls not in CIFAR10_CLASSES:
        raise ValueError(f"{origin}: unknown class folder {cls!r}; expected one of {', '.join(CIFAR10_CLASSES)}")
    return CIFAR10_CLASSES.index(cls)


def _stack(items: list[tuple[str, int, np.ndarray]], origin: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not items:
        raise ValueError(f"{origin} holds no images for this split")
    items.sort(key=lambda t: (t[1], t[0]))  # class order, then file name: deterministic
    missing = set(range(10)) - {label for _, label, _ in items}
    if missing:
        names = ", ".join(CIFAR10_CLASSES[i] for i in sorted(missing))
        raise ValueError(f"{origin} has no images of class {names}; the copy is incomplete")
    images = torch.from_numpy(np.stack([im for _, _, im in items]))
    labels = torch.tensor([label for _, label, _ in items])
    return _check(images, labels, origin)


def _from_tree(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``<folder>/<split>/<class>/*.{jpg,png}``."""
    files = sorted(p for p in (folder / split).glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    items = [
        (str(p.relative_to(folder)), _label_of(p.parts, str(folder)), _decode(p.read_bytes(), str(p)))
        for p in tqdm(files, desc=f"decoding {split} images", leave=False, mininterval=1)
    ]
    return _stack(items, str(folder / split))


def _from_archive(archive: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the ``<split>/<class>/*.jpg`` members of a ``.tar.gz`` without unpacking it to disk."""
    items = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tqdm(tar, desc=f"decoding {split} images from {archive.name}", leave=False, mininterval=1):
                parts = Path(member.name).parts
                if parts and parts[0] == ".":
                    parts = parts[1:]
                if not member.isfile() or len(parts) != 3 or parts[0] != split:
                    continue
                data = tar.extractfile(member).read()
                items.append((member.name, _label_of(parts, str(archive)), _decode(data, f"{archive}:{member.name}")))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ValueError(
            f"the archive {archive} is corrupt or truncated ({err}); check it with "
            f"'sha256sum -c {archive.name}.sha256' in its folder, or replace it with a good copy"
        ) from err
    return _stack(items, str(archive))


def _download(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's download of the original CIFAR-10 into ``root``, then read its batches."""
    from torchvision.datasets import CIFAR10

    root.mkdir(parents=True, exist_ok=True)
    CIFAR10(str(root), train=split == "train", download=True)
    return _from_batches(root / _BATCHES, split)


def _download_allowed(download: bool | None) -> bool:
    if download is not None:
        return download
    return os.environ.get("COMPANION_DOWNLOAD", "1").strip().lower() not in {"0", "false", "no", "off"}


def _balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of a deterministic subset with (as far as possible) equally many images per class."""
    if not 0 < n <= len(labels):
        raise ValueError(f"subset must be between 1 and {len(labels)}, got {n}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    per_class = [order[labels[order] == c] for c in range(10)]
    take = [n // 10 + (1 if c < n % 10 else 0) for c in range(10)]
    return torch.cat([idx[:k] for idx, k in zip(per_class, take)]).sort().values


def load_cifar10(
    train: bool = True,
    root: str | os.PathLike | None = None,
    subset: int | None = None,
    download: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR-10 split as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    ``root`` defaults to ``$COMPANION_DATA``, else a per-user cache folder. ``subset=N`` takes a
    deterministic, class-balanced subset. ``download=None`` allows torchvision's download unless
    ``COMPANION_DOWNLOAD=0``; ``download=False`` never downloads.
    """
    split = "train" if train else "test"
    root = data_root(root)
    images = labels = None

    cache = next((p for p in _cache_paths(root, split) if p.is_file()), None)
    if cache is not None:
        images, labels = _read_cache(cache)
    else:
        source = None
        if (root / _BATCHES).is_dir():
            source, reader = root / _BATCHES, _from_batches
        elif (root / _TREE / split).is_dir():
            source, reader = root / _TREE, _from_tree
        elif (root / split).is_dir() and any((root / split / c).is_dir() for c in CIFAR10_CLASSES):
            source, reader = root, _from_tree
        elif (root / _ARCHIVE).is_file():
            source, reader = root / _ARCHIVE, _from_archive
        elif _download_allowed(download):
            source, reader = root, _download
        if source is None:
            raise DataNotFoundError(_not_found_message(root, download_tried=False))
        try:
            images, labels = reader(source, split)
        except (OSError, RuntimeError) as err:
            if reader is not _download:
                raise
            raise DataNotFoundError(_not_found_message(root, download_tried=True, reason=str(err))) from err
        _write_cache(root, split, images, labels, str(source))

    if subset is not None:
        keep = _balanced_subset(labels, subset)
        images, labels = images[keep], labels[keep]
    return images, labels


def _not_found_message(root: Path, download_tried: bool, reason: str = "") -> str:
    tried = f"the download failed ({reason})" if download_tried else "downloading is switched off"
    return (
        f"CIFAR-10 was not found in {root} (looked for a decoded cache, {_BATCHES}/, {_TREE}/ or "
        f"train/ and test/ class folders, and {_ARCHIVE}), and {tried}. Either point the loader at a "
        "folder that holds a copy (load_cifar10(root=...) or the environment variable COMPANION_DATA, "
        "e.g. COMPANION_DATA=../shared/data), or allow the download on a machine with internet "
        "(load_cifar10(download=True), or unset COMPANION_DOWNLOAD)."
    )


class DeviceLoader:
    """Batches of an in-memory image tensor, augmented and normalised on the device.

    The whole uint8 data set is moved to ``device`` once. Each batch is converted to float,
    optionally augmented (random horizontal flip, random translation by up to ``pad`` pixels
    with zero padding) and normalised there, so the training loop does no per-image PIL work.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 256,
        shuffle: bool = False,
        augment: bool = False,
        device: torch.device | str | None = None,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        pad: int = 4,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device) if device is not None else best_device()
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.pad, self.drop_last = pad, drop_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)  # CPU generator: same numbers on every device

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size].to(self.device)
            x = self.images[idx].float().div_(255)  # (B, C, H, W) in [0, 1]
            if self.augment:
                x = self._augment(x)
            yield (x - self.mean) / self.std, self.labels[idx]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        flip = (torch.rand(B, generator=self.generator) < 0.5).to(self.device)
        x = torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
        if self.pad > 0:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
            dy = torch.randint(0, 2 * p + 1, (B,), generator=self.generator).to(self.device)
            dx = torch.randint(0, 2 * p + 1, (B,), generator=self.generator).to(self.device)
            rows = (dy.view(B, 1) + torch.arange(H, device=self.device)).view(B, 1, H, 1)
            cols = (dx.view(B, 1) + torch.arange(W, device=self.device)).view(B, 1, 1, W)
            batch = torch.arange(B, device=self.device).view(B, 1, 1, 1)
            chan = torch.arange(x.shape[1], device=self.device).view(1, -1, 1, 1)
            x = padded[batch, chan, rows, cols]  # (B, C, H, W): each image cropped at its own offset
        return x
