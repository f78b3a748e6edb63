"""Quality against images seen, for several training recipes side by side, over several seeds.

    python bench/recipe.py                                   # the digits: the default's choice
    python bench/recipe.py --recipe base= --recipe fast="train.batch_size=64 ema.half_life_images=5000" \\
        --seeds 0,1,2 --total-images 56320 --eval-every 14080

A recipe is NAME=OVERRIDES: config overrides (key=value, space-separated) on top of --config.
Each (recipe, seed) trains once with ``train.seed`` = seed, keeping a checkpoint every
--eval-every images; every checkpoint's EMA weights are then scored:

- with ``eval.report`` set in the config (``digits``, ``digits-text``): the report's judge
  accuracy (guided class samples, or prompts of held-out caption templates), its FD of guided and
  unconditional samples in the judge's features against the training split, precision/recall
  (k = ``eval.precision_recall_k``) and the largest unconditional class;
- with --feature-network (any data set): FD and precision/recall of guided and unconditional
  samples against the data's reference statistics in that network's features.

Every checkpoint is scored with each --sampling (SAMPLER,GRID,STEPS) that applies to it: a
MeanFlow model (``loss.name=meanflow``) with ``meanflow,uniform,1`` and ``meanflow,uniform,2`` (1
and 2 network calls a sample) beside the other recipes' ODE solver; ``meanflow`` is skipped for
models of the instantaneous velocity. Guidance is each recipe's ``sample.guidance``.

    python bench/recipe.py --recipe default= --recipe meanflow="loss.name=meanflow loss.loc=0.4 \
        loss.meanflow_guidance=2 sample.guidance=1 train.total_images=112640" \
        --sampling heun,uniform,20 meanflow,uniform,1 meanflow,uniform,2 --eval-every 28160

Writes recipe.json (every number, per seed), recipe.md (mean +- std over seeds at each images
seen, a row per recipe and sampling) and recipe.png (FD and accuracy against images seen) into
--out. Runs --jobs trainings at once (each with one torch thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The digits default's choice (README "Recipe"): the recipe it had until 2026-12 against
# logit-normal time sampling, at the default job's images and at half of them, 3 seeds.
DEFAULT_RECIPES = {
    "uniform-56k": "loss.time_sampling=uniform train.total_images=56320",
    "logit-normal-56k": "loss.time_sampling=logit-normal train.total_images=56320",
    "logit-normal-28k": "loss.time_sampling=logit-normal train.total_images=28160",
}
METRICS = ("accuracy", "fd_guided", "fd_uncond", "precision", "recall", "max_class")


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name.isidentifier() and not name.replace("-", "").isalnum():
        raise SystemExit(f"--recipe {text!r}: expected NAME=OVERRIDES, e.g. fast=\"train.batch_size=64\"")
    return name, shlex.split(overrides)


def train_command(args: argparse.Namespace, overrides: list[str], seed: int, run_dir: Path) -> list[str]:
    # a recipe may set its own train.total_images (a shorter schedule): it comes after the default
    return [sys.executable, str(ROOT / "train.py"), "--config", args.config,
            f"train.total_images={args.total_images}", *overrides, f"train.seed={seed}",
            f"train.run_dir={run_dir}", f"train.checkpoint_every_images={args.eval_every}",
            "train.keep_checkpoints=1000", "eval.report=", "logging.wandb=false",
            "train.sample_every_images=0", f"data.path={args.data}", "train.cpu_threads=1"]  # fmt: skip


def score_checkpoint(ckpt: Path, args: argparse.Namespace, report: str) -> list[dict]:
    """The numbers of one checkpoint's EMA weights (see the module docstring), one row per
    --sampling that applies to the model."""
    from fmgen.models import load_model

    loaded = load_model(ckpt, weights="ema")
    images = json.loads((ckpt / "fmgen_state.json").read_text())["images"]
    rows = []
    for sampling in args.sampling:
        sampler, grid, steps = sampling.split(",")
        if sampler == "meanflow" and not loaded.model.average:
            continue  # a model of the instantaneous velocity: no average to step with
        cfg = loaded.config
        # every recipe is scored with the same solvers, whatever its config samples with
        cfg.sample.sampler, cfg.sample.time_grid, cfg.sample.steps = sampler, grid, int(steps)
        rows.append({"images": images, "sampling": sampling, **_scores(loaded, args, report)})
    return rows


def _scores(loaded, args: argparse.Namespace, report: str) -> dict:
    import torch

    from fmgen.config import sampling_spec
    from fmgen.eval import feature_spec, generate, run_report, score_against_reference

    cfg, model = loaded.config, loaded.model
    cfg.eval.report_samples = args.num_samples
    cfg.train.run_dir = args.out  # the judge is trained once and cached for every run
    out: dict = {"nfe": sampling_spec(cfg).nfe}
    if report and not args.feature_network:
        q = run_report(report, model, loaded.path, cfg, autoencoder=loaded.autoencoder)
        guided = "guided" if report == "digits" else "held_out_prompts"
        acc = q.get("guided_accuracy", q.get("held_out_prompts_accuracy"))
        out.update({"accuracy": acc, "fd_guided": q.get(f"fid_{guided}_vs_train"),
                    "fd_uncond": q["fid_unconditional_vs_train"],
                    "fd_floor": q["fid_heldout_vs_train"],
                    "precision": q.get("precision_unconditional"),
                    "recall": q.get("recall_unconditional"),
                    "max_class": q["unconditional_max_fraction"]})  # fmt: skip
        return out
    spec = feature_spec(args.feature_network or cfg.eval.feature_network,
                        path=args.feature_network_path, resolution=cfg.data.resolution,
                        channels=cfg.data.channels, cache_dir=Path(args.out) / "cache")  # fmt: skip
    base = sampling_spec(cfg)
    n = args.num_samples
    sets = {"uncond": (base.replace(guidance=1.0), model.conditioning.null(n))}
    if model.conditional and model.num_classes:
        sets["guided"] = (base, torch.arange(n) % model.num_classes)
    for name, (spec_s, cond) in sets.items():
        images = generate(model, loaded.path, spec_s, num=n, cond=cond, seed=1,
                          autoencoder=loaded.autoencoder)  # fmt: skip
        s = score_against_reference(images, data_dir=Path(cfg.data.path), spec=spec,
                                    pr_k=cfg.eval.precision_recall_k or 3,
                                    cache_dir=Path(args.out) / "cache", force=True)  # fmt: skip
        out[f"fd_{name}"] = s.fid
        if name == "uncond" and s.pr is not None:
            out["precision"], out["recall"] = s.pr.precision, s.pr.recall
    return out


def run_one(args: argparse.Namespace, name: str, overrides: list[str], seed: int) -> list[dict]:
    """Train one (recipe, seed) in a subprocess, then score its checkpoints in another."""
    run_dir = Path(args.out) / "runs" / f"{name}-s{seed}"
    result = run_dir / "scores.json"
    if result.is_file():  # a rerun of the bench reuses finished runs
        return json.loads(result.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    t0 = time.time()
    log = run_dir.parent / f"{name}-s{seed}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(train_command(args, overrides, seed, run_dir), cwd=ROOT, env=env,
                           stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    if r.returncode:
        raise SystemExit(f"{name} seed {seed}: training failed (exit {r.returncode}); see {log}")
    train_s = time.time() - t0
    score = [sys.executable, __file__, "--score", str(run_dir), *sys.argv[1:]]
    with open(log, "a") as f:
        r = subprocess.run(score, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"{name} seed {seed}: scoring failed (exit {r.returncode}); see {log}")
    rows = json.loads(result.read_text())
    for row in rows:
        row.update(recipe=name, seed=seed, train_s=round(train_s, 1))
    result.write_text(json.dumps(rows, indent=1))
    print(f"{name} seed {seed}: " + "; ".join(
        f"{r['images']} {r['sampling']}: acc {r.get('accuracy')} FD {r.get('fd_uncond'):.1f}"
        for r in rows), flush=True)  # fmt: skip
    return rows


def lines(rows: list[dict], recipes: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The (recipe, sampling) pairs that have rows, recipes in their order."""
    return [(name, s) for name in recipes
            for s in dict.fromkeys(r.get("sampling", "") for r in rows if r["recipe"] == name)]  # fmt: skip


