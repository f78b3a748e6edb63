"""sample.py and generation: grids, seeds, prediction types, SDE, guidance, splits, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port, run_main, subprocess_env, train_tiny
from PIL import Image

from fmgen.cli.sample import sample_command
from fmgen.core import SamplingSpec, grids, samplers, velocity_field
from fmgen.eval.generate import block_noise, generate, model_field
from fmgen.eval.images import GRID_GAP, GRID_GAP_VALUE
from fmgen.models import load_model


def run_sample(*args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    head = [sys.executable]
    if torchrun:
        port = str(free_port())
        head += ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    return subprocess.run([*head, str(ROOT / "sample.py"), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_sample_py_writes_grid_and_npz_of_requested_shape(tiny_run, tmp_path):
    grid, out = tmp_path / "g.png", tmp_path / "s"
    r = run_sample("--checkpoint", str(tiny_run.run_dir), "--per-class", "3", "--steps", "2",
                   "--out", str(grid), "--out-dir", str(out), "--format", "npz")  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (30, 8, 8, 1) and data["images"].dtype == np.uint8
    assert np.array_equal(data["labels"], np.repeat(np.arange(10), 3))
    img = Image.open(grid)
    cell = 8 * (64 // 8)  # 8x8 images upscaled x8 in the grid
    assert img.height == 10 * cell + 9 * GRID_GAP  # one row per class, gaps between rows
    assert img.width >= 3 * cell + 2 * GRID_GAP  # three per row, plus the class-label margin
    pngs = tmp_path / "p"
    r = run_main("sample", "--checkpoint", str(tiny_run.run_dir), "--labels", "3,3,7", "--steps",
                 "2", "--out", str(tmp_path / "g2.png"), "--out-dir", str(pngs))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in pngs.iterdir()) == [
        "000000_class3.png",
        "000001_class3.png",
        "000002_class7.png",
    ]


def test_grid_holds_every_sample_up_to_grid_max_with_gaps(tiny_run, tmp_path):
    """300 samples (30 per class, more than one noise block of 256), --grid-max 400: 10 rows of
    30 cells, each cell the sample of its index, mid-gray gaps between them."""
    grid, pngs = tmp_path / "g.png", tmp_path / "p"
    r = run_main("sample", "--checkpoint", str(tiny_run.run_dir), "--per-class", "30", "--steps",
                 "2", "--grid-max", "400", "--out", str(grid), "--out-dir", str(pngs))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "(300 images" in r.stdout, r.stdout
    img = np.asarray(Image.open(grid))  # (H, W) gray
    cell, step = 64, 64 + GRID_GAP  # 8x8 upscaled x8, then the gap
    assert img.shape[0] == 10 * cell + 9 * GRID_GAP
    left = img.shape[1] - (30 * cell + 29 * GRID_GAP)  # the class-label margin
    assert 0 < left < 64
    files = sorted(pngs.iterdir())
    assert len(files) == 300
    for i, f in enumerate(files):
        r_, k = divmod(i, 30)
        y, x = r_ * step, left + k * step
        want = np.asarray(Image.open(f)).repeat(8, axis=0).repeat(8, axis=1)
        assert np.array_equal(img[y : y + cell, x : x + cell], want), f.name
    gaps = np.concatenate([img[r_ * step - GRID_GAP : r_ * step, left:].ravel() for r_ in range(1, 10)]
                          + [img[:, left + k * step - GRID_GAP : left + k * step].ravel() for k in range(1, 30)])  # fmt: skip
    assert (gaps == GRID_GAP_VALUE).all()


def test_same_seed_same_images(tiny_run):
    loaded = load_model(tiny_run.run_dir)
    y = torch.arange(10)
    spec = SamplingSpec(steps=3)
    a = generate(loaded.model, loaded.path, spec, num=10, cond=y, seed=5)
    b = generate(loaded.model, loaded.path, spec, num=10, cond=y, seed=5)
    c = generate(loaded.model, loaded.path, spec, num=10, cond=y, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def eps_run(shards, tmp_path_factory):
    return train_tiny(
        shards, tmp_path_factory.mktemp("eps"), 3, "model.prediction_type=eps", "loss.name=dsm"
    )


@pytest.mark.parametrize("sampler", ["euler", "heun", "rk4", "sde"])
def test_velocity_and_eps_models_sample_with_every_solver(tiny_run, eps_run, sampler):
    for run in (tiny_run, eps_run):
        loaded = load_model(run.run_dir)
        spec = SamplingSpec(sampler, steps=4, guidance=1.5)
        x = generate(loaded.model, loaded.path, spec, num=6, cond=torch.arange(6))
        assert x.shape == (6, 1, 8, 8) and torch.isfinite(x).all()
    assert load_model(eps_run.run_dir).model.prediction_type == "eps"


def test_eps_model_field_is_the_converted_velocity(eps_run):
    """The sampler's field of an eps model equals the docs/math.md velocity of its eps output."""
    loaded = load_model(eps_run.run_dir)
    m, path = loaded.model, loaded.path
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 0.4), torch.arange(4)
    field = model_field(m, path, y, guidance=1.0)
    with torch.no_grad():
        eps = m(x, t, y)
        s = path.schedule(t)
        d = (x - s.beta.view(-1, 1, 1, 1) * eps) / s.alpha.view(-1, 1, 1, 1)  # x0 from eps
        u = s.dalpha.view(-1, 1, 1, 1) * d + s.dbeta.view(-1, 1, 1, 1) * eps
        assert torch.allclose(field(x, t), u, atol=1e-5)


