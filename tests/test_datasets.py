"""Ingestion of user data: hostile zips, sloppy folders, splits, Fashion-MNIST subsets."""

from __future__ import annotations

import io
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explorer import datasets
from explorer.datasets import DatasetError, Limits, ingest_zip, load_image_folder
from explorer.images import ImageError


def png_bytes(value: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None
             ) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # unix, so external_attr carries the file type
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def good_entries(classes=("cat", "dog"), per_class=6, prefix="") -> dict[str, bytes]:
    return {f"{prefix}{c}/{i}.png": png_bytes(10 * i + 60 * k)
            for k, c in enumerate(classes) for i in range(per_class)}


def job_dirs(work: Path) -> list[Path]:
    return sorted(work.glob("vit-explorer-job-*"))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A private parent for job temp dirs, so tests can check what was left behind."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def test_good_zip_with_wrapper_folder(tmp_path, work):
    entries = good_entries(prefix="my_photos/") | {"my_photos/README.txt": b"hello",
                                                   "__MACOSX/._x.png": b"junk"}
    data = ingest_zip(make_zip(tmp_path / "ok.zip", entries), work_dir=work)
    assert data.classes == ["cat", "dog"]
    assert data.class_counts() == {"cat": 6, "dog": 6}
    assert data.skipped == {datasets.SKIP_NOT_IMAGE: 1, datasets.SKIP_HIDDEN: 1}
    assert all(Path(p).is_relative_to(data.root) for p in data.sources)
    assert np.asarray(data.image(0)).shape == (16, 16, 3)
    data.cleanup()
    assert job_dirs(work) == []


@pytest.mark.parametrize("evil", ["../evil.png", "cat/../../evil.png", "/tmp/evil.png",
                                  "..\\..\\evil.png", "C:/evil.png"])
def test_zip_slip_refused_and_nothing_written(tmp_path, work, evil):
    archive = make_zip(tmp_path / "slip.zip", good_entries() | {evil: png_bytes(1)})
    with pytest.raises(DatasetError, match="climbs out|absolute"):
        ingest_zip(archive, work_dir=work)
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()
    assert job_dirs(work) == []  # the job dir is removed on failure


def test_zip_bomb_single_file_capped_by_real_bytes(tmp_path, work):
    # 64 MB of zeros deflates to ~64 KB: the header is honest here, but the cap counts the
    # bytes that actually come out, so a lying header would be caught the same way.
    bomb = make_zip(tmp_path / "bomb.zip", good_entries() | {"cat/big.png": bytes(64 << 20)})
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DatasetError, match="zip bomb"):
        ingest_zip(bomb, Limits(max_file_bytes=8 << 20), work_dir=work)
    assert job_dirs(work) == []


def test_zip_bomb_total_size_capped(tmp_path, work):
    entries = good_entries() | {f"dog/pad{i}.png": bytes(1 << 20) for i in range(5)}
    with pytest.raises(DatasetError, match="in total"):
        ingest_zip(make_zip(tmp_path / "many.zip", entries), Limits(max_total_bytes=3 << 20),
                   work_dir=work)


def test_too_many_files(tmp_path, work):
    archive = make_zip(tmp_path / "count.zip", good_entries(per_class=30))
    with pytest.raises(DatasetError, match="entries; the limit is 50"):
        ingest_zip(archive, Limits(max_files=50), work_dir=work)


def test_symlink_entries_skipped_never_created(tmp_path, work):
    archive = make_zip(tmp_path / "link.zip", good_entries(),
                       symlinks={"cat/passwd.png": "/etc/passwd", "dog/up.png": "../../x"})
    data = ingest_zip(archive, work_dir=work)
    assert data.skipped == {datasets.SKIP_SYMLINK: 2}
    assert len(data) == 12
    assert not any(p.is_symlink() for p in data.root.rglob("*"))
    data.cleanup()


