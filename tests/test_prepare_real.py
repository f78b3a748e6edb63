"""``prepare`` on real image folders and data sets: shuffled shards, upright / 16-bit /
transparent images, unreadable files, temporary shard names, worker processes, the summary, and
folders of files fmgen did not write."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmgen.cli.prepare import main
from fmgen.data import DataError, Example, prepare, read_manifest, write_shards
from fmgen.data.images import convert_mode

CLASSES = [f"c{k}" for k in range(10)]


def make_folder(root: Path, per_class: int = 30, size: tuple[int, int] = (6, 5)) -> Path:
    """``root/c0 .. c9``, ``per_class`` random RGB PNGs each (``size`` = (width, height))."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i:03d}.png")
    return root


def read_samples(folder: Path) -> list[dict]:
    """Every sample of a prepared folder in written order: {"key", "cls", "json", image ext}."""
    samples: list[dict] = []
    for path in read_manifest(folder).shard_paths():
        with tarfile.open(path) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key})
                samples[-1][ext] = tar.extractfile(info).read()
    return samples


def decoded(sample: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["png"])))


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- order ----------------------------------------------------------------------------------


def test_folder_shards_mix_classes_and_keep_source_ids(tmp_path):
    src = make_folder(tmp_path / "src")
    argv = ["--source", "folder", "--source-path", str(src), "--samples-per-shard", "128"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    samples = read_samples(tmp_path / "a")
    first = samples[:128]
    assert len({s["cls"] for s in first}) >= 8  # class-ordered shards would hold 5
    assert sorted(int(s["key"]) for s in samples) == list(range(300))  # each sample once
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*.png"))  # source order
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["id"] == int(s["key"]) and meta["origin"] == files[meta["id"]]
        assert meta["class"] == meta["origin"].split("/")[0] == CLASSES[int(s["cls"])]
    m = read_manifest(tmp_path / "a")
    assert m.split["shuffle_seed"] == 0 and m.class_counts == (30,) * 10
    assert [s.num_samples for s in m.shards] == [128, 128, 44]


def test_same_seeds_give_byte_identical_shards(tmp_path):
    src = make_folder(tmp_path / "src", per_class=8)
    for name, shuffle_seed in (("a", 3), ("b", 3), ("c", 4)):
        prepare("folder", tmp_path / name, source_path=src, samples_per_shard=25,
                shuffle_seed=shuffle_seed, holdout_fraction=0.25, seed=1, progress=False)  # fmt: skip
    a, b, c = (file_digests(tmp_path / n) for n in "abc")
    assert a == b and len(a) == 3 + 1  # 60 train samples in 3 shards + the manifest
    assert a != c  # another shuffle seed: another order of the same samples
    keys = [[s["key"] for s in read_samples(tmp_path / n)] for n in "ac"]
    assert keys[0] != keys[1] and sorted(keys[0]) == sorted(keys[1])


def test_workers_give_the_same_bytes(tmp_path):
    src = make_folder(tmp_path / "src", per_class=12, size=(9, 7))
    (src / "c3" / "broken.png").write_bytes(b"\x89PNG not really")
    rgba = np.zeros((7, 9, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 100
    Image.fromarray(rgba).save(src / "c4" / "half.png")
    for name, workers in (("one", 1), ("two", 2)):
        prepare("folder", tmp_path / name, source_path=src, resolution=5, samples_per_shard=25,
                workers=workers, progress=False)  # fmt: skip
    one, two = file_digests(tmp_path / "one"), file_digests(tmp_path / "two")
    assert one == two and len(one) == 5 + 1  # 121 readable samples in 5 shards + the manifest
    assert read_manifest(tmp_path / "two").split["unreadable"] == 1


def test_workers_read_a_datasets_source(tmp_path):
    import datasets

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)) for _ in range(9)]
    features = datasets.Features(
        {"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b"])}
    )
    datasets.Dataset.from_dict(
        {"img": images, "y": [0, 1] * 4 + [0]}, features=features
    ).save_to_disk(str(tmp_path / "hf"))
    for name, workers in (("one", 1), ("two", 2)):
        prepare("hf", tmp_path / name, source_path=tmp_path / "hf", image_column="img",
                label_column="y", samples_per_shard=4, workers=workers, progress=False)  # fmt: skip
    one, two = file_digests(tmp_path / "one"), file_digests(tmp_path / "two")
    assert one == two and len(one) == 3 + 1


UNGUARDED = """
from fmgen.data import prepare
prepare("digits", {out!r}, workers=2, progress=False)
"""


