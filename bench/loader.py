"""Throughput of ShardLoader against a bare tarfile + PIL loop, and against WebDataset's own
pipeline, over the same shards; and of the same shards served over http://127.0.0.1.

    python bench/loader.py                    # 4096 32x32 RGB PNGs, ~3 minutes on 2 cores
    python bench/loader.py --samples 20000 --workers 0,1,2,4 --seconds 10

The shards are scikit-learn digits upscaled to the resolution, tinted and noised (so the PNGs
are about as large as CIFAR-10's). Both sides decode PNG with PIL, scale to [-1, 1] float32
and batch to (B, C, H, W); the loader also shuffles (buffer 1000) and tracks its position.
Rates are images/s after the first batches (start-up excluded), the best of --repeats
interleaved runs (the machine may be shared). A second bare loop uses the loader's own tar
reader, to separate the loader's overhead from its faster tar parsing. Targets: loader with 1 worker
>= 0.9 x the bare single-process loop; near-linear scaling from 1 to 2 workers (where the
machine has the cores: the main process needs some CPU too).

WebDataset's pipeline is the one its documentation shows for training: ``WebDataset(urls,
resampled=True).shuffle(1000).decode("rgb8").to_tuple("png", "cls").batched(B)`` in a
``WebLoader`` with the same workers, scaled to [-1, 1] float32 (B, C, H, W) like fmgen's. Target:
fmgen / WebDataset >= 2 with 1 worker. The URL rows read the shards through a local HTTP server
(``data.source=webdataset``, curl through ``webdataset.gopen``) against the same loader on the
local files; target: URL / local >= 0.8 with 1 worker.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import io
import os
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmgen.data import Example, ShardLoader, digits_images, write_shards  # noqa: E402
from fmgen.data.stream import tar_members  # noqa: E402


def make_shards(out: Path, n: int, resolution: int, per_shard: int) -> Path:
    digits, labels = digits_images(resolution=resolution, channels=1)  # (1797, R, R) uint8
    rng = np.random.default_rng(0)

    def examples():
        for i in range(n):
            j = i % len(digits)
            tint = rng.uniform(0.3, 1.0, 3)
            rgb = digits[j][..., None] * tint + rng.normal(0, 8, (resolution, resolution, 3)) + 20
            yield Example(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), int(labels[j]), i)

    write_shards(
        examples(),
        out,
        class_names=[str(k) for k in range(10)],
        resolution=resolution,
        channels=3,
        samples_per_shard=per_shard,
        source={"kind": "bench"},
    )
    return out


def tarfile_members(path: Path):
    with tarfile.open(path, mode="r|") as tar:
        for info in tar:
            yield info.name, tar.extractfile(info).read()


def fmgen_members(path: Path):
    with open(path, "rb", buffering=1 << 20) as f:
        yield from tar_members(f)


def bare_batches(paths: list[Path], batch_size: int, members=tarfile_members):
    """The reference: read tars in order, decode with PIL, batch, scale; forever."""
    while True:
        for path in paths:
            imgs: list[np.ndarray] = []
            labels: list[int] = []
            for name, data in members(path):
                if name.endswith(".png"):
                    with Image.open(io.BytesIO(data)) as im:
                        imgs.append(np.asarray(im if im.mode == "RGB" else im.convert("RGB")))
                elif name.endswith(".cls"):
                    labels.append(int(data))
                if len(imgs) == batch_size and len(labels) == batch_size:
                    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)  # (B, C, H, W)
                    yield x.float().div_(127.5).sub_(1.0).contiguous(), torch.tensor(labels)
                    imgs, labels = [], []


def _wds_collate(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2)
    return images.float().div_(127.5).sub_(1.0).contiguous(), torch.tensor([s[1] for s in samples])


def wds_batches(paths: list[Path], batch_size: int, workers: int):
    """WebDataset's own training pipeline over the same shards (see the module docstring)."""
    import webdataset as wds

    ds = (
        wds.WebDataset([str(p) for p in paths], resampled=True, shardshuffle=False)
        .shuffle(1000)
        .decode("rgb8")
        .to_tuple("png", "cls")
        .batched(batch_size, collation_fn=_wds_collate)
    )
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