def summarize(rows: list[dict], recipes: dict[str, list[str]]) -> list[str]:
    md = ["| recipe | sampling (NFE) | images | " + " | ".join(METRICS) + " |",
          "| --- | --- | --- |" + " --- |" * len(METRICS)]  # fmt: skip
    for name, sampling in lines(rows, recipes):
        mine = [r for r in rows if r["recipe"] == name and r.get("sampling", "") == sampling]
        for images in sorted({r["images"] for r in mine}):
            at = [r for r in mine if r["images"] == images]
            cells = []
            for m in METRICS:
                vals = [r[m] for r in at if r.get(m) is not None]
                if not vals:
                    cells.append("-")
                    continue
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                digits = 3 if m in ("accuracy", "precision", "recall", "max_class") else 1
                cells.append(f"{statistics.mean(vals):.{digits}f} +- {sd:.{digits}f}")
            nfe = at[0].get("nfe", "?")
            md.append(f"| {name} | {sampling} ({nfe}) | {images} | " + " | ".join(cells) + " |")
    return md


def plot(rows: list[dict], recipes: dict[str, list[str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in ("fd_uncond", "fd_guided", "accuracy") if any(r.get(m) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, m in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
        for name, sampling in lines(rows, recipes):
            mine = [r for r in rows if r["recipe"] == name and r.get("sampling", "") == sampling
                    and r.get(m) is not None]  # fmt: skip
            pts = sorted({r["images"] for r in mine})
            means = [statistics.mean([r[m] for r in mine if r["images"] == i]) for i in pts]
            ax.plot(pts, means, marker="o", label=f"{name} {sampling}")
            for seed in {r["seed"] for r in mine}:
                s = sorted((r["images"], r[m]) for r in mine if r["seed"] == seed)
                ax.plot(*zip(*s, strict=True), alpha=0.25, color=ax.lines[-1].get_color())
        ax.set_xlabel("images seen")
        ax.set_ylabel(m)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--recipe", action="append", default=[], help="NAME=OVERRIDES (repeat)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--total-images", type=int, default=56320)
    p.add_argument("--eval-every", type=int, default=28160)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--sampling", nargs="+", default=["heun,uniform,20"], metavar="SAMPLER,GRID,STEPS",
                   help="the solvers of every score, each where it applies (meanflow: MeanFlow models "
                        "only); the README's figures: heun,uniform,20")
    p.add_argument("--feature-network", default="", help="score with this network instead of the report")
    p.add_argument("--feature-network-path", default="")
    p.add_argument("--data", default=str(ROOT / "data" / "digits-16"), help="the data.path of every run")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-recipe"))
    p.add_argument("--score", default="", help=argparse.SUPPRESS)  # internal: score one run folder
    args = p.parse_args()
    if args.score:
        from fmgen.config import load_config
        from fmgen.models.store import step_folders

        run = Path(args.score)
        report = load_config(args.config).eval.report
        rows = [row for c in step_folders(run / "checkpoints") for row in score_checkpoint(c, args, report)]
        (run / "scores.json").write_text(json.dumps(rows, indent=1))
        return
    for sampling in args.sampling:
        parts = sampling.split(",")
        if len(parts) != 3 or not parts[2].isdigit():
            p.error(f"--sampling {sampling!r}: expected SAMPLER,GRID,STEPS, e.g. meanflow,uniform,1")
    if args.eval_every <= 0 or args.total_images % args.eval_every:
        p.error(f"--eval-every {args.eval_every} must divide --total-images {args.total_images}")
    recipes = dict(map(parse_recipe, args.recipe)) if args.recipe else {
        k: shlex.split(v) for k, v in DEFAULT_RECIPES.items()}  # fmt: skip
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the data once, before parallel trainings would each prepare it
    from fmgen.config import load_config
    from fmgen.data.pipeline import ensure_shards

    cfg = load_config(args.config, [f"data.path={args.data}"])
    ensure_shards(cfg.data, cfg.model.autoencoder)
    jobs = [(name, ov, seed) for seed in seeds for name, ov in recipes.items()]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(args, *j), jobs))
    rows = [r for rs in results for r in rs]
    (out / "recipe.json").write_text(json.dumps({"recipes": {k: " ".join(v) for k, v in recipes.items()},
                                                 "seeds": seeds, "config": args.config,
                                                 "rows": rows}, indent=1))  # fmt: skip
    md = summarize(rows, recipes)
    (out / "recipe.md").write_text("\n".join(md) + "\n")
    plot(rows, recipes, out / "recipe.png")
    print("\n".join(md))
    print(f"\nwrote {out / 'recipe.json'}, {out / 'recipe.md'}, {out / 'recipe.png'}")


if __name__ == "__main__":
    main()
