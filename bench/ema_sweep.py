"""Quality against the EMA width: post-hoc EMA (EDM2) of one run, rebuilt for many sigma_rel.

    python bench/ema_sweep.py                                  # trains a short default job first
    python bench/ema_sweep.py --run runs/digits                # a run that tracked ema.posthoc_sigma_rels
    python bench/ema_sweep.py train.total_images=56320         # overrides of the training it starts

Without snapshots in --run it first trains configs/digits.yaml (or --config) into --run with
post-hoc tracking on and the overrides below (a shorter run than the default job's 440 steps),
and prints those settings. Then, for every --sigma-rels value, it rebuilds the power-function
EMA from the snapshots (``fmgen.models.posthoc.reconstruct_ema``) and judges it with the default
job's digits judge (``eval.report: digits``): FD with digits-classifier features of guided and
unconditional samples against the train split, beside its floor (a held-out real split), and
guided accuracy. The run's usual EMA (a half-life in images) and its raw weights are judged
alongside. Every row uses the same sampling options, seeds and sample count. Writes
``ema_sweep.csv`` and ``ema_sweep.md`` into --out (default: <run>/ema-sweep).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

TRAIN = [
    "train.total_images=25600",  # 200 steps of 128: a short run, enough to order the widths
    "ema.posthoc_sigma_rels=[0.05,0.1]",  # EDM2's two tracked profiles
    "ema.posthoc_every_images=1280",  # 20 snapshots
    "eval.report=",  # judged below, once per width
    "logging.wandb=false",
]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", default="runs/ema-sweep", help="run folder (trained here if it has no snapshots)")  # fmt: skip
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--sigma-rels", default="0.02,0.03,0.05,0.07,0.1,0.13,0.16,0.2,0.25")
    p.add_argument("--num-samples", type=int, default=500, help="samples per FD (eval.report_samples)")  # fmt: skip
    p.add_argument("--out", default=None)
    p.add_argument(
        "overrides", nargs="*", help="overrides of the training, after the defaults above"
    )
    args = p.parse_args()

    from fmgen.config import load_config, make_path
    from fmgen.eval import REPORTS
    from fmgen.models import load_model
    from fmgen.models.posthoc import list_snapshots, reconstruct_ema

    run = Path(args.run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not list_snapshots(run):
        from fmgen.base import setup_logging
        from fmgen.train import train

        setup_logging()
        overrides = [*TRAIN, f"train.run_dir={run}", *args.overrides]
        cfg = load_config(args.config, overrides)
        print(f"training {args.config} with {' '.join(overrides)}", flush=True)
        print(train(cfg).summary(), flush=True)
    snaps = list_snapshots(run)
    profiles = sorted({s for snap in snaps for s in snap.sigma_rels})
    judge = REPORTS["digits"]

    def judged(model, cfg, autoencoder):
        cfg.eval.report_samples = args.num_samples
        return judge.run(model, make_path(cfg), cfg, autoencoder=autoencoder, device=device)

    rows = []
    usual = load_model(run, device=device)
    raw = load_model(run, weights="raw", device=device)
    cfg = usual.config
    print(
        f"run {run}: {snaps[-1].step} steps, {snaps[-1].images} images, {len(snaps)} snapshots of "
        f"sigma_rel {', '.join(map(str, profiles))}; usual EMA half-life {cfg.ema.half_life_images} "
        f"images; judge: digits, {args.num_samples} samples, {cfg.sample.sampler} "
        f"{cfg.sample.steps} steps, guidance {cfg.sample.guidance}",
        flush=True,
    )
    print(f"{'weights':>22} {'gamma':>7} {'fit err':>8} {'FD guided':>10} {'FD uncond':>10} "
          f"{'floor':>6} {'guided acc':>10}", flush=True)  # fmt: skip
    candidates = [(f"sigma_rel {s}", float(s)) for s in args.sigma_rels.split(",")]
    candidates += [(f"half-life {cfg.ema.half_life_images}", usual), ("raw (no EMA)", raw)]
    for name, what in candidates:
        if isinstance(what, float):
            rec = reconstruct_ema(run, what)
            model, mcfg, ae, gamma, err = rec.model.to(device), rec.config, rec.autoencoder, rec.gamma, rec.profile_error  # fmt: skip
        else:
            model, mcfg, ae, gamma, err = what.model, what.config, what.autoencoder, float("nan"), float("nan")  # fmt: skip
        q = judged(model, mcfg, ae)
        row = {"weights": name, "gamma": round(gamma, 3), "profile_error": float(f"{err:.2e}"),
               "fd_guided": round(q["fid_guided_vs_train"], 3),
               "fd_unconditional": round(q["fid_unconditional_vs_train"], 3),
               "fd_floor": round(q["fid_heldout_vs_train"], 3),
               "guided_accuracy": round(q["guided_accuracy"], 4)}  # fmt: skip
        rows.append(row)
        print(f"{name:>22} {gamma:7.2f} {err:8.1e} {row['fd_guided']:10.2f} "
              f"{row['fd_unconditional']:10.2f} {row['fd_floor']:6.2f} {row['guided_accuracy']:10.3f}",
              flush=True)  # fmt: skip

    out = Path(args.out) if args.out else run / "ema-sweep"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ema_sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["| weights | gamma | profile error | FD guided | FD unconditional | FD floor | guided accuracy |",
          "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    md += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    (out / "ema_sweep.md").write_text("\n".join(md) + "\n")
    best = min(
        (r for r in rows if r["weights"].startswith("sigma_rel")), key=lambda r: r["fd_guided"]
    )
    print(f"best post-hoc width: {best['weights']} (FD guided {best['fd_guided']}, profile error "
          f"{best['profile_error']}: above ~0.05 the width lies outside what the profiles cover); "
          f"wrote {out / 'ema_sweep.csv'}, {out / 'ema_sweep.md'}")  # fmt: skip


if __name__ == "__main__":
    main()