def test_non_images_and_corrupt_files_skipped_and_counted(tmp_path, work):
    truncated = png_bytes(5, size=64)[:60]
    entries = good_entries() | {
        "cat/notes.txt": b"not an image",
        "cat/fake.jpg": b"GIF89a but really text",
        "dog/half.png": truncated,
        "dog/empty.png": b"",
    }
    data = ingest_zip(make_zip(tmp_path / "mixed.zip", entries), work_dir=work)
    assert data.skipped == {datasets.SKIP_NOT_IMAGE: 1, datasets.SKIP_CORRUPT: 3}
    assert data.class_counts() == {"cat": 6, "dog": 6}
    data.cleanup()


def test_one_class_only(tmp_path, work):
    archive = make_zip(tmp_path / "one.zip", good_entries(classes=("cat",), per_class=20))
    with pytest.raises(DatasetError, match="Only one class folder \\('cat'\\)"):
        ingest_zip(archive, work_dir=work)
    assert job_dirs(work) == []


def test_too_few_images(tmp_path, work):
    with pytest.raises(DatasetError, match="Only 4 usable images"):
        ingest_zip(make_zip(tmp_path / "few.zip", good_entries(per_class=2)), work_dir=work)
    entries = good_entries(per_class=9) | {"bird/1.png": png_bytes(3)}
    with pytest.raises(DatasetError, match="too few in: 'bird' \\(1\\)"):
        ingest_zip(make_zip(tmp_path / "bird.zip", entries), work_dir=work)


def test_only_junk_gives_clear_message(tmp_path, work):
    archive = make_zip(tmp_path / "junk.zip", {"a/readme.md": b"x", "b/data.csv": b"1,2"})
    with pytest.raises(DatasetError, match="No usable images.*2 not an image file"):
        ingest_zip(archive, work_dir=work)


def test_not_a_zip(tmp_path, work):
    path = tmp_path / "fake.zip"
    path.write_bytes(b"PK but not really")
    with pytest.raises(DatasetError, match="not a readable zip"):
        ingest_zip(path, work_dir=work)


def test_folder_ignores_symlinks(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            (root / c / f"{i}.png").write_bytes(png_bytes(i * 40))
    (root / "a" / "link.png").symlink_to(root / "b" / "0.png")
    (root / "c_link").symlink_to(root / "b")
    data = load_image_folder(root)
    assert data.classes == ["a", "b"]
    assert data.skipped == {datasets.SKIP_SYMLINK: 2}
    assert len(data) == 10


def test_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    data = datasets.ImageSet(["a", "b", "c"], labels, np.zeros((35, 8, 8), np.uint8))
    train, val = datasets.train_val_split(data, 0.2, seed=1)
    assert val.class_counts() == {"a": 2, "b": 4, "c": 1}
    assert train.class_counts() == {"a": 8, "b": 16, "c": 4}
    again, _ = datasets.train_val_split(data, 0.2, seed=1)
    other, _ = datasets.train_val_split(
        datasets.ImageSet(["a", "b", "c"], labels, np.arange(35 * 64, dtype=np.uint8)
                          .reshape(35, 8, 8)), 0.2, seed=2)
    assert np.array_equal(train.labels, again.labels)
    assert train.fingerprint() == again.fingerprint()
    assert train.fingerprint() != other.fingerprint()


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist")
def test_fashion_mnist_subset_balanced():
    data = datasets.fashion_mnist("test", 200, seed=0)
    assert data.sources.shape == (200, 28, 28) and data.sources.dtype == np.uint8
    assert set(data.class_counts().values()) == {20}  # the test split is balanced
    assert data.image(0).mode == "RGB"
    assert np.array_equal(datasets.fashion_mnist("test", 200, seed=0).labels, data.labels)


def test_conflicting_and_duplicate_names(tmp_path, work):
    clash = good_entries() | {"cat/x.png": png_bytes(1), "cat/x.png/y.png": png_bytes(2)}
    with pytest.raises(DatasetError, match="Could not unpack 'cat/x.png/y.png'"):
        ingest_zip(make_zip(tmp_path / "clash.zip", clash), work_dir=work)
    archive = make_zip(tmp_path / "dup.zip", good_entries())
    with zipfile.ZipFile(archive, "a") as zf, pytest.warns(UserWarning, match="Duplicate"):
        zf.writestr("dog/0.png", png_bytes(9))
    with pytest.raises(DatasetError, match="twice"):
        ingest_zip(archive, work_dir=work)
    assert job_dirs(work) == []


def outside_secret(tmp_path: Path) -> Path:
    """A valid image outside the user's folder: reading it through a link would leak it."""
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes(200))
    return secret


