"""Drawing images from a trained FlowModel: any sampler, any prediction type, guidance.

The network's output is converted to a velocity through the path (``velocity_field``),
classifier-free guidance combines the conditional and null fields (``cfg_net``, one batched
call), the spec's solver integrates from N(0, I) at ``t_start`` to t = 1, and the autoencoder
stage decodes the result into pixels.

Every random number of sample i is a function of (seed, i): its initial noise comes from the
noise block holding i (``block_noise``), its SDE increments from a generator of its own
(``sde_noise``), so how the indices are split into calls, batches or processes changes no draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fmgen.base import FmgenError
from fmgen.core.guidance import cfg_net, velocity_field
from fmgen.core.paths import GaussianPath
from fmgen.core.sampling import SamplingSpec, solve
from fmgen.core.solver_base import Field
from fmgen.models.autoencoder import Autoencoder, IdentityAutoencoder
from fmgen.models.conditioning import ConditionError
from fmgen.models.flow import FlowModel


class SampleError(FmgenError, ValueError):
    """Bad sampling arguments (labels, steps, guidance); the message names the fix."""


def model_field(
    model: FlowModel, path: GaussianPath, cond: Tensor | None, guidance: float,
    negative: Tensor | None = None, *, interval: tuple[float, float] | None = None,
) -> Field:  # fmt: skip
    """The velocity field u(x, t) of the model for fixed conditions, with guidance if
    conditional (only at lo <= t <= hi with ``interval``, the conditional prediction elsewhere);
    ``negative`` (the conditions of negative prompts) replaces the null condition.

    A model of the average velocity (MeanFlow) gives u(x, t, r=None), the average over [t, r]
    (r = None: r = t, the velocity), so the ``meanflow`` sampler and every ODE solver take it."""
    conditional = cond is not None and model.conditional
    null = None
    if conditional:
        null = model.conditioning.null_like(cond) if negative is None else negative.to(cond)
    if model.average:
        return _average_field(model, cond if conditional else None, null, guidance, interval)
    if not conditional:
        return velocity_field(lambda x, t: model(x, t, None), path, model.prediction_type)
    # guidance is affine, and so are the conversions: guiding the raw prediction equals
    # guiding the velocity it converts into
    guided = cfg_net(model, cond, null, guidance, interval=interval)
    return velocity_field(guided, path, model.prediction_type)


def _average_field(model: FlowModel, cond: Tensor | None, null: Tensor | None, guidance: float,
                   interval: tuple[float, float] | None) -> Field:  # fmt: skip
    """u(x, t, r) of an average-velocity model (it predicts velocities: no conversion), guided
    as ``model_field`` guides (a model trained with guidance in its target samples at 1);
    ``cond`` None: unconditional."""

    def field(x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        r = t if r is None else r
        if cond is None:
            return model(x, t, None, r=r)

        def net(xs: Tensor, ts: Tensor, cs: Tensor) -> Tensor:
            # cfg_net calls with the B rows, or with the conditional and null halves as 2B
            return model(xs, ts, cs, r=r.repeat(len(xs) // len(r)))

        return cfg_net(net, cond, null, guidance, interval=interval)(x, t)

    return field


@torch.no_grad()
def generate(
    model: FlowModel,
    path: GaussianPath,
    spec: SamplingSpec,
    *,
    num: int,
    cond: Tensor | None = None,
    seed: int = 0,
    start: int = 0,
    device: str | torch.device = "cpu",
    autoencoder: Autoencoder | None = None,
    progress: bool = False,
    negative: Tensor | None = None,
) -> Tensor:
    """Images (num, C, H, W) in [-1, 1] for global sample indices start..start+num-1.

    ``cond`` (num, ...) holds the conditions of a conditional model (the null condition gives
    unconditional samples), ``negative`` (num, ...) optional conditions that guidance steers away
    from instead of the null one (negative prompts); ``spec`` the solver, steps, grid and guidance. The solver's result
    is decoded by ``autoencoder`` (identity: pixel space). Every random number of sample i
    (initial noise, SDE increments) depends on (seed, i) only, so splitting the indices across
    calls or processes reproduces the same draws. Equal draws give bit-equal images only from
    equal batches: a network's rounding depends on the batch size (the U-Net's 1x1 convolutions
    are matrix products blocked by batch; 1 vs 16 samples differ by ~1e-6), so callers that
    split work (``fid_of_model``, ``draw_samples``) call this on fixed blocks of global indices.
    """
    try:
        model.conditioning.check(cond if model.conditional else None, num)
        if negative is not None:
            model.conditioning.check(negative, num)
    except ConditionError as e:
        raise SampleError(str(e)) from None
    if spec.sampler == "meanflow" and not model.average:
        raise SampleError(
            "sampler 'meanflow' steps with the average velocity, which this model was not trained "
            "to predict (train with loss.name=meanflow); choose another sampler, e.g. heun"
        )
    ae = autoencoder or IdentityAutoencoder()
    shape = model.sample_shape
    dtype = next(model.parameters()).dtype
    out = []
    bar = tqdm(total=num, disable=not progress, desc="sample", unit="img")
    i = 0
    while i < num:
        block = (start + i) // NOISE_BLOCK
        n = min(num - i, (block + 1) * NOISE_BLOCK - (start + i))  # stay inside one noise block
        x = block_noise(seed, start + i, n, shape).to(device=device, dtype=dtype)
        c = cond[i : i + n].to(device) if cond is not None and model.conditional else None
        neg = negative[i : i + n].to(device) if negative is not None and c is not None else None
        noise = sde_noise(seed, start + i, n) if spec.stochastic else None  # SDE, churn
        field = model_field(model, path, c, spec.guidance, neg, interval=spec.guidance_interval)
        z = solve(spec, field, x, path=path, noise=noise)
        out.append(ae.decode(z).float().cpu())
        i += n
        bar.update(n)
    bar.close()
    return torch.cat(out).clamp(-1, 1) if out else torch.empty((0, *shape))


NOISE_BLOCK = 256


def index_blocks(num: int, rank: int, world: int, size: int) -> list[range]:
    """The blocks of global sample indices 0..num-1 that process ``rank`` of ``world`` draws:
    blocks of ``size`` consecutive indices, dealt out round-robin."""
    return [range(s, min(s + size, num)) for s in range(rank * size, num, world * size)]


def gather_blocks(
    local: Tensor, num: int, shape: tuple[int, ...], *, world: int, size: int,
    device: str | torch.device,
) -> Tensor:  # fmt: skip
    """Every process's uint8 images of its ``index_blocks(num, rank, world, size)``, in order ->
    all num images, in index order, on every process (a collective: every rank calls it).

    Gathers need the same tensor size on every rank (gloo fails with "Received data size
    doesn't match" otherwise), so each rank pads its share to the largest share, and the
    padding is dropped after the gather. The shares are known to every rank: nothing else is
    exchanged.
    """
    from accelerate.utils import gather

    # padded by hand: every rank knows every share without asking, where Accelerate's
    # pad_across_processes spends a collective to learn the sizes, and gather_for_metrics only
    # trims the remainder of a prepared DataLoader
    shares = [[i for r in index_blocks(num, rank, world, size) for i in r] for rank in range(world)]
    width = max(len(s) for s in shares)
    padded = torch.zeros((width, *shape), dtype=torch.uint8)  # (width, C, H, W)
    padded[: len(local)] = local
    everything = gather(padded.to(device)).cpu()  # (world * width, C, H, W)
    out = torch.empty((num, *shape), dtype=torch.uint8)
    for rank, share in enumerate(shares):
        first = rank * width
        out[torch.tensor(share, dtype=torch.long)] = everything[first : first + len(share)]
    return out


def block_noise(seed: int, start: int, count: int, shape: tuple[int, ...]) -> Tensor:
    """Initial noise of samples start..start+count-1, (count, *shape), drawn on the CPU.

    Sample i's noise depends only on (seed, i): blocks of NOISE_BLOCK samples each have their own
    generator, so any split of the indices across processes or batches gives the same images.
    """
    out = []
    first, last = start // NOISE_BLOCK, (start + count - 1) // NOISE_BLOCK
    for b in range(first, last + 1):
        # reduced to torch's 64-bit seed range (any --seed works); unchanged below ~1.8e13
        gen = torch.Generator().manual_seed((seed * 1_000_003 + b) % 2**64)
        block = torch.randn((NOISE_BLOCK, *shape), generator=gen)
        lo = max(start, b * NOISE_BLOCK) - b * NOISE_BLOCK
        hi = min(start + count, (b + 1) * NOISE_BLOCK) - b * NOISE_BLOCK
        out.append(block[lo:hi])
    return torch.cat(out) if out else torch.empty((0, *shape))


def sde_seed(seed: int, index: int) -> int:
    """The 64-bit seed of sample ``index``'s SDE increments.

    Hashed with a tag of its own into 64 bits, so a sample's stream meets a noise block's
    (``seed * 1_000_003 + block``) or another (seed, index)'s with probability ~2^-64 a pair.
    """
    digest = hashlib.sha256(f"fmgen-sde-increments|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sde_noise(seed: int, start: int, count: int) -> Callable[[Tensor], Tensor]:
    """SDE increments of samples start..start+count-1: one CPU generator per sample.

    The returned ``noise(x)`` (x: (count, ...)) draws row j from sample (start + j)'s own
    generator, on the CPU (the same numbers on every device), so the k-th increment of sample i
    depends on (seed, i, k) only, not on the batch it is drawn in. Each call is one SDE step.
    """
    # EDM's StackedRandomGenerator idea, by hand: torch has no batched draw with a generator
    # per row, and one generator per batch would tie each draw to the batch's composition
    gens = [torch.Generator().manual_seed(sde_seed(seed, start + j)) for j in range(count)]

    def noise(x: Tensor) -> Tensor:
        if x.shape[0] != count:
            raise ValueError(f"sde_noise made for {count} samples got a batch of {x.shape[0]}")
        draws = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])  # (B, ...)
        return draws.to(device=x.device, dtype=x.dtype)

    return noise
