"""Sample images from a checkpoint: `python sample.py --checkpoint runs/digits --per-class 8`."""

from fmgen.cli.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
