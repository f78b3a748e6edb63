"""``python -m fmgen.evaluate ...``: the same command as ``fmgen eval ...`` (``fmgen.cli.evaluate``)."""

from fmgen.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
