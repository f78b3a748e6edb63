"""Training: exact resume, 1 vs 2 ranks, SIGTERM, the non-finite guard, W&B offline, export."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BATCH, DIGITS, ROOT, free_port, tiny
from conftest import subprocess_env as env
from safetensors.torch import load_file

from fmgen.config import load_config


def latest(run_dir: Path) -> Path:
    ck = run_dir / "checkpoints"
    return ck / (ck / "latest").read_text().strip()


def weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The training weights and the EMA weights (in parameter order) of a checkpoint."""
    shadow = load_file(ckpt / "ema.safetensors")
    return load_file(ckpt / "model.safetensors"), [
        shadow[f"shadow_params.{i}"] for i in range(len(shadow))
    ]


def run_train(overrides: list[str], *, resume: str | None = None):
    from fmgen.train import train

    return train(load_config(DIGITS, overrides), resume=resume)


def test_exact_resume_equals_uninterrupted(shards, tmp_path):
    """N steps, stop, resume, N more == 2N uninterrupted: weights and EMA torch.equal."""
    n = 3
    full = run_train(tiny(shards, tmp_path / "full", 2 * n, "train.deterministic=true"))
    half = tmp_path / "half"
    first = run_train(tiny(shards, half, n, "train.deterministic=true"))
    assert first.step == n
    w_mid, _ = weights(first.checkpoint)  # read now: a later save may prune this checkpoint
    second = run_train(tiny(shards, half, 2 * n, "train.deterministic=true"), resume="auto")
    assert second.step == 2 * n
    (w_full, e_full), (w_res, e_res) = weights(latest(full.run_dir)), weights(latest(half))
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    for a, b in zip(e_full, e_res, strict=True):
        assert torch.equal(a, b)
    # the run really moved: the weights differ from the half-way checkpoint's
    assert any(not torch.equal(w_mid[k], w_res[k]) for k in w_mid)


def test_run_writes_checkpoint_export_grid_and_loads(shards, tmp_path):
    res = run_train(tiny(shards, tmp_path / "run", 2))
    assert (res.checkpoint / "fmgen_state.json").is_file()
    state = json.loads((res.checkpoint / "fmgen_state.json").read_text())
    assert state["step"] == 2 and state["images"] == 2 * BATCH
    assert res.wall_s > 0 and math.isfinite(res.images_per_s)  # the line train.py ends with
    assert re.fullmatch(r"done: 2 steps, 32 images in [0-9.]+ s wall; steady [0-9.]+ images/s", res.summary())  # fmt: skip
    assert (res.export_dir / "backbone" / "config.json").is_file()
    meta = json.loads((res.export_dir / "fmgen.json").read_text())
    assert meta["backbone"] == {
        "type": "unet",
        "class": "diffusers.models.unets.unet_2d.UNet2DModel",
    }
    assert meta["conditioning"] == {"kind": "class-labels", "num_classes": 10, "p_drop": 0.1}
    assert meta["autoencoder"]["kind"] == "identity" and meta["sample_shape"] == [1, 8, 8]
    assert res.grid.is_file()
    from fmgen.models import load_model

    exported = load_model(res.export_dir)
    from_ckpt = load_model(res.checkpoint, weights="ema")
    for a, b in zip(exported.model.parameters(), from_ckpt.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the export holds the EMA weights of the last checkpoint
    raw = load_model(res.checkpoint, weights="raw")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(raw.model.parameters(), from_ckpt.model.parameters(), strict=True)
    )


def test_batch_must_divide_and_resume_mismatch_is_clear(shards, tmp_path):
    from fmgen.config import ConfigError
    from fmgen.models import CheckpointError

    with pytest.raises(ConfigError, match="train.batch_size"):
        run_train(tiny(shards, tmp_path / "a", 1, "train.batch_size=15", "train.grad_accum=2"))
    run_train(tiny(shards, tmp_path / "b", 1))
    with pytest.raises(CheckpointError, match="model settings differ"):
        run_train(
            tiny(shards, tmp_path / "b", 2, "model.unet.block_out_channels=[16,16]"), resume="auto"
        )