def test_guidance_scales_follow_the_formula(tiny_run):
    loaded = load_model(tiny_run.run_dir)
    m, path = loaded.model, loaded.path
    x, t, y = torch.randn(5, 1, 8, 8), torch.full((5,), 0.3), torch.arange(5)
    null = m.conditioning.null_like(y)
    assert torch.equal(null, torch.full_like(y, 10))  # the null label: one past the 10 classes
    with torch.no_grad():
        cond, uncond = m(x, t, y), m(x, t, null)
        for w in (0.0, 1.0, 2.5):
            got = model_field(m, path, y, guidance=w)(x, t)
            assert torch.allclose(got, uncond + w * (cond - uncond), atol=1e-5), w
        assert torch.equal(model_field(m, path, y, 1.0)(x, t), cond)
        assert torch.equal(model_field(m, path, y, 0.0)(x, t), uncond)
    # whole trajectories: guidance 0 == unconditional sampling, 1 == purely conditional
    a = generate(m, path, SamplingSpec(steps=3, guidance=0.0), num=5, cond=y)
    b = generate(m, path, SamplingSpec(steps=3, guidance=1.0), num=5, cond=null)
    assert torch.equal(a, b)
    ts = grids.time_grid(3)
    direct = samplers.sample_heun(velocity_field(lambda x, t: m(x, t, y), path, "velocity"),
                                  block_noise(0, 0, 5, (1, 8, 8)), ts)  # fmt: skip
    got = generate(m, path, SamplingSpec(steps=3, guidance=1.0), num=5, cond=y)
    assert torch.allclose(got, direct.clamp(-1, 1), atol=1e-6)


def test_guidance_interval_in_generate(tiny_run):
    """generate with sample's guidance_interval: [0, 1] is plain guidance to the bit, an interval
    that holds none of the times the solver evaluates (Heun, 3 uniform steps: 0, 1/3, 2/3) is the
    conditional model alone, and one holding some of them lies between and differs from both."""
    loaded = load_model(tiny_run.run_dir)
    m, path, y = loaded.model, loaded.path, torch.arange(5)
    spec = SamplingSpec(steps=3, guidance=3.0)

    def gen(s):
        return generate(m, path, s, num=5, cond=y)

    plain = gen(spec)
    assert torch.equal(gen(spec.replace(guidance_interval=(0.0, 1.0))), plain)
    alone = gen(spec.replace(guidance=1.0))
    assert torch.equal(gen(spec.replace(guidance_interval=(0.9, 1.0))), alone)
    some = gen(spec.replace(guidance_interval=(0.2, 0.5)))
    assert (some - plain).abs().max() > 1e-4 and (some - alone).abs().max() > 1e-4


