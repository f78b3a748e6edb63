"""Generation and FID at any split: per-sample random numbers, blocks of global indices, real
processes (torchrun, gloo on CPU) against one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port, subprocess_env

from fmgen.core import SamplingSpec
from fmgen.eval.generate import block_noise, generate, sde_noise, sde_seed
from fmgen.eval.protocol import fid_block_size, rank_blocks
from fmgen.models import load_model


def per_sample(model):
    """The model with its network called on one sample at a time.

    The U-Net's rounding depends on the batch size (its 1x1 convolutions are matrix products
    blocked by batch: 1 vs 16 samples differ by ~1e-6), so only a network that sees each
    sample alone makes equal random numbers show as torch.equal images under any split.
    """
    forward = model.forward

    def one_by_one(x, t, c=None):
        return torch.cat([forward(x[i : i + 1], t[i : i + 1], None if c is None else c[i : i + 1])
                          for i in range(len(x))])  # fmt: skip

    model.forward = one_by_one
    return model


@pytest.mark.parametrize("sampler", ["sde", "heun", "heun-churn", "sde-interval"])
def test_generate_is_the_same_for_any_split_of_the_indices(tiny_run, sampler):
    """Every random number depends on (seed, sample index) only; also with guidance limited to
    t in [0.2, 0.7] (the grid's t = 0 outside it: B rows there, 2B inside)."""
    loaded = load_model(tiny_run.run_dir)
    m, path = per_sample(loaded.model), loaded.path
    churn = 2.0 if sampler == "heun-churn" else 0.0  # EDM's churn draws noise per sample too
    interval = (0.2, 0.7) if sampler.endswith("-interval") else None
    spec = SamplingSpec(sampler.split("-")[0], steps=3, guidance=2.0, churn=churn,
                        guidance_interval=interval)  # fmt: skip
    y = torch.arange(8) % 10

    def gen(start, num):
        return generate(m, path, spec, num=num, cond=y[start : start + num], start=start, seed=3)

    whole = gen(0, 8)
    halves = torch.cat([gen(0, 4), gen(4, 4)])
    singles = torch.cat([gen(i, 1) for i in range(8)])
    assert torch.equal(whole, halves) and torch.equal(whole, singles)
    assert len({x.numpy().tobytes() for x in whole}) == 8  # distinct samples
    other = generate(m, path, spec, num=8, cond=y, seed=4)
    assert not torch.allclose(whole, other, atol=1e-3)  # the seed matters


def test_any_seed_draws_noise():
    """Seeds past torch's 64-bit range once the block index is mixed in (sample.py --seed)."""
    big = block_noise(10**13 * 2, 0, 3, (1, 2, 2))
    assert big.shape == (3, 1, 2, 2) and not torch.equal(big, block_noise(0, 0, 3, (1, 2, 2)))
    assert torch.equal(big[1:], block_noise(10**13 * 2, 1, 2, (1, 2, 2)))
    assert sde_noise(2**80, 0, 2)(torch.zeros(2, 3)).shape == (2, 3)


def test_sde_increments_are_per_sample_and_apart_from_the_initial_noise():
    shape = (1, 8, 8)
    x = torch.zeros(8, *shape)
    whole = sde_noise(0, 0, 8)
    steps = [whole(x), whole(x)]  # two SDE steps
    parts = [sde_noise(0, 0, 3), sde_noise(0, 3, 5)]
    again = [torch.cat([p(x[:3]), q(x[3:])]) for p, q in [parts] * 2]
    assert torch.equal(steps[0], again[0]) and torch.equal(steps[1], again[1])
    assert not torch.allclose(steps[0], steps[1])  # a new increment every step
    assert not torch.allclose(steps[0], block_noise(0, 0, 8, shape))  # not the initial noise
    assert len({sde_seed(s, i) for s in range(4) for i in range(256)}) == 4 * 256
    assert not {sde_seed(s, i) for s in range(4) for i in range(256)} & {
        s * 1_000_003 + b for s in range(4) for b in range(256)
    }  # no sample's stream is a noise block's stream


@pytest.mark.parametrize("num", [1, 5, 16, 130, 131, 4097, 50_000])
def test_rank_blocks_cover_every_index_once_at_any_process_count(num):
    size = fid_block_size(num)
    assert 1 <= size <= 256 and size == fid_block_size(num)  # a function of num only
    for world in (1, 2, 3, 7):
        blocks = [b for rank in range(world) for b in rank_blocks(num, rank, world)]
        assert sorted(i for b in blocks for i in b) == list(range(num))
        # the blocks (hence the batches the network sees) do not depend on world
        assert sorted((b.start, b.stop) for b in blocks) == [
            (b.start, b.stop) for b in rank_blocks(num, 0, 1)
        ]


CASES = [(sampler, num) for sampler in ("heun", "sde") for num in (130, 131)]


def evaluate_args(run_dir, sampler: str, num: int, out) -> list[str]:
    """The evaluate command's arguments for ``num`` samples of ``sampler`` (2 steps), FID on the
    digits network, the record written to ``out``."""
    return ["--checkpoint", str(run_dir), "--num-samples", str(num), "--feature-network",
            "digits-classifier", "--sampler", sampler, "--steps", "2", "--device", "cpu", "--out",
            str(out)]  # fmt: skip


def evaluate(run_dir, folder, *, procs: int, cases: list[tuple[str, int]]) -> dict:
    """``python -m fmgen.evaluate`` for each (sampler, num) of ``cases``, all in one launch of
    ``procs`` processes (tests/cli_cases.py: one start-up for every case): {case: record}."""
    head = [sys.executable]
    if procs > 1:
        head += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                 "--master_port", str(free_port())]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    out = {case: folder / f"{case[0]}-{case[1]}.json" for case in cases}
    argv = [evaluate_args(run_dir, sampler, num, out[sampler, num]) for sampler, num in cases]
    (folder / "cases.json").write_text(json.dumps(argv))
    r = subprocess.run([*head, str(ROOT / "tests" / "cli_cases.py"), "fmgen.cli.evaluate",
                        str(folder / "cases.json")],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return {case: json.loads(path.read_text()) for case, path in out.items()}


@pytest.fixture(scope="module")
def one_process(tiny_run, tmp_path_factory):
    """The 1-process records of every (sampler, num) of CASES, from one process."""
    return evaluate(tiny_run.run_dir, tmp_path_factory.mktemp("one"), procs=1, cases=CASES)


@pytest.fixture(scope="module")
def three_processes(tiny_run, tmp_path_factory):
    """The 3-process records of every (sampler, num) of CASES, from one torchrun launch."""
    return evaluate(tiny_run.run_dir, tmp_path_factory.mktemp("three"), procs=3, cases=CASES)


@pytest.mark.slow
@pytest.mark.xdist_group("distributed-eval")  # one worker computes the shared records, once
@pytest.mark.parametrize(("sampler", "num"), CASES)
def test_three_processes_give_the_fid_of_one(one_process, three_processes, sampler, num):
    """torchrun with 3 processes: shares of 45/45/40 (130) and 45/45/41 (131) samples, padded for
    the gather (gloo refuses unequal sizes) and trimmed: the same images and FID as 1 process.

    Tolerance: the images are bit-equal (their hash) and the main process scores them alone in
    the same order, so only float64 rounding of the statistics and of the 128 x 128 matrix
    square root could differ (~1e-13 relative): rel 1e-12. One uint8 step in one pixel of one
    image moves this FID by 6e-7 to 2e-5 relative (measured), far outside it.
    """
    shares = [sum(map(len, rank_blocks(num, rank, 3))) for rank in range(3)]
    assert len(set(shares)) > 1  # unequal shares: the case that failed in gloo
    one, three = one_process[sampler, num], three_processes[sampler, num]
    print(f"{sampler}, {num} samples: FID 1 process {one['fid']!r}, 3 processes {three['fid']!r}")
    assert (one["processes"], three["processes"]) == (1, 3)
    assert one["num_generated"] == three["num_generated"] == num
    assert one["images_sha256"] == three["images_sha256"]
    assert three["fid"] == pytest.approx(one["fid"], rel=1e-12, abs=0)
    assert (three["precision"], three["recall"]) == (one["precision"], one["recall"])
    assert one["sampling"]["sampler"] == sampler


@pytest.mark.slow
@pytest.mark.xdist_group("distributed-eval")
def test_two_processes_give_the_fid_of_one(tiny_run, one_process, tmp_path):
    """``torchrun -m fmgen.evaluate`` itself, 2 processes, 131 SDE samples (shares 68/63): the
    images of one process."""
    one, out = one_process["sde", 131], tmp_path / "two.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "-m", "fmgen.evaluate",
                        *evaluate_args(tiny_run.run_dir, "sde", 131, out)],
                       cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(out.read_text())
    print(f"sde, 131 samples: FID 1 process {one['fid']!r}, 2 processes {two['fid']!r}")
    assert two["processes"] == 2 and two["num_generated"] == 131
    assert one["images_sha256"] == two["images_sha256"]
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-12, abs=0)