@contextlib.contextmanager
def serve(folder: Path):
    """The folder over http://127.0.0.1:PORT (a free port), for the life of the block."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@dataclass
class Rate:
    images_per_s: float  # wall clock
    cpu_us_per_image: float  # CPU time of this process and its children (the loader's workers)
    cores: float  # CPU seconds per wall second: how much of the machine the setting got


def _cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def rate(batches, seconds: float, warmup: int = 3) -> Rate:
    """Throughput over ``seconds`` after ``warmup`` batches (worker start-up excluded)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    proc = psutil.Process()
    n, c0, t0 = 0, _cpu_seconds(proc), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, y = next(it)[:2]
        assert x.dtype == torch.float32 and y.shape == (x.shape[0],)
        n += x.shape[0]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(proc) - c0
    del it  # stops the workers
    return Rate(n / wall, cpu / n * 1e6, cpu / wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4096, help="images in the shards (default 4096)")
    p.add_argument("--resolution", type=int, default=32, help="default 32")
    p.add_argument("--samples-per-shard", type=int, default=512, help="default 512")
    p.add_argument("--batch-size", type=int, default=128, help="default 128")
    p.add_argument(
        "--seconds", type=float, default=5.0, help="measuring time per setting (default 5)"
    )
    p.add_argument("--workers", default="0,1,2", help="loader worker counts (default 0,1,2)")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="measure every setting this often, interleaved, and keep the best (default 2)",
    )
    p.add_argument(
        "--data", default=None, help="keep the shards in this folder (default: a temp dir)"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data) if args.data else Path(tmp) / "shards"
        t0 = time.perf_counter()
        make_shards(folder, args.samples, args.resolution, args.samples_per_shard)
        paths = sorted(folder.glob("train-*.tar"))
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"shards: {args.samples} {args.resolution}x{args.resolution} RGB PNGs in {len(paths)} "
            f"tars ({mb:.1f} MiB) written in {time.perf_counter() - t0:.1f} s; "
            f"{os.cpu_count()} CPUs, batch {args.batch_size}"
        )
        settings = {
            "bare tarfile+PIL loop": lambda: bare_batches(paths, args.batch_size),
            "bare loop, fmgen tar reader": lambda: bare_batches(
                paths, args.batch_size, fmgen_members
            ),
        }
        for w in workers:
            settings[f"ShardLoader, {w} workers"] = lambda w=w: ShardLoader(
                folder, args.batch_size, num_workers=w, seed=0, resampled=True
            )
            settings[f"WebDataset, {w} workers"] = lambda w=w: wds_batches(
                paths, args.batch_size, w
            )
        best: dict[str, Rate] = {}
        with serve(folder) as url:
            last = f"{len(paths) - 1:06d}"
            remote = {"local": str(folder / f"train-{{000000..{last}}}.tar"),
                      "URL": f"{url}/train-{{000000..{last}}}.tar"}  # fmt: skip
            for where, source in remote.items():
                settings[f"webdataset source, {where}"] = lambda s=source: ShardLoader(
                    s, args.batch_size, num_workers=1, seed=0, webdataset=True,
                    resolution=args.resolution, channels=3, num_classes=10,
                )  # fmt: skip
            for _ in range(args.repeats):  # interleaved: each setting sees the machine's moods
                for name, make in settings.items():
                    r = rate(make(), args.seconds)
                    if name not in best or r.images_per_s > best[name].images_per_s:
                        best[name] = r
    print(
        f"{'setting (best of ' + str(args.repeats) + ')':32s}  images/s  CPU us/image  cores used"
    )
    for name, r in best.items():
        print(f"{name:32s}  {r.images_per_s:8.0f}  {r.cpu_us_per_image:12.1f}  {r.cores:10.2f}")
    bare, fast = best["bare tarfile+PIL loop"], best["bare loop, fmgen tar reader"]
    loader = {w: best[f"ShardLoader, {w} workers"] for w in workers}
    print("ratios (wall clock images/s; in brackets per CPU: CPU time per image, inverted)")
    for w, r in loader.items():
        wall, cpu = r.images_per_s / bare.images_per_s, bare.cpu_us_per_image / r.cpu_us_per_image
        target = f"  target >= 0.90: {'ok' if wall >= 0.9 else 'MISSED'}" if w == 1 else ""
        print(f"  loader@{w} / bare tarfile loop       : {wall:5.2f} [{cpu:4.2f}]{target}")
        wall, cpu = r.images_per_s / fast.images_per_s, fast.cpu_us_per_image / r.cpu_us_per_image
        print(f"  loader@{w} / bare, same tar reader  : {wall:5.2f} [{cpu:4.2f}]")
    for w, r in loader.items():
        ratio = r.images_per_s / best[f"WebDataset, {w} workers"].images_per_s
        target = f"  target >= 2: {'ok' if ratio >= 2 else 'MISSED'}" if w == 1 else ""
        print(f"  loader@{w} / WebDataset@{w}           : {ratio:5.2f}{target}")
    ratio = best["webdataset source, URL"].images_per_s / best["webdataset source, local"].images_per_s
    print(f"  URL / local files (1 worker)        : {ratio:5.2f}  target >= 0.8: "
          f"{'ok' if ratio >= 0.8 else 'MISSED'}")  # fmt: skip
    if 1 in loader and 2 in loader:
        s = loader[2].images_per_s / loader[1].images_per_s
        print(
            f"  scaling loader@2 / loader@1 workers : {s:5.2f} (linear: 2.00; the machine gave "
            f"{loader[1].cores:.2f} and {loader[2].cores:.2f} cores)"
        )


if __name__ == "__main__":
    main()
