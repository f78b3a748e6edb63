"""``python -m fmgen.ema`` / ``fmgen ema``: the EMA of any sigma_rel from a run's post-hoc snapshots."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from fmgen.base import FmgenError, setup_logging
from fmgen.cli import run_guarded, writable_dir


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmgen.ema",
        description="Post-hoc EMA (EDM2): rebuild the power-function EMA of any relative width "
        "sigma_rel from the snapshots a run recorded (ema.posthoc_sigma_rels), by least squares, "
        "and export it like RUN/export (sample.py and fmgen.evaluate load it).",
    )
    p.add_argument(
        "--run", required=True, help="the run folder (holds posthoc/images_*.safetensors)"
    )
    p.add_argument(
        "--sigma-rel",
        type=float,
        required=True,
        help="the EMA's width relative to the training length, in (0, 0.2887); EDM2's best lie "
        "around 0.05-0.2 (a half-life EMA has no fixed sigma_rel)",
    )
    p.add_argument(
        "--out", required=True, help="the export folder to write (new, or an fmgen export)"
    )
    p.add_argument(
        "--images",
        type=int,
        default=None,
        help="the EMA as it was after this many images (default: the newest snapshot's)",
    )
    return p


def check_out(out: Path) -> Path:
    """``--out`` is replaced as a whole: only a new or empty folder or an earlier export may be there."""
    empty = out.is_dir() and not any(out.iterdir())
    if out.exists() and not empty and not (out / "fmgen.json").is_file():
        raise FmgenError(
            f"--out {out} exists and is not an fmgen export; it would be replaced: choose a new folder"
        )
    writable_dir(out.parent, "--out")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()

    def go() -> int:
        from fmgen.core.ema import SIGMA_REL_MAX
        from fmgen.models.posthoc import export_reconstruction, reconstruct_ema

        if not (math.isfinite(args.sigma_rel) and 0 < args.sigma_rel < SIGMA_REL_MAX):
            raise FmgenError(
                f"--sigma-rel {args.sigma_rel}: must lie in (0, {SIGMA_REL_MAX:.4f}) (the power "
                f"profile's gamma > 0); e.g. --sigma-rel 0.1"
            )
        if args.images is not None and args.images <= 0:
            raise FmgenError(f"--images must be > 0; got {args.images}")
        run = Path(args.run)
        if not run.is_dir():
            raise FmgenError(f"--run {run}: no such folder; pass a training's train.run_dir")
        out = check_out(Path(args.out))
        rec = reconstruct_ema(run, args.sigma_rel, images=args.images)
        export_reconstruction(rec, out)
        profiles = sorted({s for _, s, _ in rec.weights})
        print(f"post-hoc EMA sigma_rel {rec.sigma_rel:g} (gamma {rec.gamma:.3f}) after {rec.images} "
              f"images from {len({f for f, _, _ in rec.weights})} snapshots of sigma_rel "
              f"{', '.join(f'{s:g}' for s in profiles)}: profile error {rec.profile_error:.2e}; "
              f"exported to {out}")  # fmt: skip
        return 0

    return run_guarded(go)
