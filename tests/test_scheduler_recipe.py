"""The stock diffusers scheduler that takes fmgen's Euler steps (the README's recipe).

fmgen: t = 0 noise, t = 1 data, x_t = t z + (1 - t) eps on the linear path, Euler
x += (t_next - t) u. diffusers' flow match: sigma = 1 noise, x = (1 - sigma) z + sigma eps, the
model predicts eps - z, step x += (sigma_next - sigma) v. So sigma = 1 - t and v = -u; with
``invert_sigmas=True`` the scheduler's sigmas are fmgen's t themselves and v = u.
"""

from __future__ import annotations

import pytest
import torch
from conftest import export_tiny
from diffusers import FlowMatchEulerDiscreteScheduler

from fmgen.core import Oracle, SamplingSpec, get_path, solve, time_grid, velocity_field
from fmgen.eval import block_noise, generate
from fmgen.models import load_model
from fmgen.pipeline import scheduler_sigmas

LABELS = torch.tensor([3, 3, 7, 0])
SEED, GUIDANCE = 7, 2.0


@pytest.fixture(scope="module")
def export(tmp_path_factory, one_torch_thread):
    return export_tiny(tmp_path_factory.mktemp("recipe") / "run")


@pytest.mark.parametrize("steps", [1, 5, 12])
def test_the_scheduler_takes_fmgens_uniform_grid(export, steps):
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(export, subfolder="scheduler")
    sched.set_timesteps(sigmas=scheduler_sigmas(steps))
    ts = time_grid(steps, dtype=torch.float64)  # (steps + 1,) from 0 (noise) to 1
    assert sched.sigmas.shape == ts.shape
    assert (sched.sigmas.double() - ts).abs().max() <= 1e-7  # float32 of fmgen's times
    assert (sched.timesteps.double() / 1000 - ts[:-1]).abs().max() <= 1e-7  # the U-Net's 1000 t
    # its own grid is not fmgen's: set_timesteps(steps) ends at t = 0.999 before the last step
    sched.set_timesteps(steps)
    if steps > 1:
        assert abs(float(sched.sigmas[-2]) - 0.999) < 1e-6


def stock_loop(export, sched, steps: int, *, invert: bool) -> torch.Tensor:
    """A diffusers user's loop: the U-Net by hand with classifier-free guidance."""
    unet = load_model(export).model.backbone  # a UNet2DModel, as diffusers loads it
    sched.set_timesteps(sigmas=scheduler_sigmas(steps))
    x = block_noise(SEED, 0, len(LABELS), (1, 8, 8))  # fmgen's initial noise of samples 0..3
    null = torch.full_like(LABELS, 10)  # the null label: the number of classes
    with torch.no_grad():
        for timestep in sched.timesteps:
            t_unet = timestep if invert else 1000 - timestep  # the U-Net's time is 1000 t
            both = unet(torch.cat([x, x]), t_unet, class_labels=torch.cat([LABELS, null])).sample
            cond, uncond = both.chunk(2)
            u = uncond + GUIDANCE * (cond - uncond)  # fmgen's velocity (t = 0 noise)
            x = sched.step(u if invert else -u, timestep, x).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize("final_step", ["denoise", "solver"])
def test_the_stock_scheduler_reproduces_fmgens_euler_samples(export, final_step):
    """On the linear path the denoising last step is the Euler step, so both final steps match."""
    loaded = load_model(export)
    spec = SamplingSpec("euler", steps=5, guidance=GUIDANCE, final_step=final_step)
    want = generate(loaded.model, loaded.path, spec, num=len(LABELS), cond=LABELS, seed=SEED)
    recipe = FlowMatchEulerDiscreteScheduler.from_pretrained(export, subfolder="scheduler")
    assert (stock_loop(export, recipe, 5, invert=True) - want).abs().max() <= 1e-5
    # the default scheduler works too: time 1 - sigma, and the velocity's sign flipped
    default = FlowMatchEulerDiscreteScheduler()
    assert (stock_loop(export, default, 5, invert=False) - want).abs().max() <= 1e-5
    assert (want.abs() < 0.99).float().mean() > 0.3  # not vacuous: most pixels are not clamped


@pytest.mark.parametrize(("path_name", "grid"), [("vp-cosine", "uniform"), ("vp-cosine", "edm"),
                                                 ("vp-linear", "uniform")])  # fmt: skip
def test_on_vp_paths_the_scheduler_is_euler_with_the_solvers_last_step(path_name, grid):
    """The scheduler's step knows no path: given fmgen's velocity (here an exact eps model of a
    few data points, converted through the path) and fmgen's grid, it takes fmgen's Euler steps
    with final_step="solver", and not the denoising last step fmgen takes by default."""
    path = get_path(path_name)
    data = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    oracle = Oracle(data, path)
    field = velocity_field(lambda x, t: oracle.predict(x, t, "eps"), path, "eps")
    spec = SamplingSpec("euler", steps=8, grid=grid, final_step="solver")
    x0 = block_noise(SEED, 0, 4, (1, 8, 8))

    sched = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    ts = spec.time_grid(path, dtype=torch.float64)
    sched.set_timesteps(sigmas=(1 - ts[:-1]).numpy())
    x = x0
    for i, timestep in enumerate(sched.timesteps):
        t = sched.sigmas[i].expand(len(x))  # fmgen's t_i, in float32
        x = sched.step(field(x, t), timestep, x).prev_sample
    solver = solve(spec, field, x0, path=path)
    assert (x - solver).abs().max() <= 1e-5
    denoise = solve(spec.replace(final_step="denoise"), field, x0, path=path)
    # from the uniform grid's t = 7/8 the two last steps differ; the edm grid's last interval
    # starts at sigma_min = 0.002, where both land on the same data point to ~1e-6
    gap = (x - denoise).abs().max()
    assert gap > 1e-3 if grid == "uniform" else gap < 1e-5
