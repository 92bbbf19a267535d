"""Labelled image sets for fine-tuning: uploaded zips, folders, and a built-in Fashion-MNIST.

Every source ends up as an `ImageSet` (images, integer labels, class names, what was skipped).
User data arrives in the ImageFolder layout, one folder per class::

    cats/001.jpg  cats/002.png  dogs/a.jpg ...     (optionally inside one top-level folder)

`ingest_zip` is written for hostile input. It unpacks into a fresh per-job temp dir and never
writes outside it: entry names that are absolute or climb out with ``..`` (zip-slip) are
refused, symlink entries are skipped (never created), and the number of files and the bytes
actually decompressed are capped (zip bombs lie about their sizes, so the cap counts what comes
out, not what the header claims). Files that are not images or do not decode are skipped and
counted; too few images or a single class raise `DatasetError` with a message for people.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from explorer import settings
from explorer.images import IMAGE_SUFFIXES, ImageError, load_image


def fashion_mnist_dir() -> Path:
    """The folder of Fashion-MNIST's four IDX .gz files: Debian's `dataset-fashion-mnist`
    unless the settings point elsewhere (`explorer.settings.Settings.fashion_mnist_dir`)."""
    return settings.current().fashion_mnist_dir


def __getattr__(name: str):
    # ``FASHION_MNIST_DIR``: the folder in use, read when asked for (not at import, before
    # the app's settings are known).
    if name == "FASHION_MNIST_DIR":
        return fashion_mnist_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Label order of the IDX files (Zalando's README).
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Skip reasons, as shown to people next to their counts.
SKIP_NOT_IMAGE = "not an image file"
SKIP_CORRUPT = "corrupt or unreadable image"
SKIP_SYMLINK = "symbolic link"
SKIP_OUTSIDE_CLASS = "not inside a class folder"
SKIP_HIDDEN = "hidden or system file"
SKIP_TOO_LARGE = "file too large"


class DatasetError(ValueError):
    """Unusable training data; ``str(err)`` is a message for the person who supplied it."""


@dataclass(frozen=True)
class Limits:
    """Caps for untrusted archives and folders.

    Attributes:
        max_files: entries in the archive (directories included), or files listed in a
            folder — bounds work and inodes.
        max_total_bytes: bytes actually decompressed (a zip) or of the image files (a
            folder), summed over all files.
        max_file_bytes: bytes of one file (no single image needs more).
        min_images: images needed in total after skipping bad files.
        min_per_class: images needed per class: one to train on and one to validate.
    """

    max_files: int = 20_000
    max_total_bytes: int = 1 << 30
    max_file_bytes: int = 50 << 20
    min_images: int = 10
    min_per_class: int = 2


@dataclass
class ImageSet:
    """Labelled images.

    Attributes:
        classes: class names; label ``i`` means ``classes[i]``.
        labels: (N,) int64 labels.
        sources: either N file paths, or an (N, H, W) / (N, H, W, 3) uint8 array.
        skipped: reason -> number of files skipped while building the set.
        root: temp dir that holds the files when this set owns one (see `cleanup`).
    """

    classes: list[str]
    labels: np.ndarray
    sources: list[Path] | np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """The ``index``-th image as 8-bit RGB."""
        source = self.sources[index]
        if isinstance(source, np.ndarray):
            return Image.fromarray(source).convert("RGB")
        return read_image(source)

    def class_counts(self) -> dict[str, int]:
        """Images per class, in class order (classes with no images included, as 0)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts, strict=True)}

    def subset(self, indices) -> ImageSet:
        """The images at ``indices`` (same classes; the temp dir stays owned by ``self``)."""
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(self.sources, np.ndarray):
            sources = self.sources[indices]
        else:
            sources = [self.sources[i] for i in indices]
        return ImageSet(self.classes, self.labels[indices], sources, dict(self.skipped))

    def fingerprint(self) -> str:
        """A key that changes when the images or labels do (for feature caches)."""
        import hashlib

        digest = hashlib.sha1(self.labels.tobytes())
        digest.update("\0".join(self.classes).encode())
        if isinstance(self.sources, np.ndarray):
            digest.update(np.ascontiguousarray(self.sources).tobytes())
        else:
            for path in self.sources:
                st = os.stat(path)
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return digest.hexdigest()

    def cleanup(self) -> None:
        """Delete the temp dir this set was unpacked into, if any."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


# ---------------------------------------------------------------------------------------
# Zip archives
# ---------------------------------------------------------------------------------------


def _safe_member_path(name: str) -> PurePosixPath:
    """The relative path a zip entry may be written to; `DatasetError` for zip-slip names."""
    if "\\" in name:  # Windows separators: "..\\..\\x" would climb out on some tools
        name = name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/") or (path.parts and ":" in path.parts[0]):
        raise DatasetError(f"The zip contains an absolute path ({name!r}); refusing to unpack it.")
    if ".." in path.parts:
        raise DatasetError(
            f"The zip contains a path that climbs out of its folder ({name!r}); refusing to "
            "unpack it."
        )
    return path


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _is_hidden(path: PurePosixPath) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.parts)


def extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, limits: Limits = Limits()
                ) -> dict[str, int]:
    """Unpack the image files of an untrusted zip into ``dest``.

    Args:
        zip_path: the archive.
        dest: an existing, empty directory; nothing is written outside it.
        limits: caps on files and decompressed bytes.

    Returns:
        Skip reason -> count for entries not unpacked (symlinks, hidden, non-image files).

    Raises:
        DatasetError: not a zip, zip-slip names, too many files, or too many bytes.
    """
    dest = Path(dest).resolve()
    skipped: Counter[str] = Counter()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetError("This file is not a readable zip archive.") from err
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_files:
            raise DatasetError(
                f"The zip holds {len(infos):,} entries; the limit is {limits.max_files:,}."
            )
        paths = [_safe_member_path(info.filename) for info in infos]  # check all names first
        total = 0
        for info, rel in zip(infos, paths, strict=True):
            if info.is_dir() or not rel.parts:
                continue
            if _is_symlink(info):
                skipped[SKIP_SYMLINK] += 1
                continue
            if _is_hidden(rel):
                skipped[SKIP_HIDDEN] += 1
                continue
            if rel.suffix.lower() not in IMAGE_SUFFIXES:
                skipped[SKIP_NOT_IMAGE] += 1
                continue
            if info.flag_bits & 0x1:
                raise DatasetError("The zip is encrypted; please upload an unencrypted zip.")
            target = dest.joinpath(*rel.parts)
            if not target.resolve().is_relative_to(dest):  # belt and braces after the name check
                raise DatasetError(f"Refusing to unpack {info.filename!r} outside the job folder.")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                total += _copy_capped(archive, info, target, limits, total)
            except OSError as err:  # "x.png" both a file and a folder, names too long, ...
                raise DatasetError(f"Could not unpack {info.filename!r} ({err.strerror}).") from err
    return dict(skipped)


def _copy_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limits: Limits,
                 done: int) -> int:
    """Decompress one entry, counting real output bytes against the caps; returns the bytes."""
    written = 0
    chunk = 1 << 20
    try:
        with archive.open(info) as src, open(target, "xb") as out:
            while block := src.read(chunk):
                written += len(block)
                if written > limits.max_file_bytes:
                    raise DatasetError(
                        f"{info.filename!r} decompresses to more than "
                        f"{limits.max_file_bytes >> 20} MB; is this a zip bomb?"
                    )
                if done + written > limits.max_total_bytes:
                    raise DatasetError(
                        f"The zip decompresses to more than {limits.max_total_bytes >> 20} MB "
                        "in total; is this a zip bomb?"
                    )
                out.write(block)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as err:
        raise DatasetError(f"The zip is damaged at {info.filename!r} ({err}).") from err
    except FileExistsError as err:  # two entries with one name
        raise DatasetError(f"The zip holds {info.filename!r} twice.") from err
    return written


def ingest_zip(zip_path: str | os.PathLike, limits: Limits = Limits(),
               work_dir: str | os.PathLike | None = None) -> ImageSet:
    """Unpack an uploaded ImageFolder zip into a fresh temp dir and index its images.

    Args:
        zip_path: the upload.
        limits: caps on the archive and minimum data needed.
        work_dir: where to create the per-job temp dir (default: the system temp dir).

    Returns:
        An `ImageSet` owning the temp dir (call ``cleanup()`` when done with it).

    Raises:
        DatasetError: hostile or unusable archive; the temp dir is removed before raising.
    """
    root = Path(tempfile.mkdtemp(prefix="vit-explorer-job-", dir=work_dir))
    try:
        skipped = extract_zip(zip_path, root, limits)
        dataset = load_image_folder(root, limits, skipped)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    dataset.root = root
    return dataset


def zip_images(zip_path: str | os.PathLike, n: int | None = None, limits: Limits = Limits(),
               work_dir: str | os.PathLike | None = None) -> list[Image.Image]:
    """Up to ``n`` RGB images from an uploaded zip, unlabelled (any folder layout).

    The same hardened unpacking as `ingest_zip` (`extract_zip`), then `folder_images`; the
    temp dir is gone when this returns.

    Raises:
        DatasetError: hostile or unreadable archive, or no readable image in it.
    """
    root = Path(tempfile.mkdtemp(prefix="vit-explorer-job-", dir=work_dir))
    try:
        extract_zip(zip_path, root, limits)
        try:
            return folder_images(root, n, limits)
        except DatasetError as err:  # names the temp dir's name; say "the zip" instead
            raise DatasetError(str(err).replace(repr(root.name), "the zip")) from None
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------


def _class_root(root: Path) -> Path:
    """Descend through single wrapper folders ("my_data/cats/..." zipped with its parent).

    A lone folder that holds files itself is a class (one class only), not a wrapper.
    """

    def visible(folder: Path) -> list[Path]:
        return [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"]

    while True:
        entries = visible(root)
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
            return root
        if any(not p.is_dir() for p in visible(entries[0])):
            return root
        root = entries[0]


def read_image(path: str | os.PathLike, limits: Limits = Limits()) -> Image.Image:
    """Decode one file of a user's folder as RGB, never through a symbolic link.

    The file is opened with ``O_NOFOLLOW`` (a link swapped in after listing is refused, not
    followed) and read only if it is a regular file of at most ``limits.max_file_bytes``.

    Raises:
        ImageError: a link, not a regular file, too large, unreadable, or not an image.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    name = Path(path).name
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ImageError(f"Could not open {name!r} ({err.strerror}).") from err
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{name!r} is not a regular file.")
        data = file.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        raise ImageError(f"{name!r} is larger than {limits.max_file_bytes >> 20} MB.")
    return load_image(data).image


