"""Shards and the streaming loader: round trips, splitting, corruption, errors, exact resume."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmgen.cli.prepare import main
from fmgen.data import (
    DataError,
    ShardLoader,
    digits_images,
    fit_image,
    prepare,
    read_manifest,
)
from fmgen.data.sources import write_order

N_DIGITS = 1797


def digits_float() -> tuple[torch.Tensor, torch.Tensor]:
    """The original digits, scaled 0..16 -> 0..255 (rounded), then x / 127.5 - 1: (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    u8 = torch.from_numpy(np.round(d.images * 255.0 / 16.0).astype(np.uint8))
    return u8[:, None].float() / 127.5 - 1, torch.from_numpy(d.target).long()


def collect(loader, n: int | None = None) -> list[tuple]:
    it = iter(loader)
    return list(it) if n is None else [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def d8(tmp_path_factory) -> Path:
    """Digits at 8x8 in 12 shards of <= 150 samples."""
    out = tmp_path_factory.mktemp("d8")
    prepare("digits", out, resolution=8, channels=1, samples_per_shard=150, progress=False)
    return out


def copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a tar shard, passing each (name, bytes) through ``change`` (None drops it)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def shard_keys(path: Path) -> list[str]:
    """The sample keys of a tar shard, in the order they were written."""
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(n.split(".")[0] for n in tar.getnames()))


def edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


# --- writer ---------------------------------------------------------------------------------


def test_round_trip_digits_all_samples_in_write_order(d8):
    m = read_manifest(d8)
    assert (m.num_samples, m.num_classes, m.resolution, m.channels) == (N_DIGITS, 10, 8, 1)
    assert len(m.shards) == 12 and sum(s.num_samples for s in m.shards) == N_DIGITS
    assert m.pattern == "train-{000000..000011}.tar" and sum(m.class_counts) == N_DIGITS
    loader = ShardLoader(d8, 256, resampled=False, shuffle_buffer=0, return_keys=True)
    batches = collect(loader)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    keys = [k for b in batches for k in b[2]]
    ref_x, ref_y = digits_float()
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (N_DIGITS, 1, 8, 8)
    order = write_order(np.arange(N_DIGITS), 0)  # a seeded shuffle, keys = source indices
    assert keys == [f"{i:08d}" for i in order] and sorted(order) == list(range(N_DIGITS))
    assert torch.equal(x, ref_x[order]) and torch.equal(y, ref_y[order])
    assert loader.skipped == 0


def test_sample_members_and_metadata(d8):
    with tarfile.open(d8 / "train-000001.tar") as tar:
        names = tar.getnames()[:3]
        meta = json.loads(tar.extractfile(names[1]).read())
        label = int(tar.extractfile(names[0]).read())
    key = names[0].split(".")[0]
    i = int(key)
    assert (
        names == [f"{key}.cls", f"{key}.json", f"{key}.png"]
        and i == write_order(np.arange(N_DIGITS), 0)[150]
    )
    assert meta["id"] == i and meta["label"] == label == int(digits_float()[1][i])
    assert meta["class"] == str(label)
    assert meta["split"] == "train" and f"load_digits[{i}]" in meta["origin"]


def test_upscaled_rgb_digits_match_digits_images(tmp_path):
    prepare("digits", tmp_path, resolution=16, channels=3, samples_per_shard=1000, progress=False)
    batches = collect(
        ShardLoader(tmp_path, 1000, resampled=False, shuffle_buffer=0, return_keys=True)
    )
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    ids = [int(k) for b in batches for k in b[2]]
    u8, labels = digits_images(resolution=16, channels=3)  # (N, 16, 16, 3)
    assert x.shape == (N_DIGITS, 3, 16, 16) and sorted(ids) == list(range(N_DIGITS))
    assert torch.equal(x, torch.from_numpy(u8[ids]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.equal(y, torch.from_numpy(labels[ids]))


def test_cli_help_jpeg_and_holdout_split(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0 and "--holdout-fraction" in capsys.readouterr().out
    common = [
        "--source",
        "digits",
        "--holdout-fraction",
        "0.2",
        "--seed",
        "3",
        "--format",
        "jpg",
        "--jpeg-quality",
        "90",
        "--samples-per-shard",
        "500",
        "--no-progress",
    ]
    assert main(["prepare", *common, "--split", "train", "--out", str(tmp_path / "tr")]) == 0
    assert "1438 samples" in capsys.readouterr().out
    assert main(["prepare", *common, "--split", "test", "--out", str(tmp_path / "te")]) == 0
    tr, te = read_manifest(tmp_path / "tr"), read_manifest(tmp_path / "te")
    assert (tr.num_samples, te.num_samples, te.image_format, te.jpeg_quality) == (
        1438,
        359,
        "jpg",
        90,
    )
    keys = {}
    for name in ("tr", "te"):
        loader = ShardLoader(
            tmp_path / name, 512, resampled=False, shuffle_buffer=0, return_keys=True
        )
        keys[name] = {k for b in collect(loader) for k in b[2]}
    assert not keys["tr"] & keys["te"] and len(keys["tr"] | keys["te"]) == N_DIGITS
    # a complete folder is not overwritten silently
    assert main(["prepare", *common, "--split", "test", "--out", str(tmp_path / "te")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    originals = {}
    for cls, n in (("zebra", 3), ("ant", 2)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(n):
            img = Image.fromarray(
                rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
            )  # 20 wide, 12 high
            img.save(tmp_path / "src" / cls / f"{i}.png")
            originals[(cls, i)] = img
    m = prepare(
        "folder",
        tmp_path / "out",
        resolution=8,
        channels=3,
        source_path=tmp_path / "src",
        progress=False,
    )
    assert m.class_names == ("ant", "zebra") and m.class_counts == (2, 3) and m.num_samples == 5
    ((x, y, keys),) = collect(
        ShardLoader(tmp_path / "out", 8, resampled=False, shuffle_buffer=0, return_keys=True)
    )
    at = {int(k): j for j, k in enumerate(keys)}  # source index -> position in the shards
    assert x.shape == (5, 3, 8, 8) and [int(y[at[i]]) for i in range(5)] == [0, 0, 1, 1, 1]
    expect = np.array(fit_image(originals[("zebra", 1)], 8, 3))  # key 3 = zebra/1.png
    assert torch.equal(x[at[3]], torch.from_numpy(expect).permute(2, 0, 1).float() / 127.5 - 1)
    # shorter side resized to 8 (13x8), then center-cropped
    assert expect.shape == (8, 8, 3) and fit_image(originals[("ant", 0)], 8, 1).mode == "L"


def test_datasets_save_to_disk_source(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])}
    )
    ds = datasets.Dataset.from_dict({"img": images, "label": [2, 0, 1, 2, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    m = prepare(
        "hf",
        tmp_path / "out",
        resolution=10,
        channels=1,
        source_path=tmp_path / "hf",
        image_column="img",
        label_column="label",
        progress=False,
    )
    assert m.class_names == ("cat", "dog", "eel") and m.num_samples == 6
    ((x, y, keys),) = collect(
        ShardLoader(tmp_path / "out", 6, resampled=False, shuffle_buffer=0, return_keys=True)
    )
    at = {int(k): j for j, k in enumerate(keys)}  # source index -> position in the shards
    assert [int(y[at[i]]) for i in range(6)] == [2, 0, 1, 2, 0, 1]
    gray = np.array(images[4].convert("L"))
    assert torch.equal(x[at[4], 0], torch.from_numpy(gray).float() / 127.5 - 1)
    with pytest.raises(DataError, match="column 'image' is not in"):
        prepare("hf", tmp_path / "out2", source_path=tmp_path / "hf", progress=False)


# --- splitting across ranks and workers -----------------------------------------------------

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from fmgen.data import ShardLoader
    folder, rank, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    loader = ShardLoader(folder, 32, rank=rank, world_size=2, num_workers=2, seed=5,
                         resampled=False, return_keys=True)
    keys = [k for _, _, ks in loader for k in ks]
    json.dump(keys, open(out, "w"))
    """
)


def test_two_ranks_two_workers_see_every_sample_once(d8, tmp_path):
    from conftest import subprocess_env

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(d8), str(r), str(tmp_path / f"{r}.json")],
            env=subprocess_env(),
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    every = seen[0] + seen[1]
    assert len(every) == N_DIGITS and set(every) == {f"{i:08d}" for i in range(N_DIGITS)}
    assert seen[0] and seen[1]


# --- corruption and errors ------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_png_is_skipped_and_counted(d8, tmp_path, num_workers):
    data = copy_shards(d8, tmp_path / "d")
    k1, k11 = shard_keys(data / "train-000001.tar"), shard_keys(data / "train-000011.tar")
    bad_keys = {k1[1], k1[10], k11[-1]}
    bad = {f"{k}.png" for k in bad_keys}
    rewrite_shard(data / "train-000001.tar", lambda n, b: b"not a png" if n in bad else b)
    rewrite_shard(data / "train-000011.tar", lambda n, b: b[:40] if n in bad else b)  # cut-off png
    loader = ShardLoader(data, 64, resampled=False, num_workers=num_workers, return_keys=True)
    keys = [k for b in collect(loader) for k in b[2]]
    assert len(keys) == N_DIGITS - 3 and len(set(keys)) == len(keys)
    assert loader.skipped == 3
    assert not bad_keys & set(keys)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_tar_is_skipped_and_counted(d8, tmp_path, num_workers):
    data = copy_shards(d8, tmp_path / "d")
    shard = data / "train-000003.tar"
    written = set(shard_keys(shard))
    shard.write_bytes(shard.read_bytes()[: 60 * 1024 + 700])  # cut inside a member
    loader = ShardLoader(data, 64, resampled=False, num_workers=num_workers, return_keys=True)
    keys = [k for b in collect(loader) for k in b[2]]
    lost = written - set(keys)
    assert 0 < len(lost) < 150  # the start of the cut shard survives
    assert loader.skipped == len(lost)  # lost samples are counted as samples, not as one read
    assert len(keys) == N_DIGITS - len(lost) and len(set(keys)) == len(keys)
    # resampled mode keeps going as well
    it = iter(ShardLoader(data, 64, num_workers=num_workers, seed=1))
    assert all(next(it)[0].shape == (64, 1, 8, 8) for _ in range(40))


def test_truncated_shard_warning_names_the_shard_and_the_lost_samples(d8, tmp_path, caplog):
    data = copy_shards(d8, tmp_path / "d")
    shard = data / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: 60 * 1024 + 700])
    loader = ShardLoader(data, 64, resampled=False)
    with caplog.at_level(logging.WARNING, logger="fmgen.data"):
        collect(loader)
    (msg,) = [r.getMessage() for r in caplog.records if "train-000003.tar" in r.getMessage()]
    assert f"skipping {loader.skipped} samples at shard {shard}" in msg and "unreadable tar" in msg


def test_zero_byte_shard_is_an_error_at_start_up(d8, tmp_path):
    data = copy_shards(d8, tmp_path / "d")
    (data / "train-000005.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty \(0 bytes\), e\.g\. .*train-000005\.tar"):
        ShardLoader(data, 8)


def test_clear_errors_at_start_up(d8, tmp_path):
    with pytest.raises(DataError, match="source is empty"):
        ShardLoader("", 8)
    with pytest.raises(DataError, match="no manifest at"):
        ShardLoader(tmp_path, 8)
    with pytest.raises(DataError, match=r"train-000012\.tar of the pattern .* is not listed"):
        ShardLoader(str(d8 / "train-{000010..000099}.tar"), 8)
    sub = ShardLoader(str(d8 / "train-{000000..000001}.tar"), 8, resampled=False)
    assert sub.num_samples == 300
    assert ShardLoader(d8 / "manifest.json", 8).num_samples == N_DIGITS
    empty = copy_shards(d8, tmp_path / "empty")
    edit_manifest(empty, lambda m: m.update(shards=[]))
    with pytest.raises(DataError, match="lists no shards"):
        ShardLoader(empty, 8)
    missing = copy_shards(d8, tmp_path / "missing")
    (missing / "train-000004.tar").unlink()
    with pytest.raises(DataError, match=r"missing, e\.g\. .*train-000004\.tar.*--overwrite"):
        ShardLoader(missing, 8)
    with pytest.raises(
        DataError,
        match=r"at least world_size x num_workers = 4 x 4 = 16 shards.*has 12.*resampled=True",
    ):
        ShardLoader(d8, 8, rank=1, world_size=4, num_workers=4, resampled=False)
    ShardLoader(d8, 8, rank=1, world_size=4, num_workers=4, resampled=True)  # fine when resampled
    with pytest.raises(DataError, match="rank 2 is outside"):
        ShardLoader(d8, 8, rank=2, world_size=2)
    few = copy_shards(d8, tmp_path / "few")
    edit_manifest(few, lambda m: m["classes"].update(count=5, names=list("abcde")))
    with pytest.raises(DataError, match=r"holds label 9, outside the manifest's 5 classes"):
        ShardLoader(few, 8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_label_outside_classes_found_while_decoding(d8, tmp_path, num_workers):
    data = copy_shards(d8, tmp_path / "d")
    # the manifest's per-shard label ranges are fine; one sample's cls is not
    key = shard_keys(data / "train-000002.tar")[10]
    rewrite_shard(data / "train-000002.tar", lambda n, b: b"12" if n == f"{key}.cls" else b)
    loader = ShardLoader(data, 64, resampled=False, num_workers=num_workers)
    with pytest.raises(
        DataError,
        match=rf"{key} of .*train-000002\.tar has label 12, outside the 10 classes",
    ):
        collect(loader)


def test_hflip_mirrors_about_half(d8):
    ref_x, _ = digits_float()
    loader = ShardLoader(d8, 512, resampled=False, hflip=True, seed=2, return_keys=True)
    flipped = kept = 0
    for x, _, keys in loader:
        for img, k in zip(x, keys, strict=True):
            orig = ref_x[int(k)]
            kept += torch.equal(img, orig)
            flipped += torch.equal(img, orig.flip(-1)) and not torch.equal(img, orig)
    assert kept + flipped >= N_DIGITS - 40  # symmetric digits count as kept
    assert 0.4 * N_DIGITS < flipped < 0.6 * N_DIGITS


# --- exact resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "epochs"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_same_batches(d8, num_workers, resampled):
    kw = dict(
        rank=1,
        world_size=2,
        num_workers=num_workers,
        seed=7,
        resampled=resampled,
        shuffle_buffer=300,
        hflip=True,
        return_keys=True,
    )
    loader = ShardLoader(d8, 16, **kw)
    # 1797 // (2 x 16) = 56 batches per rank and epoch: the continuation crosses an epoch boundary
    n, m = 17, 60
    it = iter(loader)
    head = [next(it) for _ in range(n)]
    state = loader.state_dict()
    if resampled:
        tail = [next(it) for _ in range(m)]
    else:  # the rest of this epoch, then the whole next one
        tail = list(it) + collect(loader)
    fresh = ShardLoader(d8, 16, **kw)
    fresh.load_state_dict(state)
    again = collect(fresh, m) if resampled else collect(fresh) + collect(fresh)
    assert len(again) == len(tail) >= m - 20
    for a, b in zip(again, tail, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert head[0][2] != tail[0][2]


def test_position_with_other_settings_starts_the_next_epoch(d8, caplog):
    loader = ShardLoader(d8, 16, num_workers=0, seed=1)
    collect(loader, 5)
    other = ShardLoader(d8, 16, num_workers=2, seed=1)
    other.load_state_dict(loader.state_dict())
    assert "lanes" in caplog.text and other.epoch == 1


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "epochs"])
def test_resume_is_exact_with_corrupt_samples_and_workers(d8, tmp_path, resampled):
    data = copy_shards(d8, tmp_path / "d")
    rewrite_shard(
        data / "train-000001.tar", lambda n, b: b"bad" if n.endswith(("3.png", "7.png")) else b
    )
    shard = data / "train-000007.tar"
    shard.write_bytes(shard.read_bytes()[: 100 * 1024 + 300])
    kw = dict(num_workers=2, seed=3, resampled=resampled, shuffle_buffer=200, return_keys=True)
    loader = ShardLoader(data, 16, **kw)
    it = iter(loader)
    for _ in range(45):
        next(it)
    state = loader.state_dict()
    tail = [next(it) for _ in range(70)] if resampled else list(it)
    fresh = ShardLoader(data, 16, **kw)
    fresh.load_state_dict(state)
    again = collect(fresh, 70) if resampled else collect(fresh)
    assert [b[2] for b in again] == [b[2] for b in tail]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, tail, strict=True))
    assert fresh.skipped == loader.skipped > 0


@pytest.mark.parametrize("fmt", ["ustar", "pax", "gnu", "gz"])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    from fmgen.data.stream import tar_members

    files = {
        "a/" + "x" * 120 + ".png": b"\x89PNG...",
        "00000001.cls": b"3",
        "00000001.json": b"{}" * 300,
        "ü/00000002.cls": b"",
        "00000003.txt": bytes(range(256)) * 5,
    }
    if fmt == "ustar":
        files.pop(next(iter(files)))  # ustar cannot hold a 120-character name
        files.pop("ü/00000002.cls")
    path = tmp_path / "t.tar"
    formats = {
        "ustar": tarfile.USTAR_FORMAT,
        "pax": tarfile.PAX_FORMAT,
        "gnu": tarfile.GNU_FORMAT,
        "gz": tarfile.PAX_FORMAT,
    }
    with tarfile.open(path, "w:gz" if fmt == "gz" else "w", format=formats[fmt]) as tar:
        tar.addfile(_dir_info("somedir"))
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert dict(tar_members(f)) == files


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.fixture(scope="module")
def d8_uneven(tmp_path_factory) -> Path:
    """Digits at 8x8 in 13 shards of <= 140 samples: 3 lanes get 700, 560 and 537 samples."""
    out = tmp_path_factory.mktemp("d8u")
    prepare("digits", out, resolution=8, channels=1, samples_per_shard=140, progress=False)
    return out


def test_resume_after_some_workers_finished_their_epoch(d8_uneven):
    """Epoch mode, 3 workers of unequal batch counts (e.g. 14, 12, 11): positions after a lane
    ended (the DataLoader then skips its worker) resume exactly."""
    kw = dict(num_workers=3, seed=4, resampled=False, shuffle_buffer=100, return_keys=True)
    ref = collect(ShardLoader(d8_uneven, 50, **kw))
    assert len(ref) >= 37 and sum(len(b[2]) for b in ref) == N_DIGITS
    for n in (len(ref) - 5, len(ref) - 2):  # the last batches come from the longest lane only
        loader = ShardLoader(d8_uneven, 50, **kw)
        it = iter(loader)
        for _ in range(n):
            next(it)
        state = loader.state_dict()
        it.close()
        fresh = ShardLoader(d8_uneven, 50, **kw)
        fresh.load_state_dict(state)
        again = collect(fresh)
        assert [b[2] for b in again] == [b[2] for b in ref[n:]]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(again, ref[n:], strict=True))


def test_epoch_batches_sets_the_resampled_epoch_length(d8):
    loader = ShardLoader(d8, 16, num_workers=2, seed=3, epoch_batches=5)
    assert loader.batches_per_epoch == 6  # rounded up to a multiple of the 2 workers
    collect(loader, 6)
    assert loader.epoch == 1 and [lane[:2] for lane in loader.state_dict()["lanes"]] == [[1, 0]] * 2
    with pytest.raises(DataError, match="epoch_batches must be"):
        ShardLoader(d8, 16, epoch_batches=0)