def test_generate_follows_the_time_grid(tiny_run):
    """generate with SamplingSpec(grid=...) is Heun on grids.time_grid(spacing=..., path=...)."""
    loaded = load_model(tiny_run.run_dir)
    m, path, y = loaded.model, loaded.path, torch.arange(5)
    field = velocity_field(lambda x, t: m(x, t, y), path, "velocity")
    out = {}
    for spacing in grids.TIME_GRIDS:
        ts = grids.time_grid(3, spacing=spacing, path=path)
        direct = samplers.sample_heun(field, block_noise(0, 0, 5, (1, 8, 8)), ts).clamp(-1, 1)
        spec = SamplingSpec(steps=3, guidance=1.0, grid=spacing)
        out[spacing] = generate(m, path, spec, num=5, cond=y)
        assert torch.allclose(out[spacing], direct, atol=1e-6)
    assert not torch.allclose(out["uniform"], out["edm"], atol=1e-3)


@pytest.mark.parametrize(("saved", "flag", "want"), [("uniform", None, "uniform"), ("edm", None, "edm"), ("edm", "uniform", "uniform"), ("uniform", "edm", "edm")])  # fmt: skip
def test_time_grid_flag_defaults_to_the_config(tiny_run, tmp_path, monkeypatch, saved, flag, want):
    """sample.py --time-grid overrides the checkpoint config's sample.time_grid."""
    import fmgen.eval.sampling
    import fmgen.models
    from fmgen.cli.sample import parser as sample_parser

    real_load, real_generate, seen = fmgen.models.load_model, fmgen.eval.sampling.generate, []

    def load_with(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded.config.sample.time_grid = saved
        return loaded

    def spy(*args, **kwargs):
        seen.append(args[2].grid)  # generate(model, path, spec, ...)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(fmgen.models, "load_model", load_with)
    monkeypatch.setattr(fmgen.eval.sampling, "generate", spy)
    argv = ["--checkpoint", str(tiny_run.run_dir), "--num-samples", "2", "--steps", "2",
            "--device", "cpu", "--out", str(tmp_path / "g.png")]  # fmt: skip
    args = sample_parser().parse_args(argv + (["--time-grid", flag] if flag else []))
    assert f"{want} steps" in sample_command(args)
    assert seen == [want]
    with pytest.raises(SystemExit):
        sample_parser().parse_args([*argv, "--time-grid", "karras"])


def test_bad_checkpoint_and_labels_are_clear_errors(tiny_run, tmp_path):
    r = run_main("sample", "--checkpoint", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = run_main("sample", "--checkpoint", str(tiny_run.run_dir), "--labels", "3,12")
    assert r.returncode == 2 and "12" in r.stderr and "Traceback" not in r.stderr
    r = run_main("sample", "--checkpoint", str(tiny_run.run_dir), "--steps", "0")
    assert r.returncode == 2 and "--steps" in r.stderr
    r = run_main("sample", "--checkpoint", str(tiny_run.export_dir), "--weights", "raw")
    assert r.returncode == 2 and "EMA" in r.stderr


@pytest.mark.slow
def test_two_processes_split_samples_without_duplicates(tiny_run, tmp_path):
    """Under 2 processes the samples equal one process's: distinct seeds, no duplicates."""
    args = ["--checkpoint", str(tiny_run.run_dir), "--num-samples", "600", "--steps", "2", "--format", "npz",
            "--device", "cpu"]  # fmt: skip
    one = run_sample(*args, "--out-dir", str(tmp_path / "one"), "--out", str(tmp_path / "one.png"))
    two = run_sample(
        *args, "--out-dir", str(tmp_path / "two"), "--out", str(tmp_path / "two.png"), torchrun=True
    )
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = (
        np.load(tmp_path / "one" / "samples.npz")["images"],
        np.load(tmp_path / "two" / "samples.npz")["images"],
    )
    assert a.shape == b.shape == (600, 8, 8, 1) and np.array_equal(a, b)
    assert len({x.tobytes() for x in a}) == 600
    # the grids (400 cells: blocks of both processes) are the same picture
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")),
                          np.asarray(Image.open(tmp_path / "two.png")))  # fmt: skip