def test_unguarded_script_with_workers_fails_instead_of_hanging(tmp_path):
    """With the spawn start method every worker re-imports the main script; prepare there must
    stop with a message (and the parent with an error), not start again or hang."""
    import subprocess
    import sys

    from conftest import subprocess_env

    script = tmp_path / "job.py"
    script.write_text(UNGUARDED.format(out=str(tmp_path / "out")))
    r = subprocess.run([sys.executable, str(script)], env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode != 0
    assert "if __name__ == '__main__':" in r.stderr and "worker process died" in r.stderr
    assert listing(tmp_path / "out") == []


# --- images as a viewer shows them ----------------------------------------------------------

RED, BLUE = (255, 0, 0), (0, 0, 255)


def sideways_jpeg() -> bytes:
    """Stored 16 wide x 8 high, left half red, right half blue, EXIF Orientation 6: a viewer
    rotates it 90 degrees clockwise, so upright it is 8 x 16, red on top, blue below."""
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8], a[:, 8:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=100, subsampling=0, exif=exif)  # crisp edge
    return buf.getvalue()


def assert_red_above_blue(img: np.ndarray) -> None:
    """(8, 8, 3): the center crop of the upright image, rows 4..11 of 16: red rows 0..3."""
    assert img.shape == (8, 8, 3)
    assert np.abs(img[:3].astype(int) - RED).max() <= 12  # JPEG, away from the edge
    assert np.abs(img[5:].astype(int) - BLUE).max() <= 12


def test_exif_orientation_is_applied_for_folders(tmp_path):
    (tmp_path / "src" / "photos").mkdir(parents=True)
    (tmp_path / "src" / "photos" / "phone.jpg").write_bytes(sideways_jpeg())
    m = prepare("folder", tmp_path / "out", source_path=tmp_path / "src", progress=False)
    assert m.resolution == 8  # the shorter side, either way up
    (sample,) = read_samples(tmp_path / "out")
    assert_red_above_blue(decoded(sample))