class _Budget:
    """The folder caps, counted while walking: files listed and bytes of the image files."""

    def __init__(self, limits: Limits):
        self.limits, self.files, self.bytes = limits, 0, 0

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise DatasetError(f"The folder holds more than {self.limits.max_files:,} files.")

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_total_bytes:
            raise DatasetError(
                f"The folder's images add up to more than {self.limits.max_total_bytes >> 20} MB.")


def _image_files(top: Path, skipped: Counter, budget: _Budget) -> Iterator[Path]:
    """Image files anywhere below ``top``, sorted, lazily: symbolic links (to files or
    folders) are counted and never followed, hidden and oversized files skipped."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        kept = []
        for d in sorted(dirnames):
            if d.startswith(".") or d == "__MACOSX":
                continue
            if Path(dirpath, d).is_symlink():
                budget.add_file()
                skipped[SKIP_SYMLINK] += 1
            else:
                kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            budget.add_file()
            path = Path(dirpath, name)
            if path.is_symlink():
                skipped[SKIP_SYMLINK] += 1
            elif name.startswith("."):
                skipped[SKIP_HIDDEN] += 1
            elif path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped[SKIP_NOT_IMAGE] += 1
            elif (size := path.lstat().st_size) > budget.limits.max_file_bytes:
                skipped[SKIP_TOO_LARGE] += 1
            else:
                budget.add_bytes(size)
                yield path


def load_image_folder(root: str | os.PathLike, limits: Limits = Limits(),
                      skipped: dict[str, int] | None = None) -> ImageSet:
    """Index an ImageFolder tree: one sub-folder per class, images anywhere below it.

    Each image is decoded once here so broken files are found before training starts;
    symlinks are never followed (see `folder_images` for the same walk without classes).

    Args:
        root: the folder (a single wrapper folder inside it is descended into).
        limits: file and byte caps and minimum data needed.
        skipped: counts already skipped upstream (by `extract_zip`), added to the report.

    Raises:
        DatasetError: missing folder, too many files or bytes, fewer than two classes, or
            too few images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"No folder called {root.name!r}.")
    root = _class_root(root)
    skipped = Counter(skipped or {})
    class_dirs = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name == "__MACOSX":
            skipped[SKIP_HIDDEN] += entry.is_file()
        elif entry.is_symlink():
            skipped[SKIP_SYMLINK] += 1
        elif entry.is_dir():
            class_dirs.append(entry)
        else:
            skipped[SKIP_OUTSIDE_CLASS] += 1

    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    budget = _Budget(limits)
    for class_dir in class_dirs:
        good = [p for p in _image_files(class_dir, skipped, budget)
                if _usable_image(p, skipped, limits)]
        if good:
            labels += [len(classes)] * len(good)
            classes.append(class_dir.name)
            paths += good
    skipped = Counter({k: v for k, v in skipped.items() if v})
    _check_enough(classes, np.asarray(labels, dtype=np.int64), skipped, limits)
    return ImageSet(classes, np.asarray(labels, dtype=np.int64), paths, dict(skipped))


