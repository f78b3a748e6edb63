"""Shards as other tools write them, and a shard server on 127.0.0.1, for the data tests.

- ``write_wds_jpegs``: ``webdataset.ShardWriter`` shards of JPEGs of varied sizes with ``cls``
  (digits drawn large, so a fitted image is still recognisable);
- ``write_img2dataset``: img2dataset's layout (``00000.tar`` with jpg/txt/json, a parquet and
  ``_stats.json`` beside each), no labels;
- ``gzip_shards``: ``.tar.gz`` copies;
- ``ShardServer``: ``http.server`` over a folder on 127.0.0.1 (a free port), started and
  stopped by the test; it never listens on another address.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
from PIL import Image


def digits_u8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _varied(a: np.ndarray, i: int) -> Image.Image:
    """A digit upscaled to one of a few sizes and aspects (RGB), as a web crawl would hold."""
    w, h = [(24, 24), (32, 20), (20, 36), (40, 40), (17, 23)][i % 5]
    return Image.fromarray(a).resize((w, h), Image.Resampling.BICUBIC).convert("RGB")


def write_wds_jpegs(out: Path, n: int = 300, per_shard: int = 100) -> list[Path]:
    """``train-%06d.tar`` by ``webdataset.ShardWriter``: ``KEY.jpg`` (sizes vary) + ``KEY.cls``."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_u8()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n):
            w.write({"__key__": f"s{i:06d}", "jpg": _jpeg(_varied(images[i], i)),
                     "cls": str(int(labels[i])).encode()})  # fmt: skip
    return sorted(out.glob("train-*.tar"))


def write_img2dataset(out: Path, n: int = 120, per_shard: int = 50) -> list[Path]:
    """img2dataset's output: ``00000.tar`` .. with ``KEY.jpg``/``KEY.txt``/``KEY.json``, a
    ``00000.parquet`` and ``00000_stats.json`` beside each shard; no label member."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    images, _ = digits_u8()
    shards = []
    for s in range(0, n, per_shard):
        name = f"{s // per_shard:05d}"
        with wds.TarWriter(str(out / f"{name}.tar")) as w:
            for i in range(s, min(n, s + per_shard)):
                key = f"{s // per_shard:05d}{i - s:04d}"
                meta = {"url": f"https://example.invalid/{i}.jpg", "key": key, "status": "success"}
                w.write({"__key__": key, "jpg": _jpeg(_varied(images[i], i)),
                         "txt": f"a handwritten digit, sample {i}".encode(),
                         "json": json.dumps(meta).encode()})  # fmt: skip
        (out / f"{name}.parquet").write_bytes(b"PAR1 not read by fmgen PAR1")
        (out / f"{name}_stats.json").write_text(json.dumps({"count": per_shard}))
        shards.append(out / f"{name}.tar")
    return shards


def gzip_shards(shards: list[Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for p in shards:
        target = out / (p.name + ".gz")
        with open(p, "rb") as f, gzip.open(target, "wb") as g:
            shutil.copyfileobj(f, g)
        done.append(target)
    return done


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative names), and the names themselves."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class ShardServer:
    """Serves ``folder`` over http://127.0.0.1:PORT/ in a thread (``with ShardServer(d) as url``)."""

    def __init__(self, folder: Path):
        handler = lambda *a, **k: _QuietHandler(*a, directory=str(folder), **k)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
