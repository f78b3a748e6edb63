"""Precomputed text embeddings (``prepare --text-encoder``): the stored rows are the packed
encodings of the captions, every input member is kept, the manifest's text section, the loader's
rows, resume, the process split, the check training makes, and one-line errors for bad inputs.

A tiny CLIP text encoder (tests/text_fixtures.py) is built offline; nothing is downloaded."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from text_fixtures import save_tiny_encoder

import fmgen.data.text_embeddings as te
from fmgen.cli.prepare import main as prepare_main
from fmgen.data import DataError, ShardLoader, prepare, read_manifest
from fmgen.data.decode import Decoding, Unusable, decode_text, hint
from fmgen.data.stream import shard_samples
from fmgen.models.autoencoder import folder_hash as vae_hash
from fmgen.models.conditioning import TextConditioning
from fmgen.models.text import FrozenTextEncoder, folder_hash

L = 12  # --text-max-length: some captions below are longer
D = P = 32  # the tiny CLIP's hidden size; its pooled vector is the end-of-text state
F = L * (D + 1) + P
WORDS = ["a handwritten zero", "a handwritten one", "the digit 3, written by hand",
         "a photo of a cat", "a red square on a blue background",
         "four five six seven eight nine four five six seven eight nine a handwritten two"]  # fmt: skip


def caption_of(i: int) -> str | None:
    """Sample i's caption; every fifth has none (the empty caption), some are over L tokens."""
    return None if i % 5 == 3 else WORDS[i % len(WORDS)]


def digit_png(i: int, size: int = 16) -> bytes:
    from sklearn.datasets import load_digits

    a = np.round(load_digits().images[i] * (255.0 / 16.0)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def write_captioned_wds(out: Path, n: int = 19, per_shard: int = 7) -> Path:
    """3 shards (7, 7, 5) by webdataset.ShardWriter: png + cls (+ txt)."""
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "part-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n):
            sample = {"__key__": f"s{i:06d}", "png": digit_png(i), "cls": str(i % 10).encode()}
            if caption_of(i) is not None:
                sample["txt"] = caption_of(i).encode()
            w.write(sample)
    return out


def add_captions(folder: Path) -> None:
    """Give fmgen's pixel shards a .txt member per sample (by the sample's id), in place."""
    import webdataset as wds

    for path in read_manifest(folder).shard_paths():
        samples = list(shard_samples(str(path)))
        with open(path, "wb") as f, wds.TarWriter(f, mtime=0) as w:
            for key, members in samples:
                c = caption_of(int(key))
                w.write({"__key__": key, **members, **({"txt": c.encode()} if c else {})})


def stored(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    return [s for p in read_manifest(folder).shard_paths() for s in shard_samples(str(p))]


def npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("clip") / "clip", "clip")


@pytest.fixture(scope="module")
def packer(clip):
    """The tiny CLIP as training would load it, and its packing."""
    enc = FrozenTextEncoder(clip, max_length=L)
    return enc, TextConditioning(enc.record(), max_length=L, token_dim=enc.token_dim,
                                 pooled_dim=enc.pooled_dim, frozen=enc)  # fmt: skip


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory) -> Path:
    return write_captioned_wds(tmp_path_factory.mktemp("wds") / "wds")


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> Path:
    """fmgen's own pixel shards (digits at 16x16, 18 samples in 3 shards) with .txt captions."""
    out = tmp_path_factory.mktemp("pixels") / "px"
    prepare("digits", out, resolution=16, channels=1, holdout_fraction=0.99, samples_per_shard=7,
            progress=False)  # fmt: skip
    add_captions(out)
    return out