def folder_images(root: str | os.PathLike, n: int | None = None, limits: Limits = Limits()
                  ) -> list[Image.Image]:
    """Up to ``n`` RGB images from anywhere below ``root``, sorted by path, unlabelled.

    The same walk as `load_image_folder`: symbolic links never followed, hidden files
    skipped, the file and byte caps of ``limits``; files that do not decode are skipped.

    Raises:
        DatasetError: missing folder, too many files or bytes, or no readable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"No folder called {root.name!r}.")
    skipped: Counter[str] = Counter()
    out = []
    for path in _image_files(root, skipped, _Budget(limits)):
        try:
            out.append(read_image(path, limits))
        except ImageError:
            skipped[SKIP_CORRUPT] += 1
            continue
        if n is not None and len(out) >= n:
            break
    if not out:
        note = ", ".join(f"{k} {reason}" for reason, k in skipped.items())
        note = f" Skipped: {note}." if note else ""
        raise DatasetError(f"No readable images in {root.name!r}.{note}")
    return out


def _usable_image(path: Path, skipped: Counter, limits: Limits) -> bool:
    try:
        read_image(path, limits)
    except ImageError:
        skipped[SKIP_CORRUPT] += 1
        return False
    return True


def _check_enough(classes: list[str], labels: np.ndarray, skipped: Counter, limits: Limits
                  ) -> None:
    note = ""
    if skipped:
        note = " Skipped: " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()) + "."
    if not classes:
        raise DatasetError(
            "No usable images found. Put images in one folder per class (cats/1.jpg, "
            "dogs/2.jpg, ...) and zip those folders." + note
        )
    if len(classes) == 1:
        raise DatasetError(
            f"Only one class folder ('{classes[0]}') holds images; a classifier needs at least "
            "two classes, one folder each." + note
        )
    if len(labels) < limits.min_images:
        raise DatasetError(
            f"Only {len(labels)} usable images; at least {limits.min_images} are needed." + note
        )
    counts = np.bincount(labels, minlength=len(classes))
    few = [f"'{c}' ({n})" for c, n in zip(classes, counts, strict=True)
           if n < limits.min_per_class]
    if few:
        raise DatasetError(
            f"Each class needs at least {limits.min_per_class} images (one to train, one to "
            f"validate); too few in: {', '.join(few)}." + note
        )


# ---------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def read_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """All of one Fashion-MNIST split: (N, 28, 28) uint8 images and (N,) int64 labels.

    N is 60,000 for "train" and 10,000 for "test"; `DatasetError` if the files are missing.
    ``root``: the folder of the IDX files (default `fashion_mnist_dir`).
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(root) if root is not None else fashion_mnist_dir()
    image_file = root / f"{prefix}-images-idx3-ubyte.gz"
    if not image_file.is_file():
        raise DatasetError(
            f"Fashion-MNIST is not installed ({image_file} missing); on Debian/Ubuntu install "
            "the 'dataset-fashion-mnist' package."
        )
    images = _read_idx(image_file, 16).reshape(-1, 28, 28)  # header: magic, n, rows, cols
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)  # magic, n
    return images, labels