@pytest.mark.parametrize("feature", ["bytes", "datasets.Image"])
def test_exif_orientation_is_applied_for_datasets(tmp_path, feature):
    """Image bytes in a plain struct column, and the datasets Image feature (which transposes
    by itself: applied once, not twice)."""
    import datasets

    value = {"bytes": sideways_jpeg(), "path": None}
    features = datasets.Features({"img": datasets.Image()}) if feature != "bytes" else None
    ds = datasets.Dataset.from_dict({"img": [value]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    prepare("hf", tmp_path / "out", source_path=tmp_path / "hf", image_column="img",
            resolution=8, progress=False)  # fmt: skip
    (sample,) = read_samples(tmp_path / "out")
    assert_red_above_blue(decoded(sample))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
    (tmp_path / "src" / "scans").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "src" / "scans" / "ramp.png")
    assert Image.open(tmp_path / "src" / "scans" / "ramp.png").mode in ("I;16", "I")  # 16-bit
    for channels in (1, 3):
        out = tmp_path / f"out{channels}"
        prepare("folder", out, source_path=tmp_path / "src", channels=channels, progress=False)
        (sample,) = read_samples(out)
        expect = np.arange(256, dtype=np.uint8).reshape(16, 16)  # k * 257 -> k, exactly
        got = decoded(sample)
        assert np.array_equal(got, expect if channels == 1 else np.repeat(expect[..., None], 3, 2))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_modes_round_to_nearest(mode):
    v = np.array([[0, 128, 129, 32767, 32768, 65535]])  # / 257: 0, .498, .502, 127.498, 127.502
    if mode == "I;16B":
        img = Image.frombytes(mode, (6, 1), v.astype(">u2").tobytes())
    else:
        img = Image.fromarray(v.astype(np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    assert np.asarray(convert_mode(img, 1)).tolist() == [[0, 0, 1, 127, 128, 255]]
    if mode == "I":  # 32-bit: values outside 0..65535 are clipped
        img = Image.fromarray(np.array([[-7, 70000]], np.int32))
        assert np.asarray(convert_mode(img, 1)).tolist() == [[0, 255]]


def test_float_mode_is_read_as_0_to_255():
    img = Image.fromarray(np.array([[0.4, 0.6, 127.5001, 300.0, -2.0]], np.float32))
    assert np.asarray(convert_mode(img, 1)).tolist() == [[0, 1, 128, 255, 0]]


def composite(c: tuple, a: int, bg: tuple) -> tuple:
    return tuple(round((ci * a + bi * (255 - a)) / 255) for ci, bi in zip(c, bg, strict=True))


@pytest.mark.parametrize("background", ["white", "#000000", "#336699"])
def test_alpha_is_composited_over_the_background(tmp_path, background):
    px = [((255, 0, 0), 0), ((255, 0, 0), 128), ((0, 255, 0), 255), ((0, 0, 255), 64)]
    rgba = np.array([[(*c, a) for c, a in px[:2]], [(*c, a) for c, a in px[2:]]], np.uint8)
    (tmp_path / "src" / "icons").mkdir(parents=True)
    Image.fromarray(rgba).save(tmp_path / "src" / "icons" / "a.png")  # 2 x 2 RGBA
    prepare("folder", tmp_path / "out", source_path=tmp_path / "src", background=background,
            progress=False)  # fmt: skip
    (sample,) = read_samples(tmp_path / "out")
    bg = {"white": (255, 255, 255), "#000000": (0, 0, 0), "#336699": (0x33, 0x66, 0x99)}[background]
    expect = [composite(c, a, bg) for c, a in px]
    assert [tuple(p) for p in decoded(sample).reshape(4, 3).tolist()] == expect
    if background == "white":
        assert expect[:2] == [(255, 255, 255), (255, 127, 127)]  # transparent / half red
    assert read_manifest(tmp_path / "out").source["background"] == background.replace(
        "white", "#ffffff"
    )


def test_palette_and_gray_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255])
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # palette entry 0 (red) is transparent
    assert np.asarray(convert_mode(p, 3)).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    la = Image.frombytes("LA", (3, 1), bytes([0, 0, 0, 255, 200, 51]))  # (L, alpha) pairs
    assert np.asarray(convert_mode(la, 1, (0, 0, 0))).tolist() == [[0, 0, 40]]  # 200*51/255


# --- unreadable files -----------------------------------------------------------------------


def broken_folder(root: Path) -> Path:
    make_folder(root, per_class=4)
    rng = np.random.default_rng(5)
    (root / "c2" / "x.png").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    good = (root / "c5" / "000.png").read_bytes()
    (root / "c5" / "cut.png").write_bytes(good[: len(good) // 2])  # a truncated download
    (root / "gone").mkdir()
    (root / "gone" / "only.jpg").write_bytes(b"")
    return root


def test_unreadable_files_are_skipped_named_and_counted(tmp_path, capsys, caplog):
    src = broken_folder(tmp_path / "src")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="fmgen.data"):
        code = main(["--source", "folder", "--source-path", str(src), "--out", str(out),
                     "--samples-per-shard", "16", "--no-progress"])  # fmt: skip
    assert code == 0
    warned = caplog.text
    for name in ("c2/x.png", "c5/cut.png", "gone/only.jpg"):
        assert f"skipping unreadable image {name}" in warned
    assert "skipped 3 unreadable image(s)" in warned and "'gone' has no readable images" in warned
    printed = capsys.readouterr().out
    assert "wrote 40 samples (11 classes" in printed
    assert "skipped 3 unreadable image(s): c2/x.png, c5/cut.png, gone/only.jpg" in printed
    assert "c0: 4, c1: 4" in printed and "gone: 0" in printed
    assert "warning: 1 class(es) without readable images: gone" in printed
    m = read_manifest(out)
    assert m.num_samples == 40 and m.split["unreadable"] == 3 and m.class_counts[-1] == 0
    assert listing(out) == ["manifest.json", "train-000000.tar", "train-000001.tar",
                            "train-000002.tar"]  # fmt: skip
    assert sorted(int(s["key"]) for s in read_samples(out)) == sorted(
        set(range(43)) - {12, 25, 42}  # in source order c2/x.png is 12, c5/cut.png 25, gone/* 42
    )


def test_strict_stops_at_the_first_unreadable_file_and_writes_nothing(tmp_path, capsys):
    src = broken_folder(tmp_path / "src")
    out = tmp_path / "out"
    code = main(["--source", "folder", "--source-path", str(src), "--out", str(out),
                 "--samples-per-shard", "5", "--strict", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "error: cannot read image " in errors[0] and "drop --strict" in errors[0]
    named = errors[0].split("cannot read image ")[1].split(" ")[0]
    assert named in ("c2/x.png", "c5/cut.png", "gone/only.jpg")
    assert listing(out) == []  # no shard, no temporary file, no manifest


def test_default_resolution_skips_an_unreadable_first_file(tmp_path):
    src = make_folder(tmp_path / "src", per_class=1, size=(7, 5))
    (src / "c0" / "000.png").write_bytes(b"broken")  # the first file in source order
    m = prepare("folder", tmp_path / "out", source_path=src, progress=False)
    assert m.resolution == 5 and m.num_samples == 9


# --- temporary names, interruptions, foreign files ------------------------------------------


def digits_like(n: int, fail_at: int | None = None):
    """``n`` random 4x4 mode L examples; a KeyboardInterrupt instead of example ``fail_at``."""
    rng = np.random.default_rng(2)
    for i in range(n):
        if i == fail_at:
            raise KeyboardInterrupt
        yield Example(Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)), i % 3, i)


def write(out: Path, examples, **kw):
    return write_shards(examples, out, class_names=["a", "b", "c"], resolution=4, channels=1,
                        samples_per_shard=10, **kw)  # fmt: skip


def test_shards_appear_only_when_all_are_complete(tmp_path):
    out = tmp_path / "out"
    listings: list[list[str]] = []

    def watched():
        for ex in digits_like(35):
            listings.append(listing(out))
            yield ex

    write(out, watched())
    assert listings[0] == [] and listings[-1] == [f".train-00000{k}.tar.tmp" for k in range(4)]
    assert all(not name.endswith(".tar") for names in listings for name in names)
    assert listing(out) == ["manifest.json", *(f"train-00000{k}.tar" for k in range(4))]


def test_interrupted_write_leaves_nothing_and_keeps_an_old_set(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write(out, digits_like(35, fail_at=25))
    assert listing(out) == []
    write(out, digits_like(12))  # a complete set of 2 shards
    before = file_digests(out)
    with pytest.raises(KeyboardInterrupt):
        write(out, digits_like(35, fail_at=25), overwrite=True)
    assert file_digests(out) == before  # still the whole old set, nothing else
    with pytest.raises(DataError, match="label 7, outside 0..2"):
        write(out, [Example(Image.new("L", (4, 4)), 7, 0)], overwrite=True)
    assert file_digests(out) == before
    m = write(out, digits_like(35), overwrite=True)
    assert m.num_samples == 35 and len(m.shards) == 4 and len(listing(out)) == 5


def test_a_stale_temporary_shard_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".train-000007.tar.tmp").write_bytes(b"left by a killed prepare")
    write(out, digits_like(5))
    assert listing(out) == ["manifest.json", "train-000000.tar"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_each_shard_is_synced_before_its_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        fsync(fd)

    def spy_replace(a, b):
        events.append(("replace", Path(a).name))
        replace(a, b)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    write(tmp_path / "out", digits_like(25))
    for name in (".train-000000.tar.tmp", ".train-000002.tar.tmp", ".manifest.json.tmp"):
        assert events.index(("fsync", name)) < events.index(("replace", name))


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_shards_are_left_byte_identical(tmp_path, capsys, overwrite):
    import webdataset as wds

    foreign = tmp_path / "theirs"
    foreign.mkdir()
    with wds.ShardWriter(str(foreign / "train-%06d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(7):
            sink.write({"__key__": f"s{i}", "txt": f"their sample {i}".encode()})
    before = file_digests(foreign)
    assert len(before) == 3
    argv = ["--source", "digits", "--out", str(foreign), "--no-progress"]
    code = main(argv + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert code == 2 and "did not write (e.g. train-000000.tar)" in err and "Traceback" not in err
    assert file_digests(foreign) == before


# --- bad options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--workers", "0"], "workers must be >= 1"),
        (["--shuffle-seed", "-1"], "shuffle seeds must be >= 0"),
        (["--background", "no-such-colour"], "background 'no-such-colour' is not a colour"),
    ],
)
def test_bad_options_are_one_line(tmp_path, capsys, argv, needle):
    assert main(["--source", "digits", "--out", str(tmp_path / "p"), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_overwrite_replaces_only_shards_of_the_same_source(tmp_path):
    """--overwrite re-prepares a folder from its own source; shards of another source stay."""
    from conftest import DIGITS
    from foreign import checksums as checksums_of

    from fmgen.config import load_config
    from fmgen.data import prepare as prep
    from fmgen.data.pipeline import ensure_shards

    out = tmp_path / "d"
    prep("digits", out, resolution=8, channels=1, progress=False)
    before = checksums_of(out)
    folder = tmp_path / "imgs"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / c / f"{i}.png")
    with pytest.raises(
        DataError, match=r"from another source \(digits\); --overwrite replaces only"
    ):
        prep("folder", out, source_path=folder, resolution=8, overwrite=True, progress=False)
    prep("digits", out, resolution=8, channels=1, overwrite=True, progress=False)  # the same: fine
    assert checksums_of(out) == before
    cfg = load_config(
        DIGITS, [f"data.path={out}", "data.source=folder", f"data.source_path={folder}"]
    )
    with pytest.raises(DataError, match=r"prepared from 'digits', not from data.source='folder'"):
        ensure_shards(cfg.data)
    assert checksums_of(out) == before
