"""Train an image generator: `accelerate launch train.py --config configs/digits.yaml [key=value ...]`."""

from fmgen.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