def test_nonfinite_losses_are_skipped_and_counted(shards, tmp_path, monkeypatch):
    import fmgen.train.loop as tr

    real = tr.get_loss("cfm")
    calls = {"n": 0}

    def flaky(net, z, path, **kw):
        calls["n"] += 1
        out = real(net, z, path, **kw)
        return out * float("nan") if calls["n"] in (2, 3) else out

    monkeypatch.setattr(tr, "get_loss", lambda name: flaky)
    res = run_train(tiny(shards, tmp_path / "nan", 5))
    state = json.loads((res.checkpoint / "fmgen_state.json").read_text())
    assert state["step"] == 5 and state["nonfinite_total"] == 2 and state["nonfinite_streak"] == 0
    _, ema = weights(res.checkpoint)
    assert all(torch.isfinite(p).all() for p in ema)


def test_nonfinite_streak_stops_with_clear_message(shards, tmp_path, monkeypatch):
    import fmgen.train.loop as tr

    real = tr.get_loss("cfm")
    monkeypatch.setattr(  # inf gradients follow from an inf loss: the finite check reads their norm
        tr,
        "get_loss",
        lambda name: lambda net, z, path, **kw: real(net, z, path, **kw) * float("inf"),
    )
    with pytest.raises(
        tr.TrainingError, match=r"3 steps in a row with a non-finite loss or gradient"
    ):
        run_train(tiny(shards, tmp_path / "inf", 10, "train.max_nonfinite_steps=3"))


def logged_history(run_file: Path, key: str) -> list[float]:
    """Values of one scalar in an offline W&B run file (.wandb, protobuf records).

    A history item is the key (field 2, a string) followed by its JSON value (field 16). This
    reads them without W&B's internal reader, which moved between versions.
    """
    data = run_file.read_bytes()
    k = key.encode()
    pattern = re.compile(b"\\x12" + re.escape(bytes([len(k)]) + k) + b"\\x82\\x01(.)", re.DOTALL)
    values = []
    for m in pattern.finditer(data):
        n = m.group(1)[0]
        values.append(float(data[m.end() : m.end() + n]))
    return values


