"""``python -m fmgen.ema ...``: the same command as ``fmgen ema ...`` (``fmgen.cli.ema``)."""

from fmgen.cli.ema import main

if __name__ == "__main__":
    raise SystemExit(main())