@pytest.fixture(scope="module")
def wds_text(wds_dir, clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wds-text") / "t"
    assert prepare_main(["--source", "webdataset", "--data-path", str(wds_dir), "--resolution",
                         "16", "--channels", "1", "--num-classes", "10", "--text-encoder",
                         str(clip), "--text-max-length", str(L), "--batch-size", "4", "--out",
                         str(out), "--no-progress"]) == 0  # fmt: skip
    return out


def expected_rows(packer, folder: Path, batch: int) -> dict[str, np.ndarray]:
    """Each sample's row, encoded in the batches prepare forms (``batch`` consecutive samples
    of one shard), packed and rounded to float16: what the shards must hold exactly."""
    _, cond = packer
    want = {}
    for path in read_manifest(folder).shard_paths():
        samples = list(shard_samples(str(path)))
        for s in range(0, len(samples), batch):
            chunk = samples[s : s + batch]
            caps = [m["txt"].decode() if "txt" in m else "" for _, m in chunk]
            rows = cond.encode(caps).numpy().astype(np.float16)  # pack(encode(caps))
            want.update({k: r for (k, _), r in zip(chunk, rows, strict=True)})
    return want


def test_webdataset_shards_get_the_packed_rows_of_their_captions(wds_text, wds_dir, clip, packer):
    m = read_manifest(wds_text)
    samples = stored(wds_text)
    assert m.num_samples == len(samples) == 19 and len(m.shards) == 3 and m.resolution == 16
    want = expected_rows(packer, wds_text, batch=4)
    enc, cond = packer
    for key, s in samples:
        i = int(key[1:])
        row = npy(s["text.npy"])
        assert row.dtype == np.float16 and row.shape == (F,), key
        assert np.array_equal(row, want[key]), key  # bit for bit, same batch composition
        # alone (another batch composition): float32 results may differ in the last bits, which
        # can move the float16 rounding by at most one unit in its last place
        alone = cond.encode([caption_of(i) or ""]).numpy().astype(np.float16)[0]
        ulp = np.spacing(np.abs(alone.astype(np.float32)).astype(np.float16)).astype(np.float32)
        assert (np.abs(row.astype(np.float32) - alone.astype(np.float32)) <= ulp).all(), key
        assert set(s) == {"png", "cls", "json", "text.npy"} | ({"txt"} if caption_of(i) else set())
        assert int(s["cls"]) == i % 10
    # the row unpacks to the caption's mask: ones for its tokens, then zeros
    k0, s0 = samples[0]
    mask = cond.unpack(torch.from_numpy(npy(s0["text.npy"])).float()[None]).mask[0]
    n_tokens = int(enc.tokens([caption_of(int(k0[1:])) or ""]).mask.sum())
    assert mask.tolist() == [True] * n_tokens + [False] * (L - n_tokens)
    t = m.text
    caps = [caption_of(i) or "" for i in range(19)]
    assert t["encoder"] == {"kind": "frozen", "path": str(clip.resolve()), "hash": folder_hash(clip),
                            "architecture": "CLIPTextModel", "dtype": "float32"}  # fmt: skip
    assert (t["max_length"], t["token_dim"], t["pooled_dim"], t["width"]) == (L, D, P, F)
    assert t["caption_key"] == "txt" and t["member"] == "text.npy" and t["dtype"] == "float16"
    assert t["uncaptioned"] == sum(caption_of(i) is None for i in range(19)) == 4
    assert t["captions"] == 15
    assert t["truncated"] == len(enc.tokens(caps).truncated) > 0
    assert m.source["kind"] == "webdataset" and not list(wds_text.glob(".*"))


def test_truncated_captions_are_warned_about_naming_text_max_length(wds_dir, clip, tmp_path, caplog, capsys):  # fmt: skip
    out = tmp_path / "t"
    with caplog.at_level(logging.WARNING, logger="fmgen.data"):
        assert prepare_main(["--source", "webdataset", "--data-path", str(wds_dir), "--resolution",
                             "16", "--channels", "1", "--num-classes", "10", "--text-encoder",
                             str(clip), "--text-max-length", str(L), "--out", str(out),
                             "--no-progress"]) == 0  # fmt: skip
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "truncated" in text and f"text.max_length={L}" in text, text
    assert "4 of 19 sample(s) have no .txt member" in text, text
    printed = capsys.readouterr().out
    assert "text: 15 caption(s) (.txt)" in printed and f"width {F}" in printed, printed


def test_fmgen_pixel_and_latent_shards_keep_every_member_and_get_the_same_rows(
    pixels, clip, packer, vae, tmp_path
):
    from fmgen.data.latents import prepare_latents

    out = tmp_path / "px-text"
    m = te.prepare_text("shards", out, text_encoder=clip, max_length=L, data_path=str(pixels),
                        batch_size=3, progress=False)  # fmt: skip
    before, after = dict(stored(pixels)), dict(stored(out))
    assert list(after) == list(before) and len(after) == 18
    want = expected_rows(packer, pixels, batch=3)
    for key, s in after.items():
        assert {k: v for k, v in s.items() if k != "text.npy"} == before[key]  # kept as they are
        assert np.array_equal(npy(s["text.npy"]), want[key]), key
    src = read_manifest(pixels)
    assert (m.class_names, m.class_counts, m.resolution, m.split) == (
        src.class_names, src.class_counts, src.resolution, src.split)  # fmt: skip
    assert m.source["kind"] == "shards" and m.source["of"]["kind"] == "digits" and m.latent is None
    # latent shards keep the captions now, and the text stage keeps their latents
    lat = prepare_latents("shards", tmp_path / "lat", autoencoder=vae, data_path=str(pixels),
                          batch_size=3, progress=False)  # fmt: skip
    assert all("txt" in s for _, s in stored(tmp_path / "lat") if caption_of(int(_)))
    m2 = te.prepare_text("shards", tmp_path / "lat-text", text_encoder=clip, max_length=L,
                         data_path=str(tmp_path / "lat"), batch_size=3, progress=False)  # fmt: skip
    assert m2.latent == lat.latent and m2.text == m.text
    for (key, s), (_, t) in zip(
        stored(tmp_path / "lat"), stored(tmp_path / "lat-text"), strict=True
    ):
        assert {k: v for k, v in t.items() if k != "text.npy"} == s
        assert t["text.npy"] == after[key]["text.npy"]  # the rows depend on the captions alone
    # both stages in one command: the same shards, no work folder left
    both = tmp_path / "both"
    assert prepare_main(["--source", "shards", "--data-path", str(pixels), "--autoencoder",
                         str(vae), "--text-encoder", str(clip), "--text-max-length", str(L),
                         "--batch-size", "3", "--out", str(both), "--no-progress"]) == 0  # fmt: skip
    assert {k: v for k, v in files(both).items() if k != "manifest.json"} == {
        k: v for k, v in files(tmp_path / "lat-text").items() if k != "manifest.json"}  # fmt: skip
    m3 = read_manifest(both)
    assert m3.text == m.text and m3.latent["autoencoder"]["hash"] == vae_hash(vae)
    assert m3.latent["mean"] == lat.latent["mean"] and m3.source == lat.source
    assert not list(both.glob(".*"))


def test_digits_captioned_by_templates_encode_from_the_digits_source(clip, packer, tmp_path):
    out = tmp_path / "d"
    assert prepare_main(["--source", "digits", "--resolution", "8", "--holdout-fraction", "0.99",
                         "--caption-templates", "digits", "--text-encoder", str(clip),
                         "--text-max-length", str(L), "--batch-size", "8", "--out", str(out),
                         "--no-progress"]) == 0  # fmt: skip
    m = read_manifest(out)
    assert m.source["kind"] == "digits" and m.text["uncaptioned"] == 0 and m.num_samples == 18
    want = expected_rows(packer, out, batch=8)
    assert all(np.array_equal(npy(s["text.npy"]), want[k]) for k, s in stored(out))
    assert not list(out.glob(".*"))


def test_loader_yields_the_rows_after_the_captions_and_resumes_exactly(wds_text, vae, tmp_path):
    by_key = dict(stored(wds_text))
    loader = ShardLoader(wds_text, 5, rank=0, world_size=1, resampled=False, shuffle_buffer=0,
                         return_keys=True, caption_key="txt", text=True)  # fmt: skip
    assert loader.text_info == read_manifest(wds_text).text
    seen = 0
    for x, _, keys, captions, rows in loader:
        assert x.shape == (len(keys), 1, 16, 16) and rows.shape == (len(keys), F)
        assert rows.dtype == torch.float32
        for key, caption, row in zip(keys, captions, rows, strict=True):
            s = by_key[key]
            assert caption == (s["txt"].decode() if "txt" in s else "")
            assert torch.equal(row, torch.from_numpy(npy(s["text.npy"])).float())
            seen += 1
    assert seen == 19
    # without text=True: no rows, the layout as before
    assert len(next(iter(ShardLoader(wds_text, 5, rank=0, world_size=1, caption_key="txt")))) == 3

    def stream(state=None):
        ld = ShardLoader(wds_text, 4, rank=0, world_size=1, seed=3, shuffle_buffer=8, hflip=True,
                         text=True)  # fmt: skip
        if state is not None:
            ld.load_state_dict(state)
        return ld, iter(ld)

    ld, it = stream()
    for _ in range(5):
        next(it)
    state = ld.state_dict()
    rest = [next(it) for _ in range(7)]
    _, again = stream(state)
    for a, b in zip(rest, (next(again) for _ in range(7)), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_the_training_feeds_yield_rows_matching_their_captions(wds_text):
    from conftest import DIGITS

    from fmgen.config import load_config
    from fmgen.data import open_train_data

    pairs = {(s.get("txt", b"").decode(), s["text.npy"]) for _, s in stored(wds_text)}
    for in_memory in ("false", "true"):
        cfg = load_config(DIGITS, [f"data.path={wds_text}", "data.source=shards",
                                   "data.resolution=16", "data.caption_key=txt",
                                   f"data.in_memory={in_memory}", "data.shuffle_buffer=4"]).data  # fmt: skip
        feed = open_train_data(cfg, batch_size=6, rank=0, world_size=1, seed=0, main=True,
                               barrier=lambda: None, text=True)  # fmt: skip
        assert feed.text_info == read_manifest(wds_text).text, in_memory
        it = iter(feed)
        for _ in range(4):
            x, y, captions, rows = next(it)
            assert rows.shape == (6, F) and len(captions) == 6
            for c, r in zip(captions, rows, strict=True):
                assert (c, te.npy_bytes(r.numpy().astype(np.float16))) in pairs, in_memory


def test_shards_without_text_or_with_damaged_rows(pixels, wds_text, tmp_path):
    with pytest.raises(DataError, match=r"holds no text embeddings.*--text-encoder PATH.*text\.precomputed=false"):  # fmt: skip
        ShardLoader(pixels, 4, rank=0, world_size=1, text=True)
    d = Decoding(16, 1, 10, text=F)
    row = np.zeros(F, np.float16)
    assert np.array_equal(decode_text({"text.npy": te.npy_bytes(row)}, d), row)
    for members, kind in (({}, "no-text"),
                          ({"text.npy": te.npy_bytes(np.zeros(F, np.float32))}, "text-shape"),
                          ({"text.npy": te.npy_bytes(np.zeros(F - 1, np.float16))}, "text-shape"),
                          ({"text.npy": b"not a npy"}, "undecodable")):  # fmt: skip
        with pytest.raises(Unusable) as e:
            decode_text(members, d)
        assert e.value.kind == kind
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(Unusable) as e:  # never unpickled
        decode_text({"text.npy": obj.getvalue()}, d)
    assert e.value.kind == "undecodable"
    assert "--text-encoder" in hint("no-text", d) and str(F) in hint("text-shape", d)
    # a damaged row is skipped (counted), the others stream
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, data in files(wds_text).items():
        (bad / name).write_bytes(data)
    import webdataset as wds

    first = read_manifest(bad).shard_paths()[0]
    samples = list(shard_samples(str(first)))
    with open(first, "wb") as f, wds.TarWriter(f, mtime=0) as w:
        for j, (key, members) in enumerate(samples):
            if j == 2:
                members = {**members, "text.npy": te.npy_bytes(np.zeros(3, np.float16))}
            w.write({"__key__": key, **members})
    loader = ShardLoader(bad, 5, rank=0, world_size=1, resampled=False, shuffle_buffer=0, text=True)
    assert sum(len(b[0]) for b in loader) == 18 and loader.skipped == 1


def test_check_text_embeddings_names_both_encoders_and_the_fix(wds_text, clip, tmp_path):
    info = read_manifest(wds_text).text
    record = dict(info["encoder"])
    te.check_text_embeddings(info, record, L, str(wds_text))  # the same: no error
    other = {**record, "path": "/models/t5-xxl", "hash": "f" * 64}
    with pytest.raises(DataError) as e:
        te.check_text_embeddings(info, other, L, str(wds_text))
    msg = str(e.value)
    assert "\n" not in msg and record["hash"][:12] in msg and "f" * 12 in msg
    assert record["path"] in msg and "/models/t5-xxl" in msg and str(wds_text) in msg
    assert "--text-encoder /models/t5-xxl" in msg and "text.precomputed=false" in msg
    with pytest.raises(DataError, match=rf"text.max_length={L}.*text.max_length=16"):
        te.check_text_embeddings(info, record, 16, str(wds_text))
    with pytest.raises(DataError) as e:
        te.check_text_embeddings(None, record, L, "data/x")
    assert "\n" not in str(e.value) and "--text-encoder PATH" in str(e.value)
    assert "text.precomputed=false" in str(e.value)


def test_embedding_resumes_and_a_process_split_writes_the_same_shards(wds_dir, clip, tmp_path, monkeypatch):  # fmt: skip
    from test_latent import in_ranks

    common = dict(text_encoder=te.CaptionEncoder(clip, caption_key="txt", max_length=L),
                  data_path=str(wds_dir), resolution=16, channels=1, num_classes=10,
                  batch_size=4, progress=False)  # fmt: skip
    whole = tmp_path / "whole"
    te.prepare_text("webdataset", whole, **common)
    calls: list[int] = []
    real_embed, real_finish = te.embed_shard, te.finish

    def counting(inputs, i, *args, **kw):
        calls.append(i)
        return real_embed(inputs, i, *args, **kw)

    def killed(*args, **kw):
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(te, "embed_shard", counting)
    monkeypatch.setattr(te, "finish", killed)
    split = tmp_path / "split"  # two processes (threads agreeing like the all-reduce)
    errors = in_ranks(2, lambda rank, agree: te.prepare_text(
        "webdataset", split, rank=rank, world_size=2, any_failed=agree, **common))  # fmt: skip
    assert "killed" in str(errors[0]) and "another process failed" in str(errors[1])
    assert sorted(calls) == [0, 1, 2] and not (split / "manifest.json").exists()
    (split / ".train-000001.tar.text").unlink()  # one finished shard lost: only it is redone
    monkeypatch.setattr(te, "finish", real_finish)
    calls.clear()
    m = te.prepare_text("webdataset", split, **common)
    assert calls == [1] and m.num_samples == 19
    assert files(split) == files(whole)  # the manifest too: the same input and encoder


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_shards_as_one(wds_dir, clip, tmp_path):
    from conftest import ROOT, free_port, subprocess_env

    def run(out: Path, procs: int) -> subprocess.CompletedProcess:
        argv = ["-m", "fmgen.data", "prepare", "--source", "webdataset", "--data-path",
                str(wds_dir), "--resolution", "16", "--channels", "1", "--num-classes", "10",
                "--text-encoder", str(clip), "--text-max-length", str(L), "--batch-size", "4",
                "--out", str(out), "--no-progress"]  # fmt: skip
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                  "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
        return subprocess.run(launch + argv, cwd=ROOT, env=subprocess_env(), capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert "process 0 of 2 embeds the captions of 2 of the 3 shards" in two.stderr
    assert two.stdout.count("wrote 19 samples") == 1  # the main process reports
    assert files(tmp_path / "one") == files(tmp_path / "two")  # manifest included


def test_bad_inputs_are_one_line_errors(clip, pixels, wds_dir, tmp_path, capsys):
    from foreign import write_wds_jpegs

    nocap = tmp_path / "nocap"
    write_wds_jpegs(nocap, n=20, per_shard=10)
    empty = tmp_path / "no-config"
    empty.mkdir()
    digits8 = tmp_path / "digits8"
    prepare("digits", digits8, resolution=8, holdout_fraction=0.99, progress=False)
    out = tmp_path / "out"
    wds_args = ["--source", "webdataset", "--data-path", str(wds_dir), "--resolution", "16",
                "--channels", "1", "--num-classes", "10"]  # fmt: skip
    for argv, needles in (
        ([*wds_args, "--text-encoder", str(tmp_path / "missing")], ["--text-encoder", "no such folder"]),
        ([*wds_args, "--text-encoder", str(empty)], ["--text-encoder", "config.json"]),
        (["--source", "webdataset", "--data-path", str(nocap), "--resolution", "16", "--channels",
          "1", "--num-classes", "10", "--text-encoder", str(clip)], ["--caption-key txt", "jpg"]),
        (["--source", "shards", "--data-path", str(digits8), "--text-encoder", str(clip)],
         ["--caption-key txt"]),
        ([*wds_args, "--caption-key", "caption", "--text-encoder", str(clip)], ["--caption-key caption"]),
        (["--source", "digits", "--text-encoder", str(clip)], ["--caption-key txt"]),
        (["--source", "shards", "--text-encoder", str(clip)], ["--data-path"]),
        (["--source", "webdataset", "--data-path", str(wds_dir), "--text-encoder", str(clip)],
         ["--resolution and --channels"]),
        ([*wds_args, "--text-encoder", str(clip), "--text-max-length", "2"], ["--text-max-length"]),
    ):  # fmt: skip
        assert prepare_main([*argv, "--out", str(out), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert all(n in err for n in needles), (needles, err)
        assert not (out / "manifest.json").exists() and not (out / ".pixels").exists()
    assert prepare_main(["--source", "shards", "--data-path", str(pixels), "--out", str(out)]) == 2
    assert "--text-encoder PATH" in capsys.readouterr().err
