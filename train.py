"""Train an image generator: `accelerate launch train.py --config configs/digits.yaml [key=value ...]`."""

from fmgen.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
