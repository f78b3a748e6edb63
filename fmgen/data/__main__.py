"""``python -m fmgen.data prepare ...``: the same command as ``fmgen prepare ...``."""

from fmgen.cli.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
