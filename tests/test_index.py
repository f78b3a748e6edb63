"""``index_shards`` / ``python -m fmgen.data index`` on shards other tools wrote: counts, classes
and image sizes as written; local files, .tar.gz, pipe: and http:// URLs agree; the shards and
the files beside them are never touched."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from foreign import (
    ShardServer,
    checksums,
    digits_u8,
    gzip_shards,
    write_img2dataset,
    write_wds_jpegs,
)
from PIL import Image

from fmgen.data import DataError
from fmgen.data.__main__ import main
from fmgen.data.index import INDEX, index_shards, read_index
from fmgen.data.stream import shard_samples

N, PER_SHARD = 300, 100
# write_wds_jpegs / write_img2dataset cycle sample i through these sizes (i % 5)
SIZES = ["24x24", "32x20", "20x36", "40x40", "17x23"]


@pytest.fixture(scope="module")
def wds(tmp_path_factory) -> Path:
    """Three ShardWriter shards of 100 JPEGs + cls; never modified (tests copy them first)."""
    folder = tmp_path_factory.mktemp("wds")
    write_wds_jpegs(folder, n=N, per_shard=PER_SHARD)
    return folder


def untouched(folder: Path, before: dict[str, str], *new: str) -> None:
    """Every file of ``folder`` has its old bytes, and only the files ``new`` were added."""
    after = checksums(folder)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == sorted(new)


def same_content(a, b) -> None:
    """Two indexes of the same shards through different locations (urls and bytes aside)."""
    ja, jb = a.to_json(), b.to_json()
    for j in (ja, jb):
        for s in j["shards"]:
            s.pop("url"), s.pop("bytes")
    assert ja == jb


def test_shardwriter_jpegs_counts_classes_and_sizes_as_written(wds, tmp_path):
    before = checksums(wds)
    ix = index_shards(wds, tmp_path / "ix", progress=False)
    labels = digits_u8()[1][:N]
    assert ix.num_samples == N and [s.num_samples for s in ix.shards] == [PER_SHARD] * 3
    assert ix.num_classes == 10
    assert ix.class_counts == tuple(np.bincount(labels, minlength=10).tolist())
    per_shard = labels.reshape(3, PER_SHARD)
    assert [(s.label_min, s.label_max) for s in ix.shards] == [
        (int(p.min()), int(p.max())) for p in per_shard
    ]
    assert ix.image_sizes == {size: N // 5 for size in SIZES}
    files = sorted(wds.glob("*.tar"))
    assert [s.url for s in ix.shards] == [str(p) for p in files]  # absolute, in order
    assert [s.bytes for s in ix.shards] == [p.stat().st_size for p in files]
    assert (ix.image_key, ix.label_key, ix.caption_key, ix.unreadable) == ("jpg", "cls", "", ())
    assert read_index(tmp_path / "ix").to_json() == ix.to_json()
    assert sorted(os.listdir(tmp_path / "ix")) == [INDEX]  # no temporary file left
    untouched(wds, before)


def test_img2dataset_folder_has_no_labels_and_its_parquet_is_ignored(tmp_path):
    folder = tmp_path / "i2d"
    write_img2dataset(folder, n=120, per_shard=50)
    before = checksums(folder)
    ix = index_shards(folder, tmp_path / "ix", caption_key="txt", progress=False)
    assert [Path(s.url).name for s in ix.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [s.num_samples for s in ix.shards] == [50, 50, 20]
    assert ix.num_classes is None and ix.class_counts == ()
    assert (ix.label_key, ix.caption_key, ix.image_key) == ("", "txt", "jpg")
    assert all(s.label_min is None for s in ix.shards)
    assert ix.image_sizes == {size: 120 // 5 for size in SIZES}
    assert read_index(tmp_path / "ix").to_json()["classes"] is None
    untouched(folder, before)


def test_tar_gz_shards_index_as_their_tars(wds, tmp_path):
    gz = gzip_shards(sorted(wds.glob("*.tar")), tmp_path / "gz")
    before = checksums(tmp_path / "gz")
    plain = index_shards(wds, tmp_path / "a", progress=False)
    ix = index_shards(tmp_path / "gz", tmp_path / "b", progress=False)
    same_content(plain, ix)
    assert [s.url for s in ix.shards] == [str(p) for p in gz]
    assert [s.bytes for s in ix.shards] == [p.stat().st_size for p in gz]
    untouched(tmp_path / "gz", before)


def test_pipe_urls_as_a_list_and_as_a_brace_pattern(wds, tmp_path):
    before = checksums(wds)
    plain = index_shards(wds, tmp_path / "a", progress=False)
    files = sorted(wds.glob("*.tar"))
    urls = [f"pipe:cat {p}" for p in files]
    listed = index_shards(urls, tmp_path / "b", progress=False)
    braced = index_shards(f"pipe:cat {wds}/train-{{000000..000002}}.tar", tmp_path / "c",
                          progress=False)  # fmt: skip
    for ix in (listed, braced):
        same_content(plain, ix)
        assert [s.url for s in ix.shards] == urls  # URLs as given
        assert [s.bytes for s in ix.shards] == [p.stat().st_size for p in files]  # read to the end
    untouched(wds, before)


def test_http_brace_pattern_from_a_local_server(wds, tmp_path):
    before = checksums(wds)
    plain = index_shards(wds, tmp_path / "a", progress=False)
    with ShardServer(wds) as url:
        ix = index_shards(f"{url}/train-{{000000..000002}}.tar", tmp_path / "b", workers=2,
                          progress=False)  # fmt: skip
    same_content(plain, ix)
    assert [s.url for s in ix.shards] == [f"{url}/train-{i:06d}.tar" for i in range(3)]
    assert [s.bytes for s in ix.shards] == [p.stat().st_size for p in sorted(wds.glob("*.tar"))]
    untouched(wds, before)


def cut_mid_member(src: Path, dst: Path) -> int:
    """``dst``: ``src`` cut inside its 81st member's data; returns the complete samples before."""
    with tarfile.open(src) as t:
        member = t.getmembers()[80]  # KEY.jpg of sample 40 (each sample: jpg, cls)
    dst.write_bytes(src.read_bytes()[: member.offset_data + 100])
    n = 0
    with pytest.raises(tarfile.ReadError):
        for _ in shard_samples(str(dst)):
            n += 1
    return n