def fashion_mnist(split: str = "train", n: int | None = None, seed: int = 0,
                  root: str | os.PathLike | None = None) -> ImageSet:
    """A stratified subset of Fashion-MNIST (28x28 grey clothes, 10 classes).

    Args:
        split: "train" (60k images) or "test" (10k).
        n: images to keep, spread evenly over the classes; None keeps all.
        seed: which images are drawn.
        root: folder with the IDX ``.gz`` files (default `fashion_mnist_dir`).

    Returns:
        `ImageSet` whose sources are an (n, 28, 28) uint8 array.
    """
    images, labels = read_fashion_mnist(split, root)
    full = ImageSet(list(FASHION_MNIST_CLASSES), labels, images)
    if n is None or n >= len(labels):
        return full
    keep = stratified_sample(labels, n, seed)
    return full.subset(keep)


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` items with the class proportions of ``labels`` (sorted, seeded)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Rank each item within its class in the shuffled order, then keep the lowest ranks
    # fraction-wise: every class gets n * share of it, rounding spread by the global shuffle.
    ranks = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        ranks[members] = (np.arange(len(members)) + 0.5) / len(members)
    keep = order[np.argsort(ranks[order], kind="stable")[:n]]
    return np.sort(keep)


def train_val_split(dataset: ImageSet, val_fraction: float = 0.2, seed: int = 0
                    ) -> tuple[ImageSet, ImageSet]:
    """Seeded, stratified split: each class gives ~``val_fraction`` of its images (>= 1) to val.

    Raises:
        DatasetError: a class has fewer than two images (nothing left to train or validate on).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c, name in enumerate(dataset.classes):
        members = rng.permutation(np.flatnonzero(dataset.labels == c))
        if len(members) < 2:
            raise DatasetError(f"Class '{name}' has {len(members)} image(s); it needs two or more.")
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return (dataset.subset(np.sort(np.concatenate(train_idx))),
            dataset.subset(np.sort(np.concatenate(val_idx))))
