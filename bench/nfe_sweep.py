"""FID against the number of network evaluations (NFE), for each sampler, for one checkpoint.

    python bench/nfe_sweep.py --checkpoint runs/digits --num-samples 500

Writes ``nfe_sweep.csv``, ``nfe_sweep.md`` and ``nfe_sweep.png`` (FID vs NFE, one line per
sampler) into --out (default: <checkpoint>/nfe-sweep) and prints the table. Every FID uses the
same reference statistics, samples, labels and seed; only the solver and its steps change.
NFE is ``fmgen.nfe``, the count FID records use: network calls per sample (guidance doubles
the batch of a call, not the count). ``--time-grids`` takes several grids (uniform in t, EDM's
rho-spaced noise levels, uniform in log-SNR); every sampler runs on each. The last line names
the best (sampler, grid) at NFE <= 10 next to Heun on the uniform grid at NFE <= 20.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from fmgen import SAMPLERS, TIME_GRIDS, steps_within


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint or exported model")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="default: every sampler")
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
    labels = torch.arange(args.num_samples) % model.num_classes if model.conditional else None
    out = Path(args.out) if args.out else Path(loaded.source) / "nfe-sweep"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sampler, grid in ((s, g) for s in samplers for g in grids):
        for budget in (int(b) for b in args.nfe.split(",")):
            steps = steps_within(sampler, budget, final_step=base.final_step)
            spec = base.replace(sampler=sampler, grid=grid, steps=steps)
            images = generate(model, loaded.path, spec, num=args.num_samples, cond=labels, seed=args.seed,
                              device=next(model.parameters()).device, autoencoder=loaded.autoencoder)  # fmt: skip
            fid, ref = fid_against_reference(images, data_dir=Path(cfg.data.path), spec=features,
                                             inception_weights=args.inception_weights)  # fmt: skip
            rows.append(
                {
                    "sampler": sampler,
                    "grid": grid,
                    "steps": spec.steps,
                    "nfe": spec.nfe,
                    "fid": round(fid, 4),
                }
            )
            print(
                f"{sampler:>8} {grid:>7} steps {spec.steps:>3} NFE {rows[-1]['nfe']:>3}  FID {fid:9.4f}",
                flush=True,
            )
    with open(out / "nfe_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    header = (f"FID ({features.name} features, {args.num_samples} samples vs {ref['num_reference']} reference, "
              f"final step {base.final_step}, guidance {base.guidance}, {loaded.weights} weights, step {loaded.step})")  # fmt: skip
    md = [header, "", "| sampler | grid | steps | NFE | FID |", "| --- | --- | --- | --- | --- |"]
    md += [
        f"| {r['sampler']} | {r['grid']} | {r['steps']} | {r['nfe']} | {r['fid']} |" for r in rows
    ]
    few = [r for r in rows if r["nfe"] <= 10]
    heun = [r for r in rows if (r["sampler"], r["grid"]) == ("heun", "uniform") and r["nfe"] <= 20]
    if few and heun:
        best, ref20 = min(few, key=lambda r: r["fid"]), max(heun, key=lambda r: r["nfe"])
        md += ["", f"best at NFE <= 10: {best['sampler']}/{best['grid']} NFE {best['nfe']} FID "
                   f"{best['fid']}; heun/uniform NFE {ref20['nfe']} FID {ref20['fid']}"]  # fmt: skip
    (out / "nfe_sweep.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, grid in dict.fromkeys((r["sampler"], r["grid"]) for r in rows):
        pts = [(r["nfe"], r["fid"]) for r in rows if (r["sampler"], r["grid"]) == (sampler, grid)]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{sampler}/{grid}")
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