def test_a_shard_cut_inside_a_member_is_unreadable_and_left_out(wds, tmp_path, caplog):
    folder = tmp_path / "shards"
    shutil.copytree(wds, folder)
    readable = cut_mid_member(wds / "train-000001.tar", folder / "train-000001.tar")
    # samples 0..39 are whole, but a reader knows 39 is whole only once 40's first member is read
    assert readable == 39
    before = checksums(folder)
    with caplog.at_level(logging.WARNING, "fmgen.data"):
        ix = index_shards(folder, tmp_path / "ix", progress=False)
    assert [Path(s.url).name for s in ix.shards] == ["train-000000.tar", "train-000002.tar"]
    assert ix.num_samples == 2 * PER_SHARD
    ((bad),) = ix.unreadable
    assert bad["url"] == str(folder / "train-000001.tar")
    assert "ReadError" in bad["error"] and f"after {readable} complete samples" in bad["error"]
    assert "train-000001.tar is unreadable" in caplog.text
    assert read_index(tmp_path / "ix").unreadable == ix.unreadable
    # the classes are those of the two whole shards
    labels = digits_u8()[1][:N].reshape(3, PER_SHARD)[[0, 2]].ravel()
    assert ix.class_counts == tuple(np.bincount(labels, minlength=10).tolist())
    untouched(folder, before)