def test_wandb_offline_logs_scalars_and_grids_and_resumes_same_run(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "wb"
    extra = ["logging.wandb=true", "logging.mode=offline", f"train.sample_every_images={2 * BATCH}"]
    run_train(tiny(shards, run, 3, *extra))
    run_train(tiny(shards, run, 5, *extra), resume="auto")
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {p.name.rsplit("-", 1)[-1] for p in runs}
    assert len(ids) == 1, f"resume started a new W&B run: {ids}"
    saved_id = json.loads((latest(run) / "fmgen_state.json").read_text())["wandb_run_id"]
    assert ids == {saved_id}
    files = [next(r.glob("run-*.wandb")) for r in runs]
    images = [
        sorted(set(logged_history(f, "train/images"))) for f in files
    ]  # history + summary copies
    assert images == [
        [16.0, 32.0, 48.0],
        [64.0, 80.0],
    ]  # every step logged, resumed where it stopped
    losses = set(logged_history(files[0], "train/loss")) | set(
        logged_history(files[1], "train/loss")
    )
    assert len(losses) == 5 and all(math.isfinite(v) and v > 0 for v in losses)
    grids = [list(r.glob("files/media/images/samples/*.png")) for r in runs]
    assert all(grids), f"no image grid logged in some run: {grids}"


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_auto_finishes(shards, tmp_path):
    """SIGTERM mid-run: a checkpoint is written and --resume auto continues to the exact end."""
    run = tmp_path / "sig"
    total = 400
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(DIGITS),
        *tiny(shards, run, total),
        "--resume",
        "auto",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if "step 5/" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(seen[-20:])
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    stopped = json.loads((latest(run) / "fmgen_state.json").read_text())["step"]
    assert 5 <= stopped < total
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout + done.stderr
    assert json.loads((latest(run) / "fmgen_state.json").read_text())["step"] == total


REPA_MODULE = """
import torch

def make():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
"""


def assert_ranks_agree(one: Path, two: Path) -> float:
    """The latest weights and EMA of a 1-rank and a 2-rank run agree; returns the tolerance.

    The all-reduce sums fp32 gradients in another order and Adam's normalisation amplifies that
    to ~2e-5 after 4 steps; 1e-4 is 5% of one Adam update at lr 2e-3. A run that sees other
    samples or other noise differs by ~5e-3 (seen when each rank held half the data), 50x the
    tolerance."""
    (w1, e1), (w2, e2) = weights(latest(one)), weights(latest(two))
    tol = 1e-4
    moved = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved < tol, f"1 vs 2 ranks differ by {moved:.2e}"
    for a, b in zip(e1, e2, strict=True):
        assert (a - b).abs().max().item() < tol
    return tol


@pytest.mark.slow
def test_two_ranks_match_one_rank(shards, tmp_path):
    """2 gloo ranks == 1 rank with the same global batch and samples; only rank 0 writes. The
    run has the recipe's training heads (EDM2's uncertainty, REPA with a module network): they
    are DDP-wrapped and all-reduced like the model."""
    feat = tmp_path / "feat.py"
    feat.write_text(REPA_MODULE)
    # optim.eps=1e-4: Adam's g / sqrt(v) turns parameters whose true gradient is ~0 into +-lr
    # steps whose sign is set by fp32 summation order (which differs between 1 and 2 ranks);
    # a larger eps damps those and leaves real gradients (|g| >> 1e-4) unchanged.
    common = [
        *tiny(shards, tmp_path / "x", 4),
        "data.in_memory=true",
        "logging.wandb=true",
        "logging.mode=offline",
        "optim.eps=1e-4",
        "ema.posthoc_sigma_rels=[0.05,0.1]",
        f"ema.posthoc_every_images={2 * BATCH}",
        "loss.uncertainty=true",
        f"repa.feature_network=module:{feat}:make",
        "repa.hidden=8",
    ]
    one = [*common, f"train.run_dir={tmp_path / 'one'}"]
    two = [*common, f"train.run_dir={tmp_path / 'two'}"]
    r1 = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(DIGITS), *one],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r1.returncode == 0, r1.stdout + r1.stderr
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    r2 = subprocess.run([*torchrun, str(ROOT / "train.py"), "--config", str(DIGITS), *two],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "global batch 16 = 2 processes x 8 per process" in r2.stdout + r2.stderr
    tol = assert_ranks_agree(tmp_path / "one", tmp_path / "two")
    h1, h2 = (load_file(latest(tmp_path / r) / "heads.safetensors") for r in ("one", "two"))
    assert h1.keys() == h2.keys() and {"logvar.linear.weight", "repa.mlp.0.weight"} <= h1.keys()
    assert max((h1[k] - h2[k]).abs().max().item() for k in h1) < tol
    assert h1["logvar.linear.weight"].abs().sum() > 0  # the heads trained (they start at zero)
    # post-hoc EMA: the main process alone tracks and writes; the same snapshots as one rank
    snaps = [sorted((tmp_path / r / "posthoc").iterdir()) for r in ("one", "two")]
    assert [p.name for p in snaps[1]] == [p.name for p in snaps[0]] == [
        "images_000000000032.safetensors", "images_000000000064.safetensors"]  # fmt: skip
    for p1, p2 in zip(*snaps, strict=True):
        s1, s2 = load_file(p1), load_file(p2)
        assert s1.keys() == s2.keys() and max((s1[k] - s2[k]).abs().max().item() for k in s1) < tol
    # only rank 0 wrote: one W&B run, one grid per cadence, checkpoint files once
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["final.png"]
    ck = latest(tmp_path / "two")
    for rank in (0, 1):  # every rank wrote its own RNG states and data position
        assert (ck / f"fmgen_rank_{rank}.json").is_file()
        assert (ck / f"fmgen_rank_{rank}.safetensors").is_file()
    assert len(list(ck.glob("model*.safetensors"))) == 1
    manifest = json.loads((ck / "fmgen_manifest.json").read_text())["files"]
    assert {"fmgen_rank_0.json", "fmgen_rank_1.json", "model.safetensors"} <= manifest.keys()
    # each rank saved its own RNG (seeded with seed + rank), not a copy of rank 0's
    cpu = [load_file(ck / f"fmgen_rank_{r}.safetensors")["torch_cpu"] for r in (0, 1)]
    assert not torch.equal(cpu[0], cpu[1])
