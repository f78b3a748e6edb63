"""FID against the number of network evaluations (NFE), for each sampler, for one checkpoint.

    python bench/nfe_sweep.py --checkpoint runs/digits --num-samples 500

Writes ``nfe_sweep.csv``, ``nfe_sweep.md`` and ``nfe_sweep.png`` (FID vs NFE, one line per
sampler) into --out (default: <checkpoint>/nfe-sweep) and prints the table. Every FID uses the
same reference statistics, samples, labels and seed; only the solver and its steps change.
NFE is ``fmgen.nfe``, the count FID records use: network calls per sample (guidance doubles
the batch of a call, not the count). ``--time-grid
edm`` spaces the steps as in EDM (Karras et al.); run it once per grid to compare them.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from fmgen import TIME_GRIDS, nfe


def steps_for(sampler: str, budget: int) -> int:
    """The most steps whose NFE fits the budget (at least 1), by fmgen's one NFE definition."""
    s = 1
    while nfe(sampler, s + 1) <= budget:
        s += 1
    return s


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint or exported model")
    p.add_argument("--samplers", default="euler,heun,rk4,sde")
    p.add_argument("--nfe", default="4,8,16,32,64", help="NFE budgets")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument(
        "--feature-network",
        default=None,
        help="default: the checkpoint config's eval.feature_network",
    )
    p.add_argument("--inception-weights", default="")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument(
        "--time-grid",
        choices=TIME_GRIDS,
        default=None,
        help="uniform in t or EDM spacing in sigma (default: the checkpoint config's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from fmgen.config import sampling_spec
    from fmgen.eval import feature_spec, fid_against_reference, generate
    from fmgen.models import load_model

    loaded = load_model(args.checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")
    cfg, model = loaded.config, loaded.model
    net_name = args.feature_network or cfg.eval.feature_network
    features = feature_spec(net_name, resolution=cfg.data.resolution, channels=cfg.data.channels,
                        inception_weights=args.inception_weights, cache_dir=Path(cfg.train.run_dir) / "cache")  # fmt: skip
    base = sampling_spec(cfg).replace(guidance=args.guidance, grid=args.time_grid)
    labels = torch.arange(args.num_samples) % model.num_classes if model.conditional else None
    out = Path(args.out) if args.out else Path(loaded.source) / "nfe-sweep"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sampler in args.samplers.split(","):
        for budget in (int(b) for b in args.nfe.split(",")):
            spec = base.replace(sampler=sampler, steps=steps_for(sampler, budget))
            images = generate(model, loaded.path, spec, num=args.num_samples, cond=labels, seed=args.seed,
                              device=next(model.parameters()).device, autoencoder=loaded.autoencoder)  # fmt: skip
            fid, ref = fid_against_reference(images, data_dir=Path(cfg.data.path), spec=features,
                                             inception_weights=args.inception_weights)  # fmt: skip
            rows.append(
                {
                    "sampler": sampler,
                    "steps": spec.steps,
                    "nfe": spec.nfe,
                    "fid": round(fid, 4),
                }
            )
            print(
                f"{sampler:>6} steps {spec.steps:>3} NFE {rows[-1]['nfe']:>3}  FID {fid:9.4f}",
                flush=True,
            )
    with open(out / "nfe_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    header = (f"FID ({features.name} features, {args.num_samples} samples vs {ref['num_reference']} reference, "
              f"{base.grid} time grid, guidance {base.guidance}, {loaded.weights} weights, step {loaded.step})")  # fmt: skip
    md = [header, "", "| sampler | steps | NFE | FID |", "| --- | --- | --- | --- |"]
    md += [f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']} |" for r in rows]
    (out / "nfe_sweep.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = [(r["nfe"], r["fid"]) for r in rows if r["sampler"] == sampler]
        ax.plot(*zip(*pts, strict=True), marker="o", label=sampler)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE per sample")
    ax.set_ylabel("FID")
    ax.set_title(f"{features.name} FID vs NFE", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "nfe_sweep.png", dpi=120)
    print("\n".join(md))
    print(f"\nwrote {out / 'nfe_sweep.csv'}, {out / 'nfe_sweep.md'}, {out / 'nfe_sweep.png'}")


if __name__ == "__main__":
    main()
