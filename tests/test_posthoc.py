"""Post-hoc EMA in training: exact resume of the profiles, snapshots counted in images and
never pruned, superseded futures, and the reconstruction exported like export/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import BATCH, train_tiny
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import latest

from fmgen.base import FmgenError
from fmgen.cli.ema import main as ema_main
from fmgen.models import CheckpointError, load_model
from fmgen.models.posthoc import reconstruct_ema

DET = "train.deterministic=true"
TRACK = "ema.posthoc_sigma_rels=[0.05,0.1]"


def every(images: int) -> str:
    return f"ema.posthoc_every_images={images}"


def snapshots(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((run / "posthoc").glob("images_*.safetensors"))}


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_profiles_resume_exactly_like_an_uninterrupted_run(shards, tmp_path):
    """3 steps, stop, resume to 6 == 6 uninterrupted: profiles in the checkpoint and every
    snapshot torch.equal (the profiles' state lives in the checkpoint, safetensors)."""
    common = (DET, TRACK, every(2 * BATCH))
    full = train_tiny(shards, tmp_path / "full", 6, *common)
    half = tmp_path / "half"
    first = train_tiny(shards, half, 3, *common)
    assert (first.checkpoint / "posthoc_ema.safetensors").is_file()
    extra = json.loads((first.checkpoint / "fmgen_extra.json").read_text())
    assert extra["posthoc"]["sigma_rels"] == [0.05, 0.1]
    train_tiny(shards, half, 6, *common, resume="auto")
    a = load_file(latest(full.run_dir) / "posthoc_ema.safetensors")
    b = load_file(latest(half) / "posthoc_ema.safetensors")
    assert len(a) == 2 * len(load_file(latest(half) / "model.safetensors")) and same(a, b)
    s_full, s_half = snapshots(full.run_dir), snapshots(half)
    assert sorted(s_full) == [f"images_{i:012d}.safetensors" for i in (32, 64, 96)]
    # the first run's last step (48 images) left one more, a true point of the same trajectory
    assert sorted(s_half) == sorted([*s_full, "images_000000000048.safetensors"])
    for name in s_full:
        assert same(s_full[name], s_half[name]), name
    # the two profiles differ from each other and from the training weights
    final = s_full["images_000000000096.safetensors"]
    weights = load_file(latest(full.run_dir) / "model.safetensors")
    name = next(iter(weights))
    assert not torch.equal(final[f"p0.{name}"], final[f"p1.{name}"])
    assert not torch.equal(final[f"p0.{name}"], weights[name])


@pytest.fixture(scope="module")
def tracked(shards, tmp_path_factory):
    """5 steps of 16 images, a snapshot every 40 images, a checkpoint every step, keep 1."""
    run = tmp_path_factory.mktemp("tracked")
    res = train_tiny(shards, run, 5, TRACK, every(40), f"train.checkpoint_every_images={BATCH}",
                     "train.keep_checkpoints=1")  # fmt: skip
    return run, res


def test_snapshots_count_images_are_atomic_and_outlive_pruning(tracked):
    run, _ = tracked
    # the first step past each multiple of 40 images (48, 80), and the last step (80)
    assert sorted(snapshots(run)) == ["images_000000000048.safetensors", "images_000000000080.safetensors"]  # fmt: skip
    assert sorted(p.name for p in (run / "posthoc").iterdir()) == sorted(
        snapshots(run)
    )  # no work files
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_0000005"]  # pruned
    meta = header(run / "posthoc" / "images_000000000048.safetensors")
    assert (meta["format"], meta["images"], meta["step"]) == ("fmgen-posthoc-1", "48", "3")
    assert [p["sigma_rel"] for p in json.loads(meta["profiles"])] == [0.05, 0.1]
    assert json.loads(meta["config"])["ema"]["posthoc_every_images"] == 40


def test_a_tracked_profile_comes_back_and_exports_like_export(tracked, tmp_path, capsys):
    run, res = tracked
    snap = load_file(run / "posthoc" / "images_000000000080.safetensors")
    rec = reconstruct_ema(run, 0.1)
    assert rec.images == 80 and rec.step == 5 and rec.profile_error < 1e-6
    for name, p in rec.model.named_parameters():
        want = snap[f"p1.{name}"]
        assert (p.detach() - want).abs().max() <= 1e-6 * want.abs().max(), name
    other = reconstruct_ema(run, 0.07)  # untracked: between the two profiles, not equal to them
    name, p = next(iter(other.model.named_parameters()))
    assert not torch.allclose(p.detach(), snap[f"p0.{name}"]) and not torch.allclose(p.detach(), snap[f"p1.{name}"])  # fmt: skip
    with pytest.raises(FmgenError, match="images 96"):
        reconstruct_ema(run, 0.1, images=96)

    out = tmp_path / "ema-0.1"
    assert ema_main(["--run", str(run), "--sigma-rel", "0.1", "--out", str(out)]) == 0
    assert "sigma_rel 0.1 (gamma 6.937) after 80 images from 2 snapshots" in capsys.readouterr().out
    loaded = load_model(out)  # what sample.py and fmgen.evaluate load
    for (name, a), b in zip(rec.model.named_parameters(), loaded.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    meta = json.loads((out / "fmgen.json").read_text())
    assert meta["provenance"]["sigma_rel"] == 0.1 and len(meta["provenance"]["snapshots"]) == 4
    assert (
        loaded.step == 5
        and loaded.class_names
        == json.loads((res.export_dir / "fmgen.json").read_text())["class_names"]
    )
    # an earlier point of training, and a second export over the first
    assert (
        ema_main(["--run", str(run), "--sigma-rel", "0.05", "--out", str(out), "--images", "48"])
        == 0
    )
    assert json.loads((out / "fmgen.json").read_text())["provenance"]["images"] == 48


def test_resume_needs_the_same_profiles(shards, tmp_path):
    run = tmp_path / "run"
    train_tiny(shards, run, 2, TRACK)
    with pytest.raises(CheckpointError, match=r"ema.posthoc_sigma_rels is \[0.05\], the checkpoint tracked \[0.05, 0.1\]"):  # fmt: skip
        train_tiny(shards, run, 3, "ema.posthoc_sigma_rels=[0.05]", resume="auto")
    plain = tmp_path / "plain"
    train_tiny(shards, plain, 2)
    with pytest.raises(CheckpointError, match="tracked none"):
        train_tiny(shards, plain, 3, TRACK, resume="auto")


def test_a_resume_from_an_older_checkpoint_supersedes_later_snapshots(shards, tmp_path):
    run = tmp_path / "run"
    common = (DET, TRACK, every(BATCH), f"train.checkpoint_every_images={BATCH}", "train.keep_checkpoints=4")  # fmt: skip
    train_tiny(shards, run, 4, *common)
    before = snapshots(run)
    assert len(before) == 4
    train_tiny(shards, run, 4, *common, resume=str(run / "checkpoints" / "step_0000002"))
    aside = sorted(p.name for p in (run / "posthoc" / "superseded").iterdir())
    assert aside == ["images_000000000048.safetensors", "images_000000000064.safetensors"]
    after = snapshots(run)
    assert sorted(after) == sorted(before)
    for name in before:  # rewritten by the resumed run: the same trajectory again
        assert same(before[name], after[name]), name
    assert not any(n.startswith(".tmp-") for n in os.listdir(run / "posthoc"))
