import os

# Nothing in the tests may reach a network: W&B offline, hubs offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist's workers (pyproject's addopts) share the cores: THREADS, each worker's share, is
# set before torch starts its thread pool and inherited by in-process trainings
# (train.cpu_threads=0 keeps OMP_NUM_THREADS). More threads than cores only wait for each other.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (_CORES or 1) // _WORKERS)))
THREADS = int(os.environ.get("OMP_NUM_THREADS") or _CORES or 1)

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
BATCH = 16
# A tiny digits job: 8x8 images, a two-level U-Net, no W&B, no end-of-training report.
TINY = [
    "data.resolution=8",
    "model.unet.block_out_channels=[8,16]",
    "model.unet.layers_per_block=1",
    f"train.batch_size={BATCH}",
    "train.log_every_steps=1",
    "train.checkpoint_every_images=100000",
    "optim.warmup_images=32",
    "logging.wandb=false",
    "eval.report=",
    "sample.sampler=heun",  # the tests count Heun's evaluations (the job samples with dpm++2m)
    "sample.time_grid=uniform",
    "sample.steps=2",
    "sample.per_class=2",
]


def tiny(shards: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """Overrides for a tiny run of ``steps`` optimizer steps in ``run_dir``."""
    return [
        *TINY,
        f"data.path={shards}",
        f"train.run_dir={run_dir}",
        f"train.total_images={steps * BATCH}",
        *extra,
    ]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def run_main(command: str, *args) -> subprocess.CompletedProcess:
    """``fmgen.cli.COMMAND.main(argv)`` (train, sample, evaluate, ...) run in this process,
    reported as ``subprocess.run`` reports the script: exit status, stdout, and stderr with the
    log lines the script would print there.

    A subprocess pays the interpreter's start and the imports (~6 s with diffusers) before any
    work; the suite has dozens of command runs. The scripts themselves (train.py, sample.py,
    ``python -m fmgen.evaluate``, ...) are still run as processes by the tests of their wiring,
    their exit status and what only a process shows (signals, torchrun, the lock of a run).
    """
    import contextlib
    import importlib
    import io
    import logging

    main = importlib.import_module(f"fmgen.cli.{command}").main
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)  # the script's logging.basicConfig writes to stderr
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess([str(a) for a in args], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for one torchrun / accelerate launch: the tests run in
    parallel (pytest-xdist), so no two launches may share a fixed port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    """Under xdist the slow tests start first, the longest (``slow(minutes=N)``) before the others:
    started last, one of them would run on alone while the other workers sit idle at the end.
    The workers take tests in this order (pyproject's addopts: loadgroup, no reordering)."""

    def later(item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -(slow.kwargs.get("minutes", 0) if slow else 0)

    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=later)  # stable: otherwise in collection order


@pytest.fixture(scope="session", autouse=True)
def shared_classifier_cache(tmp_path_factory):
    """One folder of digits classifiers for the session, shared by the xdist workers and every
    training they start (fmgen.eval.digits.classifier_cache): each judge is trained once, not
    once per run (~10 s at 16x16, ~5 s at 8x8; a dozen runs score FID or a digits report).
    Training it is tested where the tests call train_digits_classifier with their own folder."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "digits-classifier"
    os.environ["FMGEN_DIGITS_CLASSIFIER_CACHE"] = str(folder)  # fmgen.eval.digits.SHARED_CACHE_ENV
    yield folder
    os.environ.pop("FMGEN_DIGITS_CLASSIFIER_CACHE", None)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Digits at 8x8 as shards, prepared once for the whole session."""
    from fmgen.data import prepare

    out = tmp_path_factory.mktemp("digits8")
    prepare("digits", out, resolution=8, channels=1)
    return out


def train_tiny(shards: Path, run_dir: Path, steps: int, *extra: str, resume: str | None = None):
    from fmgen.config import load_config
    from fmgen.train import train

    return train(load_config(DIGITS, tiny(shards, run_dir, steps, *extra)), resume=resume)


@pytest.fixture(scope="session")
def tiny_run(shards, tmp_path_factory):
    """A finished tiny run (velocity prediction), shared by the sampling and FID tests."""
    return train_tiny(shards, tmp_path_factory.mktemp("tiny-run"), 3)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensor problems: with several OpenMP threads on a shared CPU, thread
    wake-up costs ~40x the work (8 ms vs 0.2 ms per oracle call measured on 2 busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def export_tiny(run_dir: Path, *extra: str, seed: int = 0, class_names: int = 10) -> Path:
    """An export of a freshly initialised tiny model (no training): RUN_DIR/export.

    A random U-Net is a non-trivial velocity field, which is all the sampling comparisons need;
    ``extra`` are config overrides (path, prediction type, conditioning, backbone).
    """
    import torch

    from fmgen.config import load_config
    from fmgen.models import IdentityAutoencoder, build_conditioning, build_model, export_model

    cfg = load_config(DIGITS, [*TINY, f"train.run_dir={run_dir}", *extra])
    torch.manual_seed(seed)
    model = build_model(cfg, build_conditioning(cfg, class_names))
    out = run_dir / "export"
    export_model(model, cfg, out, autoencoder=IdentityAutoencoder(),
                 class_names=[f"digit {i}" for i in range(class_names)], step=0)  # fmt: skip
    return out


def make_vae(folder: Path, seed: int) -> Path:
    """A tiny AutoencoderKL: 1x16x16 images -> 4x8x8 latents, saved as diffusers saves it."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)  # fmt: skip
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def vae(tmp_path_factory) -> Path:
    """An untrained tiny VAE, shared by the latent tests (test_latent, test_latent_dit)."""
    return make_vae(tmp_path_factory.mktemp("vae") / "vae", seed=0)


@pytest.fixture(scope="session")
def latent_shards(vae, tmp_path_factory) -> Path:
    """The digits at 16x16 as latent shards of ``vae``, encoded once for the session (~15 s)."""
    from fmgen.data.latents import prepare_latents

    out = tmp_path_factory.mktemp("latent") / "digits-16"
    prepare_latents("digits", out, autoencoder=vae, resolution=16, channels=1,
                    samples_per_shard=500, batch_size=100, progress=False)  # fmt: skip
    return out


def tiny_latent(data: Path, vae: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """Overrides for a tiny deterministic latent run of ``steps`` steps on ``data``'s shards."""
    return ["data.source=shards", f"data.path={data}", f"model.autoencoder={vae}",
            "data.resolution=16", "model.unet.block_out_channels=[8,16]", f"train.batch_size={BATCH}",
            f"train.total_images={steps * BATCH}", f"train.run_dir={run_dir}",
            "train.checkpoint_every_images=100000", "optim.warmup_images=32", "logging.wandb=false",
            "eval.report=", "sample.steps=2", "sample.per_class=2", "data.hflip=true",
            "train.deterministic=true", *extra]  # fmt: skip
