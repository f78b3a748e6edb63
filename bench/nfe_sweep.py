"""FID against the number of network evaluations (NFE), for each sampler, for one checkpoint.

    python bench/nfe_sweep.py --checkpoint runs/digits --num-samples 500
    python bench/nfe_sweep.py --checkpoint runs/digits --guidance-intervals none 0.25,0.8

Writes ``nfe_sweep.csv``, ``nfe_sweep.md`` and ``nfe_sweep.png`` (FID vs NFE, one line per
sampler) into --out (default: <checkpoint>/nfe-sweep) and prints the table. Every FID uses the
same reference statistics, samples, labels and seed; only the solver, its steps and the guidance
interval change. NFE is ``fmgen.nfe``, the count FID records use: network calls per sample
(guidance doubles the batch of a call, not the count). Each budget runs the most steps that fit
(``steps_within``: with the denoising last step, 10 for DPM-Solver++ and Euler, 5 for Heun).
``--time-grids`` takes several grids (uniform in t, EDM's rho-spaced noise levels, uniform in
log-SNR); every sampler runs on each. ``--guidance-intervals`` takes several intervals of t
where guidance acts (``none``: every t, the default being the checkpoint config's).

The markdown table is ready for a README: one row per sampler / grid (/ interval), one column per
NFE budget. Its last line, the pick, names the best (sampler, grid[, interval]) at NFE <= 10 and
its FID relative to Heun on the uniform grid at 20 steps (the default job's sampler; run once
more if the sweep does not hold it).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path
from typing import Any

import torch

from fmgen import SAMPLERS, TIME_GRIDS, steps_within

REFERENCE = ("heun", "uniform", 20)  # the pick's yardstick: sampler, grid, steps
# meanflow integrates an average-velocity model u(x, t, r), not the velocity of the checkpoints
# this sweep compares; name it with --samplers for a MeanFlow checkpoint
VELOCITY_SAMPLERS = [name for name in SAMPLERS if name != "meanflow"]


def parse_interval(text: str) -> tuple[float, float] | None:
    """``none`` -> None (guidance at every t); ``LO,HI`` -> (lo, hi)."""
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not LO,HI (two times, 0 = noise, 1 = data), e.g. 0.25,0.8, or none"
        ) from None
    return lo, hi


def interval_text(interval: Any) -> str:
    return "all t" if interval is None else "t {:g}-{:g}".format(*interval)


def markdown(rows: list[dict[str, Any]], budgets: list[int], header: str,
             reference: dict[str, Any] | None) -> list[str]:  # fmt: skip
    """The README table (rows sampler / grid [/ interval], columns NFE budgets) and the pick."""
    with_interval = len({r["interval"] for r in rows}) > 1
    keys = list(dict.fromkeys(_key(r, with_interval) for r in rows))
    cols = " | ".join(f"NFE {b}" for b in budgets)
    md = [header, "", f"| sampler / grid | {cols} |", "| --- |" + " --- |" * len(budgets)]
    for key in keys:
        cells = []
        for b in budgets:
            hit = [r for r in rows if _key(r, with_interval) == key and r["budget"] == b]
            cells.append(_cell(hit[0], b) if hit else "-")
        md.append(f"| {' / '.join(key)} | {' | '.join(cells)} |")
    if any(r["nfe"] != r["budget"] for r in rows):
        md += ["", "(n): the NFE spent where the most steps that fit use fewer than the budget."]
    few = [r for r in rows if r["nfe"] <= 10]
    if few and reference is not None:
        best = min(few, key=lambda r: r["fid"])
        ratio = best["fid"] / reference["fid"]
        md += ["", f"pick at NFE <= 10: {' / '.join(_key(best, with_interval))} ({best['steps']} "
                   f"steps, NFE {best['nfe']}) FID {best['fid']:.1f}, {ratio:.2f}x the FID of "
                   f"heun / uniform at {reference['steps']} steps (NFE {reference['nfe']}): "
                   f"{reference['fid']:.1f}"]  # fmt: skip
    return md


def _key(row: dict[str, Any], with_interval: bool) -> tuple[str, ...]:
    key = (row["sampler"], row["grid"])
    return (*key, row["interval"]) if with_interval else key


def _cell(row: dict[str, Any], budget: int) -> str:
    fid = f"{row['fid']:.1f}"  # FID's noise at a few hundred samples is a few percent
    return fid if row["nfe"] == budget else f"{fid} ({row['nfe']})"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint or exported model")
    p.add_argument("--samplers", default=",".join(VELOCITY_SAMPLERS),
                   help="default: every sampler of a velocity model (all but meanflow)")  # fmt: skip
    p.add_argument("--nfe", default="4,6,8,10,20,40", help="NFE budgets")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument(
        "--feature-network",
        default=None,
        help="default: the checkpoint config's eval.feature_network",
    )
    p.add_argument("--inception-weights", default="")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument(
        "--guidance-intervals",
        nargs="+",
        type=parse_interval,
        default=None,
        metavar="LO,HI|none",
        help="intervals of t where guidance acts, e.g. none 0.25,0.8 (default: the checkpoint "
        "config's sample.guidance_interval)",
    )
    p.add_argument(
        "--time-grids",
        default=",".join(TIME_GRIDS),
        help=f"comma-separated, of {', '.join(TIME_GRIDS)} (default: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    grids, samplers = args.time_grids.split(","), args.samplers.split(",")
    for flag, names, known in (
        ("--time-grids", grids, TIME_GRIDS),
        ("--samplers", samplers, SAMPLERS),
    ):
        if bad := [n for n in names if n not in known]:
            p.error(f"{flag}: {', '.join(map(repr, bad))} unknown; choose from {', '.join(known)}")

    from fmgen.config import sampling_spec
    from fmgen.eval import feature_spec, fid_against_reference, generate
    from fmgen.models import load_model

    loaded = load_model(args.checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
    cfg, model = loaded.config, loaded.model
    net_name = args.feature_network or cfg.eval.feature_network
    features = feature_spec(net_name, resolution=cfg.data.resolution, channels=cfg.data.channels,
                        inception_weights=args.inception_weights, cache_dir=Path(cfg.train.run_dir) / "cache")  # fmt: skip
    base = sampling_spec(cfg).replace(guidance=args.guidance)
    intervals = args.guidance_intervals or [base.guidance_interval]
    try:
        specs = [dataclasses.replace(base, guidance_interval=gi) for gi in intervals]
    except ValueError as e:
        p.error(f"--guidance-intervals: {e}")
    labels = torch.arange(args.num_samples) % model.num_classes if model.conditional else None
    out = Path(args.out) if args.out else Path(loaded.source) / "nfe-sweep"
    out.mkdir(parents=True, exist_ok=True)
    ref: dict[str, Any] = {}

    def measure(spec: Any) -> dict[str, Any]:
        images = generate(model, loaded.path, spec, num=args.num_samples, cond=labels, seed=args.seed,
                          device=next(model.parameters()).device, autoencoder=loaded.autoencoder)  # fmt: skip
        fid, ref["reference"] = fid_against_reference(images, data_dir=Path(cfg.data.path), spec=features,
                                                      inception_weights=args.inception_weights)  # fmt: skip
        row = {"sampler": spec.sampler, "grid": spec.grid,
               "interval": interval_text(spec.guidance_interval), "steps": spec.steps,
               "nfe": spec.nfe, "fid": round(fid, 4)}  # fmt: skip
        print(f"{row['sampler']:>8} {row['grid']:>7} {row['interval']:>11} steps {row['steps']:>3} "
              f"NFE {row['nfe']:>3}  FID {fid:9.4f}", flush=True)  # fmt: skip
        return row

    budgets = [int(b) for b in args.nfe.split(",")]
    rows = []
    for spec0 in specs:
        for sampler, grid in ((s, g) for s in samplers for g in grids):
            for budget in budgets:
                steps = steps_within(sampler, budget, final_step=base.final_step)
                rows.append({**measure(spec0.replace(sampler=sampler, grid=grid, steps=steps)),
                             "budget": budget})  # fmt: skip
    sampler, grid, steps = REFERENCE
    # the yardstick guides as the config does (its interval), like the default job's samples
    yard = [r for r in rows if (r["sampler"], r["grid"], r["steps"]) == REFERENCE
            and r["interval"] == interval_text(base.guidance_interval)]  # fmt: skip
    reference = yard[0] if yard else measure(base.replace(sampler=sampler, grid=grid, steps=steps))
    with open(out / "nfe_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    header = (f"FID ({features.name} features, {args.num_samples} samples vs {ref['reference']['num_reference']} "
              f"reference, final step {base.final_step}, guidance {base.guidance}, {loaded.weights} weights, "
              f"step {loaded.step})")  # fmt: skip
    md = markdown(rows, budgets, header, reference)
    (out / "nfe_sweep.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    with_interval = len(specs) > 1
    for key in dict.fromkeys(_key(r, with_interval) for r in rows):
        pts = [(r["nfe"], r["fid"]) for r in rows if _key(r, with_interval) == key]
        ax.plot(*zip(*pts, strict=True), marker="o", label="/".join(key))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE per sample")
    ax.set_ylabel("FID")
    ax.set_title(f"{features.name} FID vs NFE", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "nfe_sweep.png", dpi=120)
    print("\n".join(md))
    print(f"\nwrote {out / 'nfe_sweep.csv'}, {out / 'nfe_sweep.md'}, {out / 'nfe_sweep.png'}")


if __name__ == "__main__":
    main()
