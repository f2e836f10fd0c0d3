"""CIFAR-10 as in-memory tensors, from whatever copy is at hand, and a batch iterator on the device.

``load_cifar10`` looks in the data root for, in this order:

1. a decoded cache (``cifar10-{train,test}-uint8-v2.pt``) written by an earlier call;
2. the original CIFAR-10 python batches (torchvision's ``cifar-10-batches-py/`` layout);
3. an ``ImageFolder``-style tree ``<split>/<class>/*.jpg`` (in ``cifar10-jpeg/`` or the root itself),
   or a ``.tar.gz`` of one (``cifar10-jpeg.tar.gz``, the offline copy of the book's machines);
4. only when downloading is allowed: torchvision's download of the original.

A copy must be complete (5,000 training and 1,000 test images of each of the 10 classes): a class-folder tree
that is not is passed over for a copy after it, and any incomplete copy is refused, saying what it holds, unless
``allow_partial=True`` (or ``COMPANION_ALLOW_PARTIAL=1``) asks for it; a partial copy's cache records its counts
and is refused in the same way.

The first source found is decoded once and cached as uint8 tensors (``cifar10-<split>-uint8-v2.pt`` in
the root, or in the user cache when the root is read-only); later calls read the cache. The cache records
its source (path, sizes, modification times, content hashes of archives and batch files) and a sha256 of
its tensors: a cache whose source changed, or whose bytes do not match, is decoded again (with a warning).
One process decodes while others wait on a file lock; the cache is written to a temporary file and renamed.

Every source gives the images in a mixed class order, so "the first N" images hold every class: the
python batches keep their own (already mixed) order, and a class-folder tree or archive is sorted by
(class, file name) and then shuffled by ``torch.randperm(N, generator=torch.Generator().manual_seed(ORDER_SEED))``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import numbers
import os
import pickle
import sys
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from companion import distributed
from companion.files import atomic_write
from companion.runtime import device as best_device
from companion.runtime import env_flag

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataError",
    "DataNotFoundError",
    "CaptionBatches",
    "DeviceLoader",
    "ORDER_SEED",
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
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_FORMAT = 2  # the cache's layout; a cache in any other format is decoded again, never trusted
_PER_CLASS = {"train": 5_000, "test": 1_000}  # images of every class in a complete split
ORDER_SEED = 0  # class-folder sources are shuffled by torch.randperm(N, generator=manual_seed(ORDER_SEED))


class DataError(ValueError):
    """A copy of the data set that cannot be used as it is (incomplete, damaged, wrong shapes); says what to do."""


class DataNotFoundError(FileNotFoundError):
    """No usable copy of the data set was found, and none could be downloaded."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: the argument, else ``$COMPANION_DATA`` (empty = unset), else a per-user cache folder."""
    if root is not None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a folder's path (a str or os.PathLike) or None, got {root!r}")
        if os.fspath(root) == "":
            raise DataError("root='' is an empty path; give a folder, or None for $COMPANION_DATA or the user cache")
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
    name = f"cifar10-{split}-uint8-v{_FORMAT}.pt"
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]  # one cache per data root
    return [root / name, _user_cache() / f"from-{tag}" / name]