def test_symlink_to_a_file_outside_is_never_read_by_either_reader(tmp_path, monkeypatch):
    secret = outside_secret(tmp_path)
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            (root / c / f"{i}.png").write_bytes(png_bytes(i * 40))
    (root / "a" / "leak.png").symlink_to(secret)
    (root / "b" / "deeper").symlink_to(secret.parent, target_is_directory=True)
    opened = []
    plain_open = datasets.os.open
    monkeypatch.setattr(datasets.os, "open", lambda p, *a: opened.append(Path(p)) or plain_open(p, *a))
    labelled = load_image_folder(root)
    flat = datasets.folder_images(root)
    assert len(labelled) == len(flat) == 10
    assert labelled.skipped == {datasets.SKIP_SYMLINK: 2}
    assert all(p.parent.parent == root for p in labelled.sources)
    assert not [p for p in opened if "leak" in p.name or "deeper" in str(p)]
    # A link swapped in after listing is refused at open time (O_NOFOLLOW), not followed.
    (root / "a" / "0.png").unlink()
    (root / "a" / "0.png").symlink_to(secret)
    with pytest.raises(ImageError, match="Could not open"):
        labelled.image(0)
    with pytest.raises(ImageError, match="Could not open"):
        datasets.read_image(root / "a" / "0.png")


def test_distance_zip_dataset_uses_the_hardened_ingestion(tmp_path):
    """The distance tab's dataset band reads an uploaded zip as the fine-tune tab does:
    symlink entries skipped, zip-slip refused, the temp folder gone afterwards, and no
    message naming it."""
    from explorer import distance

    jobs = set(Path(tempfile.gettempdir()).glob("vit-explorer-job-*"))
    archive = make_zip(tmp_path / "photos.zip", {"a/1.png": png_bytes(10), "3.png": png_bytes(30)},
                       symlinks={"2.png": "/etc/passwd"})
    got = distance.dataset_images("uploaded zip", n=8, zip_path=str(archive))
    assert [im.getpixel((0, 0)) for im in got] == [(30, 225, 128), (10, 245, 128)]
    only_link = make_zip(tmp_path / "link.zip", {}, symlinks={"2.png": "/etc/passwd"})
    with pytest.raises(ImageError, match="No readable images in the zip") as err:
        distance.dataset_images("uploaded zip", n=8, zip_path=str(only_link))
    assert "vit-explorer-job" not in str(err.value) and "/" not in str(err.value)
    slip = make_zip(tmp_path / "slip.zip", {"../../x.png": png_bytes(1)})
    with pytest.raises(ImageError, match="climbs out"):
        distance.dataset_images("uploaded zip", n=8, zip_path=str(slip))
    assert set(Path(tempfile.gettempdir()).glob("vit-explorer-job-*")) <= jobs  # cleaned up
    with pytest.raises(ValueError, match="Unknown dataset"):
        distance.dataset_images("folder", n=8, zip_path=str(tmp_path))


def test_folder_caps_on_files_and_bytes(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            (root / c / f"{i}.png").write_bytes(png_bytes(i * 40))
    size = (root / "a" / "0.png").stat().st_size
    with pytest.raises(DatasetError, match="more than 9 files"):
        load_image_folder(root, Limits(max_files=9))
    with pytest.raises(DatasetError, match="more than 9 files"):
        datasets.folder_images(root, limits=Limits(max_files=9))
    with pytest.raises(DatasetError, match="add up to more than"):
        load_image_folder(root, Limits(max_total_bytes=5 * size))
    big = root / "a" / "big.png"
    big.write_bytes(png_bytes(1, size=256))
    data = load_image_folder(root, Limits(max_file_bytes=big.stat().st_size - 1))
    assert data.skipped == {datasets.SKIP_TOO_LARGE: 1} and len(data) == 10
    assert len(datasets.folder_images(root, n=3)) == 3
