"""data.source=webdataset: shards other tools wrote, local or over URLs, any image size, labels or not.

Servers listen on 127.0.0.1 only and live inside the test that uses them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIGITS, ROOT, TINY, run_main, subprocess_env
from foreign import (
    ShardServer,
    checksums,
    digits_u8,
    gzip_shards,
    write_img2dataset,
    write_wds_jpegs,
)
from PIL import Image

from fmgen.config import load_config
from fmgen.data import DataError
from fmgen.data.decode import Decoding, Unusable, decode, fit
from fmgen.data.loader import ShardLoader
from fmgen.data.sources import fit_image
from fmgen.train import train

R = 16


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    wds_shards = write_wds_jpegs(root / "wds", n=300, per_shard=100)
    write_img2dataset(root / "i2d", n=120, per_shard=50)
    gzip_shards(wds_shards, root / "gz")
    return {"root": root, "wds": root / "wds", "i2d": root / "i2d", "gz": root / "gz"}


def webdataset_config(path, run: Path, steps: int, *extra: str):
    text = json.dumps(path) if isinstance(path, list) else str(path)
    return load_config(DIGITS, [*TINY, "data.source=webdataset", f"data.path={text}",
                                f"data.resolution={R}", f"train.run_dir={run}",
                                f"train.total_images={steps * 16}", *extra])  # fmt: skip


def one_pass(source, **kw) -> list[tuple]:
    loader = ShardLoader(source, 16, webdataset=True, resolution=R, channels=1, resampled=False,
                         shuffle_buffer=0, **kw)  # fmt: skip
    return list(loader)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    return load_file(str(next(ckpt.glob("**/model.safetensors"))))


# --- training on each kind of source --------------------------------------------------------


@pytest.mark.parametrize("kind", ["wds", "gz", "i2d", "pipe", "http"])
def test_training_runs_on_shards_fmgen_did_not_write(foreign, tmp_path, kind):
    before = checksums(foreign["root"])
    extra = ["data.num_classes=10"]
    if kind == "i2d":  # no labels: unconditional; captions ride along
        extra = ["data.caption_key=txt"]
    if kind in ("wds", "gz", "i2d"):
        res = train(webdataset_config(foreign[kind], tmp_path / "run", 3, *extra))
    elif kind == "pipe":
        urls = [f"pipe:cat {p}" for p in sorted(foreign["wds"].glob("*.tar"))]
        res = train(webdataset_config(urls, tmp_path / "run", 3, *extra))
    else:
        with ShardServer(foreign["wds"]) as url:
            res = train(webdataset_config(f"{url}/train-{{000000..000002}}.tar", tmp_path / "run",
                                          3, *extra))  # fmt: skip
    assert res.step == 3 and res.checkpoint is not None
    conditioning = json.loads((res.export_dir / "fmgen.json").read_text())["conditioning"]
    if kind == "i2d":
        assert conditioning == {"kind": "none"}
    else:
        assert conditioning["kind"] != "none" and conditioning["num_classes"] == 10
    assert checksums(foreign["root"]) == before  # not a byte changed, nothing added


def test_each_source_reads_every_sample_once(foreign):
    wds_n = sum(len(b[0]) for b in one_pass(foreign["wds"], num_classes=10))
    gz = one_pass(foreign["gz"], num_classes=10)
    plain = one_pass(foreign["wds"], num_classes=10)
    assert wds_n == 300
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(gz, plain, strict=True)
    )
    urls = [f"pipe:cat {p}" for p in sorted(foreign["wds"].glob("*.tar"))]
    piped = one_pass(urls, num_classes=10)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(piped, plain, strict=True))
    with ShardServer(foreign["wds"]) as url:
        served = one_pass(f"{url}/train-{{000000..000002}}.tar", num_classes=10)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(served, plain, strict=True))
    _, labels = digits_u8()
    assert torch.equal(torch.cat([b[1] for b in plain]), torch.from_numpy(labels[:300]))


def test_img2dataset_folder_is_unlabelled_and_carries_captions(foreign):
    loader = ShardLoader(foreign["i2d"], 16, webdataset=True, resolution=R, channels=1,
                         resampled=False, shuffle_buffer=0, caption_key="txt")  # fmt: skip
    batches = list(loader)
    assert loader.num_classes == 0 and loader.class_names == []
    captions = [c for b in batches for c in b[2]]
    assert len(captions) == 120 and captions[7] == "a handwritten digit, sample 7"
    assert all(int(y) == 0 for b in batches for y in b[1])


def test_resume_continues_a_url_stream_exactly(foreign, tmp_path):
    """2 + 2 steps with a restart (and a new server port) equal 4 steps in one go."""
    extra = ["data.num_classes=10", "train.checkpoint_every_images=32"]
    with ShardServer(foreign["wds"]) as url:
        pattern = f"{url}/train-{{000000..000002}}.tar"
        train(webdataset_config(pattern, tmp_path / "once", 4, *extra))
        train(webdataset_config(pattern, tmp_path / "twice", 2, *extra))
    with ShardServer(foreign["wds"]) as url:  # another port: the shards' names still match
        pattern = f"{url}/train-{{000000..000002}}.tar"
        train(webdataset_config(pattern, tmp_path / "twice", 4, *extra), resume="auto")
    a, b = final_weights(tmp_path / "once"), final_weights(tmp_path / "twice")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loader_position_survives_a_restart_over_http(foreign):
    with ShardServer(foreign["wds"]) as url:
        src = f"{url}/train-{{000000..000002}}.tar"
        make = lambda: ShardLoader(src, 16, webdataset=True, resolution=R, channels=1,  # noqa: E731
                                   num_classes=10, seed=3, shuffle_buffer=50)  # fmt: skip
        it = iter(make())
        full = [next(it) for _ in range(30)]  # spans an epoch of 300 samples (18 batches)
        first = make()
        it = iter(first)
        for _ in range(11):
            next(it)
        state = first.state_dict()
        second = make()
        second.load_state_dict(state)
        it = iter(second)
        rest = [next(it) for _ in range(19)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(full[11:], rest, strict=True))  # fmt: skip


# --- fitting images of other sizes ----------------------------------------------------------


def _gray(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8))


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(40, 24), (24, 40), (16, 16), (9, 12)])
def test_fit_modes(size):
    img = _gray(*size)
    d = lambda f: Decoding(R, 1, 1, label_key="", fit=f)  # noqa: E731
    assert np.array_equal(np.asarray(fit(img, d("center-crop"))), np.asarray(fit_image(img, R, 1)))
    resized = img.resize((R, R), Image.Resampling.BICUBIC) if size != (R, R) else img
    assert np.array_equal(np.asarray(fit(img, d("resize"))), np.asarray(resized))
    padded = np.asarray(fit(img, d("pad")))
    w, h = size
    s = R / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    inner = (
        np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC))
        if size != (R, R)
        else np.asarray(img)
    )
    top, left = (R - nh) // 2, (R - nw) // 2
    assert np.array_equal(padded[top : top + nh, left : left + nw], inner)
    mask = np.ones((R, R), bool)
    mask[top : top + nh, left : left + nw] = False
    assert padded.shape == (R, R) and (padded[mask] == 0).all()


def test_fit_none_refuses_other_sizes_and_names_the_fix(foreign):
    members = {"png": _png(_gray(20, 12)), "cls": b"3"}
    with pytest.raises(Unusable, match="image is 20x12, not 16x16"):
        decode(members, Decoding(R, 1, 10, fit="none"), "x")
    arr, label, _ = decode(members, Decoding(R, 1, 10), "x")
    assert arr.shape == (R, R, 1) and label == 3
    with pytest.raises(DataError, match=r"could not be used .*set data\.fit"):
        one_pass(foreign["wds"], num_classes=10, fit="none")


def test_unusable_samples_name_their_cause(foreign):
    with pytest.raises(DataError, match=r"no \.png member .*set data\.image_key"):
        one_pass(foreign["wds"], num_classes=10, image_key="png")
    with pytest.raises(DataError, match=r"\.label member.*data\.label_key"):
        one_pass(foreign["wds"], num_classes=10, label_key="label")
    with pytest.raises(DataError, match=r"labels from \.cls need the number of classes"):
        one_pass(foreign["wds"])  # cls present, but no count and no index
    with pytest.raises(
        DataError, match=r"s000005 of .*train-000000.tar has label 5, outside the 5 classes"
    ):
        one_pass(foreign["wds"], num_classes=5)


def test_bad_locations_fail_at_start_up_with_one_line(foreign, tmp_path):
    with pytest.raises(DataError, match=r"2 of the 3 shards do not exist"):
        one_pass(str(foreign["wds"] / "train-{000002..000004}.tar"), num_classes=10)
    with pytest.raises(DataError, match="holds no shards"):
        one_pass(tmp_path, num_classes=10)
    with ShardServer(tmp_path) as url:  # nothing served: curl's 404
        with pytest.raises(
            DataError, match=r"cannot read the shard http://127\.0\.0\.1:\d+/a\.tar"
        ):
            one_pass(f"{url}/a.tar", label_key="")


# --- never touching files fmgen did not write -----------------------------------------------


@pytest.mark.slow
def test_a_folder_of_foreign_train_shards_is_never_modified(tmp_path):
    """train-*.tar of another tool: the default data.source refuses, prepare refuses, the
    webdataset source trains and FID reads them, and not a byte changes."""
    folder = tmp_path / "theirs"
    write_wds_jpegs(folder, n=200, per_shard=50)
    before = checksums(folder)
    env = subprocess_env()
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)  # fmt: skip
    tiny = [*TINY, f"train.run_dir={tmp_path / 'run'}", "train.total_images=48"]
    r = run_main("train", "--config", DIGITS, *tiny, f"data.path={folder}")
    assert r.returncode == 2 and "data.source=webdataset" in r.stderr, r.stderr[-2000:]
    assert checksums(folder) == before
    for extra in ([], ["--overwrite"]):
        r = run("-m", "fmgen.data", "prepare", "--source", "digits", "--out", str(folder), *extra)
        assert r.returncode == 2 and "did not write" in r.stderr, r.stderr[-2000:]
        assert checksums(folder) == before
    wds = ["data.source=webdataset", f"data.path={folder}", f"data.resolution={R}",
           "data.num_classes=10", "eval.fid_every_images=48", "eval.fid_num_samples=130",
           "eval.force_feature_network=true"]  # unknown origin: the digits network is forced  # fmt: skip
    r = run_main("train", "--config", DIGITS, *tiny, *wds)
    assert r.returncode == 0, r.stderr[-3000:]
    fid = json.loads(next((tmp_path / "run" / "eval").glob("fid-step*.json")).read_text())
    assert fid["num_reference"] == 200 and np.isfinite(fid["fid"])
    assert str(tmp_path / "run" / "cache") in fid["reference"]["cache"]
    assert checksums(folder) == before


def test_an_index_gives_counts_and_classes_to_training_and_fid(foreign, tmp_path):
    """`index` once; then data.path (or data.manifest) names it: no data.num_classes needed,
    the epoch length comes from the real counts, and FID caches its statistics beside the
    index (a folder fmgen wrote), not beside the shards."""
    from fmgen.cli.index import main as index_main

    before = checksums(foreign["root"])
    assert index_main([str(foreign["wds"]), "--out", str(tmp_path / "idx"), "--no-progress"]) == 0
    by_index = ShardLoader(tmp_path / "idx", 16, webdataset=True, resolution=R, channels=1)
    named = ShardLoader(foreign["wds"], 16, webdataset=True, resolution=R, channels=1,
                        manifest=tmp_path / "idx")  # fmt: skip
    for loader in (by_index, named):
        assert (loader.num_samples, loader.num_classes, loader.batches_per_epoch) == (300, 10, 18)
    # foreign shards of unknown origin: the digits network must be forced (refused otherwise)
    cfg = webdataset_config(tmp_path / "idx", tmp_path / "run", 2, "eval.fid_every_images=32",
                            "eval.fid_num_samples=130", "eval.force_feature_network=true")  # fmt: skip
    res = train(cfg)
    fid = json.loads(next((res.run_dir / "eval").glob("fid-step*.json")).read_text())
    assert fid["num_reference"] == 300
    assert fid["reference"]["cache"].startswith(str(tmp_path / "idx" / "fid-cache"))
    assert checksums(foreign["root"]) == before


def test_loader_reads_16_bit_alpha_and_rotated_images_as_prepare_does():
    import io

    ramp = np.linspace(0, 65535, R * R).round().astype(np.uint16).reshape(R, R)
    sixteen = Image.fromarray(ramp)  # mode I;16
    arr, _, _ = decode({"png": _png(sixteen)}, Decoding(R, 1, 1, label_key=""), "x")
    assert np.array_equal(arr[..., 0], np.rint(ramp / 257.0).astype(np.uint8))  # not clipped white
    rgba = Image.new("RGBA", (R, R), (255, 0, 0, 0))  # fully transparent red
    arr, _, _ = decode({"png": _png(rgba)}, Decoding(R, 3, 1, label_key=""), "x")
    assert (arr == 255).all()  # composited on white, not black red
    tall = np.zeros((24, 16), np.uint8)
    tall[:4] = 255  # a bright band at the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    Image.fromarray(tall).save(buf, format="JPEG", quality=95, exif=exif)
    arr, _, _ = decode({"jpg": buf.getvalue()}, Decoding(R, 1, 1, label_key="", fit="resize"), "x")
    assert arr[:, -3:].mean() > 200 and arr[:, :3].mean() < 50  # the band is on the right


def test_an_object_store_url_says_to_stream_it_through_pipe():
    with pytest.raises(DataError, match=r"s3: URLs; .*'pipe:aws s3 cp s3://b/train-0\.tar -'"):
        one_pass("s3://b/train-{0..2}.tar", label_key="")


def test_remote_shards_start_while_the_previous_one_is_read(foreign, monkeypatch):
    """Each next pipe: shard is opened before the current one is parsed to its end, and a
    stream stopped early closes the one it started."""
    import fmgen.data.stream as stream

    events: list[str] = []
    real_start, real_discard = stream.start_shard, stream.discard
    monkeypatch.setattr(
        stream, "start_shard", lambda u: events.append(f"start {u[-8:]}") or real_start(u)
    )
    monkeypatch.setattr(stream, "discard", lambda h: events.append("discard") or real_discard(h))
    urls = [f"pipe:cat {p}" for p in sorted(foreign["wds"].glob("*.tar"))]
    batches = one_pass(urls, num_classes=10)
    assert sum(len(b[0]) for b in batches) == 300
    assert events[:2] == ["start 0000.tar", "start 0001.tar"]  # the 2nd before the 1st is read
    assert events[-1] == "discard"