def test_a_shard_cut_between_members_keeps_its_samples_with_a_warning(wds, tmp_path, caplog):
    src, cut = wds / "train-000000.tar", tmp_path / "cut.tar"
    with tarfile.open(src) as t:
        member = t.getmembers()[60]  # the header of sample 30's first member
    cut.write_bytes(src.read_bytes()[: member.offset])
    with caplog.at_level(logging.WARNING, "fmgen.data"):
        ix = index_shards([str(cut), f"pipe:cat {cut}", str(src)], tmp_path / "ix",
                          progress=False)  # fmt: skip
    # a tar reader stops cleanly there: the shard is indexed with what it holds ...
    assert [s.num_samples for s in ix.shards] == [30, 30, PER_SHARD] and ix.unreadable == ()
    # ... and only the missing end-of-archive blocks tell it from a whole one
    assert caplog.text.count("ends without the tar end-of-archive blocks") == 2
    assert str(src) + " ends without" not in caplog.text


def test_every_shard_unreadable_is_an_error(wds, tmp_path):
    cut_mid_member(wds / "train-000000.tar", tmp_path / "a.tar")
    (tmp_path / "b.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="none of the 2 shards could be read"):
        index_shards(tmp_path, tmp_path / "ix", progress=False)
    empty = write_tar(tmp_path / "empty.tar", [])  # a whole tar of no member
    with pytest.raises(DataError, match="the 1 readable shards hold no samples"):
        index_shards([str(empty), str(tmp_path / "b.tar")], tmp_path / "ix", progress=False)
    assert not (tmp_path / "ix").exists()


def test_two_workers_give_the_same_index_as_one(wds, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(wds, folder)
    cut_mid_member(wds / "train-000001.tar", folder / "train-000001.tar")
    for i in range(3, 6):
        shutil.copy(wds / f"train-{i % 3:06d}.tar", folder / f"train-{i:06d}.tar")
    # the first shard comes last from its worker: results must still keep the shards' order
    spec = [f"pipe:sleep 1; cat {wds / 'train-000002.tar'}", str(folder)]
    one = index_shards(spec, tmp_path / "one", workers=1, progress=False)
    two = index_shards(spec, tmp_path / "two", workers=2, progress=False)
    assert len(one.shards) == 6 and len(one.unreadable) == 1
    assert two.to_json() == one.to_json()
    assert (tmp_path / "two" / INDEX).read_bytes() == (tmp_path / "one" / INDEX).read_bytes()


def test_out_may_be_the_shard_folder_but_a_foreign_index_json_is_left_alone(wds, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(wds, folder)
    before = checksums(folder)
    first = index_shards(folder, folder, progress=False)
    untouched(folder, before, INDEX)
    again = index_shards(folder, folder, progress=False)  # our own index: replaced
    assert again.to_json() == first.to_json()
    untouched(folder, before, INDEX)
    other = tmp_path / "other"
    other.mkdir()
    (other / INDEX).write_text(json.dumps({"shards": ["someone else's"]}))
    before = checksums(other)
    with pytest.raises(DataError, match=r"index.json exists and is not an fmgen shard index"):
        index_shards(folder, other, progress=False)
    untouched(other, before)
    with pytest.raises(DataError, match="is a file"):
        index_shards(folder, folder / "train-000000.tar", progress=False)
    untouched(folder, checksums(folder))


def jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 77).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes | str]]) -> Path:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