def _check(images: torch.Tensor, labels: torch.Tensor, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        raise DataError(
            f"{origin}: expected uint8 images of shape (N, 3, 32, 32), got {tuple(images.shape)} {images.dtype}; "
            "this is not CIFAR-10 (delete the file or point COMPANION_DATA at a correct copy)"
        )
    if labels.shape != (images.shape[0],) or int(labels.min()) < 0 or int(labels.max()) > 9:
        raise DataError(f"{origin}: labels must be N integers in 0..9, one per image")
    return images, labels.long()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_sha256(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the images' and labels' bytes: one fast pass, a fraction of a second for the 150 MB train split."""
    digest = hashlib.sha256(images.contiguous().numpy())
    digest.update(labels.contiguous().numpy())
    return digest.hexdigest()


class _Source:
    """A copy of CIFAR-10 that can be decoded, and its identity (what the cache records to notice a change)."""

    def __init__(self, kind: str, path: Path, split: str) -> None:
        self.kind, self.path, self.split = kind, path, split

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"

    def files(self) -> list[Path]:
        """The files the split is decoded from."""
        if self.kind == "python batches":
            return [self.path / name for name in _batch_names(self.split)]
        if self.kind == "archive":
            return [self.path]
        return _tree_files(self.path, self.split)

    def identity(self, hashes: bool = False) -> dict:
        """Kind, path, per file [name, size, mtime_ns, sha256 if ``hashes``]; folders: [count, bytes, mtime_ns]."""
        files = [p for p in self.files() if p.is_file()]
        stats = [p.stat() for p in files]
        if self.kind == "folder":  # 60,000 small files: their count, total size and latest change
            summary = [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
        else:
            summary = [
                [p.name, s.st_size, s.st_mtime_ns, _sha256_file(p) if hashes else None] for p, s in zip(files, stats)
            ]
        return {"kind": self.kind, "path": str(self.path.resolve()), "files": summary}

    def matches(self, recorded: object) -> bool:
        """True if ``recorded`` (a cache's record of its source) describes this source as it is now."""
        now = self.identity()
        if not isinstance(recorded, dict) or [recorded.get("kind"), recorded.get("path")] != [now["kind"], now["path"]]:
            return False
        old, new = recorded.get("files"), now["files"]
        if self.kind == "folder" or not isinstance(old, list) or len(old) != len(new):
            return old == new
        # A file whose modification time changed but whose content did not (a copy) still matches.
        folder = self.path.parent if self.kind == "archive" else self.path
        return all(
            isinstance(rec, list)
            and len(rec) == 4
            and rec[:2] == cur[:2]
            and (rec[2] == cur[2] or rec[3] == _sha256_file(folder / cur[0]))
            for rec, cur in zip(old, new)
        )


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read and verify a cache file; ``_BadCache`` says why it cannot be used."""
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as err:  # any unreadable file: truncated, not a torch file, a foreign pickle ...
        raise _BadCache(f"unreadable ({type(err).__name__})") from err
    if not isinstance(blob, dict) or not {"images", "labels", "sha256", "source", "counts"} <= blob.keys():
        raise _BadCache("not a decoded CIFAR-10 cache of this version")
    images, labels = blob["images"], blob["labels"]
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
        raise _BadCache("not a decoded CIFAR-10 cache of this version")
    if blob.get("format") != _FORMAT:
        raise _BadCache(f"written in an older format ({blob.get('format', 1)}, now {_FORMAT})")
    try:
        images, labels = _check(images, labels, str(path))
    except ValueError as err:
        raise _BadCache("wrong shapes or labels") from err
    counts = torch.bincount(labels, minlength=10).tolist()
    if _tensor_sha256(images, labels) != blob["sha256"] or counts != blob["counts"]:
        raise _BadCache("its checksum does not match its contents (damaged on disk?)")
    return images, labels, blob["source"]


class _BadCache(Exception):
    """A cache file that cannot be used, and why."""


def _writable(folder: Path) -> bool:
    """True if ``folder`` may be written: it allows it by its mode bits, not merely because we are root."""
    folder = folder if folder.exists() else folder.parent
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o200)


def _cache_target(root: Path, split: str) -> Path | None:
    """The first cache path whose folder can be written (created if needed), or None."""
    for path in _cache_paths(root, split):
        if path.parent.exists() and not _writable(path.parent):
            continue  # a read-only data folder (a shared copy): use the user cache instead
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if _writable(path.parent):
            return path
    return None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, source: _Source) -> None:
    """Write the cache atomically (``atomic_write``: a temporary file beside it, then renamed)."""
    blob = {
        "format": _FORMAT,
        "images": images.contiguous(),
        "labels": labels.contiguous(),
        "sha256": _tensor_sha256(images, labels),
        "counts": torch.bincount(labels, minlength=10).tolist(),
        "source": source.identity(hashes=True),
    }
    for pattern in (f".{path.name}-*.tmp", f".{path.stem}-*.tmp"):  # the second: older versions' names
        for stale in path.parent.glob(pattern):
            stale.unlink(missing_ok=True)  # left by a process killed while writing (we hold the lock)
    atomic_write(path, lambda f: torch.save(blob, f))  # mode from the umask: a shared data folder shares it


def _batch_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _from_batches(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the original python pickles (``data_batch_1..5``, ``test_batch``); their order is kept (already mixed)."""
    images, labels = [], []
    for name in _batch_names(split):
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder} is incomplete: {name} is missing; delete the folder and download again")
        try:
            with open(path, "rb") as f:
                # The CIFAR-10 batches are pickles by design; only load copies you trust.
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise DataError(
                f"{path} is not a readable CIFAR-10 batch ({type(err).__name__}: {err}); the file is probably "
                f"truncated or damaged: delete {folder} and download it again"
            ) from err
    return _check(torch.from_numpy(np.concatenate(images)), torch.tensor(labels), str(folder))


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                raise DataError(f"{name} is {im.size[0]}x{im.size[1]}, but CIFAR-10 images are 32x32")
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{name} is not a readable image ({err})") from err


def _label_of(parts: tuple[str, ...], origin: str) -> int:
    cls = parts[-2]
    if cls not in CIFAR10_CLASSES:
        raise DataError(f"{origin}: unknown class folder {cls!r}; expected one of {', '.join(CIFAR10_CLASSES)}")
    return CIFAR10_CLASSES.index(cls)


def _stack(items: list[tuple[str, int, np.ndarray]], origin: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of a class-folder source in the fixed order: sorted by (class, file name), then ORDER_SEED's shuffle."""
    if not items:
        raise DataError(f"{origin} holds no images for this split")
    items.sort(key=lambda t: (t[1], t[0]))  # class order, then file name: deterministic
    missing = set(range(10)) - {label for _, label, _ in items}
    if missing:
        names = ", ".join(CIFAR10_CLASSES[i] for i in sorted(missing))
        raise DataError(f"{origin} has no images of class {names}; the copy is incomplete")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(ORDER_SEED))
    images = torch.from_numpy(np.stack([items[i][2] for i in order]))
    labels = torch.tensor([items[i][1] for i in order])
    return _check(images, labels, origin)


def _tree_files(folder: Path, split: str) -> list[Path]:
    return sorted(p for p in (folder / split).glob("*/*") if p.suffix.lower() in _IMAGE_SUFFIXES)


def _has_images(folder: Path) -> bool:
    """True if ``folder`` has class folders with at least one image (an emptied tree is no source)."""
    return any(p.suffix.lower() in _IMAGE_SUFFIXES for p in folder.glob("*/*"))


def _from_tree(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``<folder>/<split>/<class>/*.{jpg,png}``."""
    files = _tree_files(folder, split)
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
        raise DataError(
            f"the archive {archive} is corrupt or truncated ({err}); check it with "
            f"'sha256sum -c {archive.name}.sha256' in its folder, or replace it with a good copy"
        ) from err
    return _stack(items, str(archive))


def _download(root: Path, split: str) -> None:
    """torchvision's download of the original CIFAR-10 (python batches) into ``root``."""
    from torchvision.datasets import CIFAR10

    root.mkdir(parents=True, exist_ok=True)
    CIFAR10(str(root), train=split == "train", download=True)


def _download_allowed(download: bool | None) -> bool:
    if download is not None:
        return download
    return env_flag("COMPANION_DOWNLOAD", default=True)


def _check_subset(subset: object) -> None:
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, numbers.Integral)):
        raise TypeError(f"subset must be a whole number of images (an int) or None, got {subset!r}")


def _balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of exactly ``n`` images, equally many per class (the first ``n % 10`` classes get one more).

    Deterministic: each class's images are taken in the order of a fixed (seed 0) shuffle.
    """
    if not 0 < n <= len(labels):
        raise DataError(f"subset must be between 1 and {len(labels)}, got {n}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    per_class = [order[labels[order] == c] for c in range(10)]
    take = [n // 10 + (1 if c < n % 10 else 0) for c in range(10)]
    for c, (idx, k) in enumerate(zip(per_class, take)):
        if len(idx) < k:
            fits = 10 * min(len(i) for i in per_class)
            raise DataError(
                f"subset={n} takes {k} images of class {CIFAR10_CLASSES[c]!r}, but this split holds only {len(idx)}; "
                f"a class-balanced subset of this copy can have at most {fits} images (10 x the rarest class)"
            )
    return torch.cat([idx[:k] for idx, k in zip(per_class, take)]).sort().values


def _class_counts(files: list[Path]) -> list[int]:
    """Images per class among a class-folder tree's files (files in unknown folders are counted nowhere)."""
    counts = [0] * 10
    for p in files:
        if p.parent.name in CIFAR10_CLASSES:
            counts[CIFAR10_CLASSES.index(p.parent.name)] += 1
    return counts


def _sources(root: Path, split: str) -> list[_Source]:
    """Every copy of CIFAR-10 in ``root``, in the order of this module's docstring (the cache aside)."""
    found = []
    if (root / _BATCHES).is_dir():
        found.append(_Source("python batches", root / _BATCHES, split))
    if _has_images(root / _TREE / split):
        found.append(_Source("folder", root / _TREE, split))
    if any((root / split / c).is_dir() for c in CIFAR10_CLASSES) and _has_images(root / split):
        found.append(_Source("folder", root, split))
    if (root / _ARCHIVE).is_file():
        found.append(_Source("archive", root / _ARCHIVE, split))
    return found


def _find_source(root: Path, split: str) -> _Source | None:
    """The first copy that may be complete: a class-folder tree is counted (cheap), the others are checked decoded.

    A tree with other than 5,000 (train) or 1,000 (test) images of every class is passed over for a copy after it
    (the complete archive beside a partial tree); with no other copy it is still returned, and refused or allowed
    by ``_check_complete`` with the full count.
    """
    found = _sources(root, split)
    for source in found:
        if source.kind != "folder" or _class_counts(source.files()) == [_PER_CLASS[split]] * 10:
            return source
    return found[0] if found else None


def _check_complete(labels: torch.Tensor, split: str, origin: str, allow_partial: bool) -> str:
    """'' for the complete split; else what it holds (allowed) or a ValueError that says what is missing."""
    counts = torch.bincount(labels, minlength=10).tolist()
    want = _PER_CLASS[split]
    if counts == [want] * 10:
        return ""
    held = f"{len(labels):,} images"
    if len(set(counts)) == 1:
        held += f", {counts[0]:,} of every class"
    else:
        held += " (" + ", ".join(f"{CIFAR10_CLASSES[c]} {n:,}" for c, n in enumerate(counts) if n != want) + ")"
    if allow_partial:
        return f"a partial copy of {held}"
    raise DataError(
        f"{origin} is not the complete CIFAR-10 {split} split: it holds {held}, where CIFAR-10 has "
        f"{10 * want:,} ({want:,} of every class); point the loader at a complete copy, or pass "
        "allow_partial=True (or set COMPANION_ALLOW_PARTIAL=1) to use this one as it is"
    )


_announced: set[str] = set()


def _announce(line: str) -> None:
    """Print where the data came from, once per process (on stderr, beside the progress bars: not a result)."""
    if line not in _announced:
        _announced.add(line)
        print(line, file=sys.stderr)


Loaded = tuple[torch.Tensor, torch.Tensor, str, str]  # images, labels, where they came from, the file(s) read


def _from_cache(root: Path, split: str, source: _Source | None) -> tuple[Loaded | None, list[str]]:
    """A verified cache of ``source`` (of any source, if None), and the reasons other cache files were refused."""
    problems = []
    for path in _cache_paths(root, split):
        if not path.is_file():
            continue
        try:
            images, labels, recorded = _read_cache(path)
        except _BadCache as err:
            problems.append(f"the decoded cache {path} cannot be used: {err}")
            continue
        origin = f"the {recorded.get('kind')} {recorded.get('path')}" if isinstance(recorded, dict) else "?"
        if source is not None and not source.matches(recorded):
            now = source.identity()
            moved = not isinstance(recorded, dict) or [recorded.get("kind"), recorded.get("path")] != [
                now["kind"],
                now["path"],
            ]
            why = f"the {source} is used now" if moved else "which changed since"
            problems.append(f"the decoded cache {path} is stale: it was decoded from {origin}, {why}")
            continue
        gone = "" if source is not None else " (that source is no longer in the data root)"
        how = f"CIFAR-10: read the decoded cache in {path.parent}, decoded from {origin}{gone}"
        return (images, labels, how, f"the decoded cache {path} (decoded from {origin})"), []
    return None, problems


def _build(root: Path, split: str, source: _Source | None, allow_partial: bool) -> Loaded:
    """Decode ``source`` (None: download the original) and cache it; one process at a time per cache folder.

    An incomplete copy is refused before anything is cached, unless ``allow_partial``.
    """
    target = _cache_target(root, split)
    if target is not None and target.is_dir():
        raise IsADirectoryError(f"{target} is a folder, where the decoded cache goes; remove or rename it")
    with FileLock(f"{target}.lock") if target is not None else contextlib.nullcontext():
        if target is not None:
            done, _ = _from_cache(root, split, source)
            if done is not None:  # another process decoded it while this one waited for the lock
                return done
        how = "decoded from the"
        if source is None:
            try:
                _download(root, split)
            except (OSError, RuntimeError) as err:
                raise DataNotFoundError(_not_found_message(root, download_tried=True, reason=str(err))) from err
            source, how = _Source("python batches", root / _BATCHES, split), "downloaded and decoded the"
        reader = {"python batches": _from_batches, "folder": _from_tree, "archive": _from_archive}[source.kind]
        images, labels = reader(source.path, split)
        _check_complete(labels, split, str(source.path), allow_partial)
        if target is not None:
            _write_cache(target, images, labels, source)
        where = f"cached in {target.parent}" if target is not None else "not cached: no writable folder"
    return images, labels, f"CIFAR-10: {how} {source} ({where})", str(source.path)


def load_cifar10(
    train: bool = True,
    root: str | os.PathLike | None = None,
    subset: int | None = None,
    download: bool | None = None,
    allow_partial: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR-10 split as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    ``train`` picks the 50,000 training images (True) or the 10,000 test images (False). ``root`` defaults to
    ``$COMPANION_DATA``, else a per-user cache folder. ``subset=N`` takes exactly N images, class-balanced and
    deterministic. ``download=None`` allows torchvision's download unless ``COMPANION_DOWNLOAD`` says no;
    ``download=False`` never downloads. A copy without exactly 5,000 (train) or 1,000 (test) images of every
    class is refused, saying what it holds, unless ``allow_partial=True`` (``None``: the environment variable
    ``COMPANION_ALLOW_PARTIAL``, default no); a complete copy is always preferred to a partial one beside it.
    Prints, once per process, where the data came from.
    """
    _check_subset(subset)
    _check_flag("train", train, none_ok=False)
    _check_flag("download", download)
    _check_flag("allow_partial", allow_partial)
    may_download = _download_allowed(download)  # a bad COMPANION_DOWNLOAD is refused even when data is at hand
    if allow_partial is None:
        allow_partial = env_flag("COMPANION_ALLOW_PARTIAL", default=False)
    split = "train" if train else "test"
    root = data_root(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"the data root {root} is a file, not a folder; point root= or COMPANION_DATA at a folder"
        )
    source = _find_source(root, split)
    loaded, problems = _from_cache(root, split, source)
    if loaded is None:
        if source is None and not may_download:
            if problems:
                raise DataError(
                    f"{problems[0]}, and {root} holds no copy of CIFAR-10 to decode it again from; delete the "
                    "cache file and point the loader at a copy (root=... or COMPANION_DATA)"
                )
            raise DataNotFoundError(_not_found_message(root, download_tried=False))
        for problem in problems:
            warnings.warn(f"{problem}; decoding it again from {source or 'a download'}", stacklevel=2)
        loaded = _build(root, split, source, allow_partial)
    images, labels, how, origin = loaded
    partial = _check_complete(labels, split, origin, allow_partial)
    _announce(how)
    if partial:
        _announce(f"CIFAR-10 {split} split: {partial}, used as it is (allow_partial)")
    if subset is not None:
        keep = _balanced_subset(labels, subset)
        images, labels = images[keep], labels[keep]
    return images, labels


def _check_flag(name: str, value: object, none_ok: bool = True) -> None:
    """Refuse a yes/no argument that is not a bool (``train="test"`` would be truthy: the wrong split, silently)."""
    if not (isinstance(value, (bool, np.bool_)) or (none_ok and value is None)):
        allowed = "True, False or None" if none_ok else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {value!r}")


def _not_found_message(root: Path, download_tried: bool, reason: str = "") -> str:
    tried = f"the download failed ({reason})" if download_tried else "downloading is switched off"
    return (
        f"CIFAR-10 was not found in {root} (looked for a decoded cache, {_BATCHES}/, {_TREE}/ or "
        f"train/ and test/ class folders, and {_ARCHIVE}), and {tried}. Either point the loader at a "
        "folder that holds a copy (load_cifar10(root=...) or the environment variable COMPANION_DATA, "
        "e.g. COMPANION_DATA=/path/to/cifar10), or allow the download on a machine with internet "
        "(load_cifar10(download=True), or COMPANION_DOWNLOAD=1 or unset)."
    )


class DeviceLoader:
    """Batches of an in-memory image tensor, augmented and normalised on the device.

    ``images`` are uint8 (N, C, H, W) with C = len(mean), as ``load_cifar10`` returns them; float images
    in [0, 1] are accepted only with ``float_input=True``, and then rounded to uint8 once.
    The whole uint8 data set is moved to ``device`` once. Each batch is converted to float,
    optionally augmented (random horizontal flip, random translation by up to ``pad`` pixels, the uncovered
    border filled with zeros or, with ``padding_mode="reflect"``, by reflection as airbench does) and
    normalised there, so the training loop does no per-image PIL work.

    Under ``torchrun`` a shuffling loader gives each process its own shard of every epoch: all ranks
    draw the same permutation (same ``seed``) and rank r takes the r-th of ``world_size()`` equal
    slices of it (the last ``N % world_size()`` images of the permutation sit that epoch out).
    Augmentation then draws from a generator of its own per rank. A loader without shuffling (a test set)
    is never sharded: every rank sees all of it.
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
        padding_mode: str = "zeros",
        drop_last: bool = False,
        seed: int = 0,
        float_input: bool = False,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images must be (N, C, H, W) with one label each; got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if images.shape[1] != len(mean):
            raise ValueError(
                f"images have {images.shape[1]} channel(s), but mean and std have {len(mean)} values: DeviceLoader "
                f"expects (N, {len(mean)}, H, W); for grey images repeat the channel (images.expand(-1, 3, -1, -1)) "
                "or pass matching mean and std"
            )
        if images.is_floating_point() and float_input:
            if images.numel() and not (images.min() >= 0 and images.max() <= 1):  # also False for NaN
                raise ValueError("float_input=True expects images in [0, 1]; these hold values outside it (or NaN)")
            images = images.mul(255).round_().to(torch.uint8)
        elif images.dtype != torch.uint8:
            hint = "; for float images in [0, 1] pass float_input=True" if images.is_floating_point() else ""
            raise TypeError(
                "DeviceLoader expects uint8 images (N, C, H, W) with values 0..255, as load_cifar10 returns them; "
                f"got {images.dtype}{hint}"
            )
        if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be 1-D integers (N,), got {labels.dtype} of shape {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if padding_mode not in {"zeros", "reflect"}:
            raise ValueError(f"padding_mode must be 'zeros' or 'reflect' (nn.Conv2d's names), got {padding_mode!r}")
        if augment and padding_mode == "reflect" and pad >= min(images.shape[-2:]):
            size = tuple(images.shape[-2:])
            raise ValueError(f"padding_mode='reflect' needs pad smaller than the images {size}, got pad={pad}")
        self.device = torch.device(device) if device is not None else best_device()
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.pad, self.padding_mode, self.drop_last = pad, padding_mode, drop_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)  # CPU generator: same numbers on every device
        self.seed = seed
        self._rank_generator: torch.Generator | None = None  # augmentation's own per rank, made when first sharded

    def _shard(self) -> tuple[int, int]:
        """(rank, number of shards): (0, 1) unless this loader shuffles and torchrun started several processes."""
        return (distributed.rank(), distributed.world_size()) if self.shuffle else (0, 1)

    def __len__(self) -> int:
        n = len(self.labels) // self._shard()[1]  # images this process sees per epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, shards = self._shard()
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        per_shard = n // shards
        order = order[rank * per_shard : (rank + 1) * per_shard]  # this rank's slice; all of it for one process
        augment_generator = self.generator
        if shards > 1:
            if self._rank_generator is None:
                self._rank_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank + 1)
            augment_generator = self._rank_generator
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size].to(self.device)
            x = self.images[idx].float().div_(255)  # (B, C, H, W) in [0, 1]
            if self.augment:
                x = self._augment(x, augment_generator)
            yield (x - self.mean) / self.std, self.labels[idx]

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The random state of the next epoch (order and augmentation), for a checkpoint."""
        rank_state = None if self._rank_generator is None else self._rank_generator.get_state()
        return {"generator": self.generator.get_state(), "rank_generator": rank_state}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        """Continue from a ``state_dict``: the next epoch draws the same order and augmentation as then."""
        self.generator.set_state(state["generator"])
        if state["rank_generator"] is not None:
            rank = distributed.rank()
            self._rank_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + rank + 1)
            self._rank_generator.set_state(state["rank_generator"])

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        B, _, H, W = x.shape
        flip = (torch.rand(B, generator=generator) < 0.5).to(self.device)
        x = torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
        if self.pad > 0:
            p = self.pad
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode=mode)  # (B, C, H+2p, W+2p)
            dy = torch.randint(0, 2 * p + 1, (B,), generator=generator).to(self.device)
            dx = torch.randint(0, 2 * p + 1, (B,), generator=generator).to(self.device)
            rows = (dy.view(B, 1) + torch.arange(H, device=self.device)).view(B, 1, H, 1)
            cols = (dx.view(B, 1) + torch.arange(W, device=self.device)).view(B, 1, 1, W)
            batch = torch.arange(B, device=self.device).view(B, 1, 1, 1)
            chan = torch.arange(x.shape[1], device=self.device).view(1, -1, 1, 1)
            x = padded[batch, chan, rows, cols]  # (B, C, H, W): each image cropped at its own offset
        return x


class CaptionBatches:
    """Teacher-forcing batches ``((feature maps, input tokens), next tokens)``, a random caption of its class each.

    ``feature_maps`` (N, C, h, w) and ``labels`` (N,) are the images' CNN features and classes, ``captions``
    (classes, templates, L) the token ids of every caption of every class; batches come out on ``device``.
    """

    def __init__(
        self,
        feature_maps: torch.Tensor,
        labels: torch.Tensor,
        captions: torch.Tensor,
        batch_size: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.feature_maps, self.labels, self.captions = feature_maps, labels, captions
        self.batch_size, self.device = batch_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The random state of the next epoch, for a checkpoint."""
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a ``state_dict``."""
        self.gen.set_state(state["generator"])

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.gen)
        for start in range(0, len(self.labels), self.batch_size):
            idx = order[start : start + self.batch_size]
            template = torch.randint(0, self.captions.shape[1], (len(idx),), generator=self.gen)
            rows = self.labels[idx].to(self.captions.device), template.to(self.captions.device)  # index where they live
            seq = self.captions[rows].to(self.device)  # (B, L): <bos> words <eos> <pad>...
            yield (self.feature_maps[idx].to(self.device), seq[:, :-1]), seq[:, 1:]  # predict each next token