def test_label_key_mismatches_are_errors_naming_shard_and_key(wds, tmp_path):
    labeled = wds / "train-000000.tar"
    bare = write_tar(tmp_path / "bare.tar", [{"__key__": f"u{i}", "jpg": jpeg((8, 8))}
                                              for i in range(3)])  # fmt: skip
    with pytest.raises(DataError, match=rf"sample u0 of {bare} has no integer \.cls member"):
        index_shards([str(labeled), str(bare)], tmp_path / "ix", progress=False)
    word = write_tar(tmp_path / "word.tar", [{"__key__": "w0", "jpg": jpeg((8, 8)), "cls": "cat"}])
    with pytest.raises(DataError, match=rf"sample w0 of {word} has no integer \.cls"):
        index_shards([str(labeled), str(word)], tmp_path / "ix", progress=False)
    neg = write_tar(tmp_path / "neg.tar", [{"__key__": "n0", "jpg": jpeg((8, 8)), "cls": "-1"}])
    with pytest.raises(DataError, match=rf"{neg} holds \.cls -1"):
        index_shards([str(neg)], tmp_path / "ix", progress=False)
    with pytest.raises(DataError, match=r"no sample has an integer \.label member"):
        index_shards(labeled, tmp_path / "ix", label_key="label", progress=False)
    with pytest.raises(
        DataError, match=r"no sample has a \.png member \(members seen: \.cls, \.jpg"
    ):
        index_shards(labeled, tmp_path / "ix", image_key="png", progress=False)
    with pytest.raises(DataError, match=r"no sample has a \.txt member"):
        index_shards(labeled, tmp_path / "ix", caption_key="txt", progress=False)
    assert not (tmp_path / "ix").exists()
    # no label key: the cls members are not read as classes
    ix = index_shards([str(labeled), str(bare)], tmp_path / "ix", label_key="", progress=False)
    assert ix.num_classes is None and ix.num_samples == PER_SHARD + 3


def test_samples_without_a_readable_image_are_counted_with_a_warning(tmp_path, caplog):
    shard = write_tar(tmp_path / "s.tar", [
        {"__key__": "a", "png": b"\x89PNG broken", "cls": "0"},
        {"__key__": "b", "txt": "no image", "cls": "1"},
        {"__key__": "c", "webp": jpeg((5, 7)), "jpg": jpeg((6, 4)), "cls": "1"},  # jpg comes first
        {"__key__": "d", "jpg": png((9, 3)), "cls": "2"},  # the loader opens .jpg as JPEG only
        {"__key__": "e", "png": png((9, 3)), "cls": "2"},
    ])  # fmt: skip
    with caplog.at_level(logging.WARNING, "fmgen.data"):
        ix = index_shards(shard, tmp_path / "ix", progress=False)
    assert ix.num_samples == 5 and ix.class_counts == (1, 2, 2)
    assert ix.image_sizes == {"6x4": 1, "9x3": 1}
    assert ix.image_key == ""  # png and jpg used: "the first present"
    assert "1 samples have no image member (e.g. b of" in caplog.text
    assert "2 images have a header PIL cannot read (e.g. a of" in caplog.text


def test_cli_summary_and_errors(wds, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["index", "--help"])
    assert e.value.code == 0 and "--label-key" in capsys.readouterr().out
    before = checksums(wds)
    assert main(["index", str(wds), "--out", str(tmp_path / "ix"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"indexed 3 shards, {N} samples -> {tmp_path / 'ix' / INDEX}" in out
    counts = np.bincount(digits_u8()[1][:N])
    assert f"classes: 10 classes (.cls, {counts.min()}..{counts.max()} samples each)" in out
    assert "image sizes: 24x24 (60), 32x20 (60), 20x36 (60)\n" in out
    assert "unreadable shards: 0" in out
    untouched(wds, before)
    for args in (
        [str(tmp_path / "missing-folder")],
        [str(tmp_path / "train-{000000..000002}.tar")],  # a pattern naming no files
        [str(wds), "--workers", "0"],
    ):
        assert main(["index", *args, "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert "do not exist, e.g." in err[0] or "--workers" in err[0]
    assert not (tmp_path / "bad").exists()


def test_python_m_fmgen_data_runs_index_and_still_prepare(wds, tmp_path, capsys):
    from conftest import subprocess_env

    r = subprocess.run(
        [sys.executable, "-m", "fmgen.data", "index", str(wds), "--label-key", "", "--out",
         str(tmp_path / "ix"), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "classes: no labels" in r.stdout and read_index(tmp_path / "ix").num_samples == N
    # no command is prepare, as it was before index
    assert main(["--source", "digits", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    assert "wrote 1797 samples" in capsys.readouterr().out
