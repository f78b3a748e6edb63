"""Training throughput: the whole pipeline against a bare PyTorch loop, in one run.

The pipeline is `fmgen.train.train` as a user runs it: the streaming shard loader, EMA, the
noise of the global batch, logging (W&B offline) and the non-finite guard. The bare loop trains
the same FlowModel with the same batch on an in-memory tensor with AdamW and the plain CFM
loss, nothing else. Both report steady-state images/s (start-up excluded). Target: ratio >= 0.95.

    python bench/train_step.py                     # digits preset on this machine
    python bench/train_step.py --preset cifar10    # on a CUDA machine: bf16, images/s, peak memory
    python bench/train_step.py --preset cifar10 train.compile=true   # any config override
    python bench/train_step.py --preset imagenet256-latent   # the SiT-B/2-sized DiT (reduced on a CPU)
    python bench/train_step.py --preset text2img-256-latent  # PixArt-alpha-sized text DiT (reduced on a CPU)

Each run also prints the model's FLOPs per training image: torch.utils.flop_counter.FlopCounterMode
over one forward + backward of one image (matmuls, convolutions and attention, 2 FLOPs per
multiply-add; norms, element-wise ops and the optimizer are not counted).

imagenet256-latent: a training step never runs the VAE (the shards hold latents encoded once by
`prepare --autoencoder`), so both loops train the DiT in pixel mode (model.autoencoder unset) on
synthetic 32x32x3 images, which give it the same 256 tokens (2x2 patches) as the 32x32x4 latents
of 256x256 images; its FLOPs are counted on 32x32x4 latents and 1000 classes.
On a CPU (or with --size reduced) the preset is cut down (printed): a SiT-B/2 step of 256 images
takes minutes on a few cores.

text2img-256-latent: the same stand-in images, each with a caption whose T5-XXL-shaped
embeddings (120 tokens of 4096, float16, ~1 MB a sample) are precomputed into the shards by
`prepare --text-encoder` with a one-layer encoder of T5-XXL's width built here (nothing is
downloaded), so the pipeline reads them as it would the real ones; the bare loop feeds
in-memory rows of the same shape.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LATENT = (4, 32, 32)  # an SD-VAE's latents of a 256x256x3 image (factor 8, 4 channels)
# imagenet256-latent on a CPU: 256 tokens and the head width (64) kept, the rest cut down
REDUCED = {"train.batch_size": 16, "model.dit.depth": 2, "model.dit.width": 192,
           "model.dit.heads": 3, "train.mixed_precision": "no", "data.num_workers": 1}  # fmt: skip
T5_XXL = {"d_model": 4096, "max_length": 120}  # the text preset's embeddings: T5-XXL's width


def synthetic_shards(out: Path, resolution: int, channels: int, n: int) -> Path:
    """Random images as an image folder turned into shards (throughput only, no download)."""
    from PIL import Image

    from fmgen.data import prepare

    src = out / "images"
    rng = np.random.default_rng(0)
    for i in range(n):
        d = src / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (resolution, resolution, channels), dtype=np.uint8)
        Image.fromarray(a[..., 0] if channels == 1 else a).save(d / f"{i:06d}.png")
    prepare(
        "folder", out / "shards", resolution=resolution, channels=channels, source_path=str(src)
    )
    return out / "shards"


def t5_like_encoder(out: Path) -> Path:
    """A one-layer T5EncoderModel of T5-XXL's width with a small byte-level tokenizer, saved."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a photo of a cat", "random noise images"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])  # fmt: skip
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="</s>", unk_token="<unk>")  # fmt: skip
    config = transformers.T5Config(vocab_size=len(fast), d_model=T5_XXL["d_model"], d_kv=64,
                                   d_ff=256, num_layers=1, num_heads=2, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    transformers.T5EncoderModel(config).save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


def text_shards(shards: Path, encoder: Path, out: Path) -> Path:
    """``shards`` with a caption per image, encoded by ``encoder`` (prepare --text-encoder)."""
    import webdataset as wds

    from fmgen.cli.prepare import main as prepare_main

    captioned = out.parent / "captioned"
    captioned.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(captioned / "train-%06d.tar"), maxcount=256, verbose=0) as w:
        for i, (img, y) in enumerate(zip(*_images(shards), strict=True)):
            w.write({"__key__": f"{i:08d}", "png": img, "cls": str(int(y)).encode(),
                     "txt": f"random noise image number {i} of class {int(y)}".encode()})  # fmt: skip
    rc = prepare_main(["--source", "webdataset", "--data-path", str(captioned), "--resolution", "32",
                       "--channels", "3", "--num-classes", "10", "--out", str(out), "--text-encoder", str(encoder),
                       "--caption-key", "txt", "--text-max-length", str(T5_XXL["max_length"])])  # fmt: skip
    if rc:
        raise SystemExit("prepare --text-encoder failed")
    return out


def _images(shards: Path) -> tuple[list[bytes], list[int]]:
    import io

    from PIL import Image

    from fmgen.data.pipeline import read_all

    images, labels = read_all(shards)
    pngs = []
    for a in images:
        buf = io.BytesIO()
        u8 = ((a.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(u8).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, labels.tolist()


def conditioning_of(cfg, num_classes: int):
    """The config's conditioning: class labels, or captions of its text encoder."""
    from fmgen.models import ClassLabels, build_conditioning

    return build_conditioning(cfg, num_classes) if cfg.model.text_encoder else ClassLabels(num_classes)


def flops_per_image(cfg, shape: tuple[int, int, int], conditioning) -> int:
    """FlopCounterMode's count of one forward + backward of the config's backbone, one image."""
    from torch.utils.flop_counter import FlopCounterMode

    from fmgen.models.flow import model_spec
    from fmgen.models.text import TextEmbedding

    spec = model_spec(cfg, conditioning)
    net = spec.build(cfg, shape, conditioning)
    x, t, y = torch.randn(1, *shape), torch.rand(1), torch.zeros(1, dtype=torch.long)
    if spec.reads_text:  # T5-XXL-shaped tokens of one caption (all real), its pooled vector
        L, D, P = conditioning.max_length, conditioning.token_dim, conditioning.pooled_dim
        y = TextEmbedding(torch.randn(1, L, D), torch.ones(1, L, dtype=torch.bool), torch.randn(1, P))
    with FlopCounterMode(display=False) as counter:
        spec.call(net, x, t, y).square().mean().backward()
    return counter.get_total_flops()


def bare_loop(
    cfg, images: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int, device: torch.device
) -> float:
    """The same model and batch, trained with nothing but AdamW and the CFM loss (text models:
    random condition rows of the encoder's shape, in memory)."""
    from fmgen.models import build_model

    torch.manual_seed(0)
    conditioning = conditioning_of(cfg, 10)
    model = build_model(cfg, conditioning).to(device)
    if cfg.model.text_encoder:
        labels = conditioning.example(len(images), torch.Generator().manual_seed(0), "cpu")
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.compile(model) if cfg.train.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=cfg.optim.fused or None)
    images, labels = images.to(device), labels.to(device)
    b = cfg.train.batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    t0 = time.perf_counter()
    for step in range(steps + warmup):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (b,), device=device)
        z, y = images[idx].contiguous(memory_format=memory_format), labels[idx]
        t = torch.rand(b, device=device)
        eps = torch.randn_like(z)
        x = t.view(-1, 1, 1, 1) * z + (1 - t.view(-1, 1, 1, 1)) * eps
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = (net(x, t, y).float() - (z - eps)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * b / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset", choices=("digits", "cifar10", "imagenet256-latent", "text2img-256-latent"),
        default="digits",
    )
    p.add_argument("--size", choices=("auto", "full", "reduced"), default="auto",
                   help="imagenet256-latent: auto = reduced on a CPU, full on a GPU")  # fmt: skip
    p.add_argument(
        "--steps", type=int, default=60, help="measured steps of each loop (after warm-up)"
    )
    p.add_argument("--batch", type=int, default=None, help="override train.batch_size")
    p.add_argument("--workers", type=int, default=None, help="override data.num_workers")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for both loops, e.g. train.compile=true train.mixed_precision=fp16",
    )
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    from fmgen.config import load_config
    from fmgen.data.pipeline import read_all
    from fmgen.train import train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        over = [f"train.run_dir={tmp / 'run'}", "eval.report=", "logging.wandb=true",
                "logging.mode=offline", "train.log_every_steps=10"]  # fmt: skip
        latent = args.preset in ("imagenet256-latent", "text2img-256-latent")
        reduced = latent and (args.size == "reduced" or (args.size == "auto" and device.type == "cpu"))
        if args.preset == "text2img-256-latent":  # ~1 MB of embeddings a sample: fewer samples
            shards = synthetic_shards(tmp / "data", 32, 3, 512)
            encoder = t5_like_encoder(tmp / "t5-like")
            shards = text_shards(shards, encoder, tmp / "data" / "text-shards")
            over += [f"model.text_encoder={encoder}", "data.shuffle_buffer=256"]
        elif args.preset in ("cifar10", "imagenet256-latent"):
            shards = synthetic_shards(tmp / "data", 32, 3, 4096)
        if args.preset != "digits":
            over += [
                f"data.path={shards}",
                "data.resolution=32",  # imagenet256-latent: stands in for 32x32x4 latents
                "model.autoencoder=",  # no VAE in a step: its latents are on disk already
                "eval.fid_every_images=0",
                "train.sample_every_images=0",
            ]
            over += [f"{k}={v}" for k, v in REDUCED.items()] if reduced else []
        else:
            over += [f"data.path={tmp / 'digits'}"]
        if args.batch:
            over.append(f"train.batch_size={args.batch}")
        if args.workers is not None:
            over.append(f"data.num_workers={args.workers}")
        preset = ROOT / "configs" / f"{args.preset}.yaml"
        cfg = load_config(preset, [*over, *args.overrides])
        shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        flops = flops_per_image(cfg, shape, conditioning_of(cfg, 10))  # the data's 10 classes
        warm = 5
        total = args.steps + warm
        cfg.train.total_images = total * cfg.train.batch_size
        cfg.train.checkpoint_every_images = 10**12  # only the final checkpoint
        cfg.sample.per_class = 1
        cfg.sample.steps = 2
        result = train(cfg)
        images, labels = read_all(Path(cfg.data.path))
        bare = bare_loop(cfg, images, labels, args.steps, warm, device)
    pipe = result.images_per_s
    if latent:
        full = load_config(preset)
        print(f"\nDiT: depth {cfg.model.dit.depth}, width {cfg.model.dit.width}, "
              f"heads {cfg.model.dit.heads}, patch {cfg.model.dit.patch_size} on "
              f"{cfg.data.channels}x32x32 (256 tokens; stands in for {LATENT[0]}x32x32 latents)")  # fmt: skip
        if reduced:
            print("reduced for this device: " + ", ".join(
                f"{k} {_get(full, k)} -> {_get(cfg, k)}" for k in REDUCED))  # fmt: skip
        if full.model.text_encoder:  # T5-XXL's output shape, no encoder needed to count FLOPs
            from fmgen.models import TextConditioning

            cond = TextConditioning({"kind": "frozen"}, max_length=full.text.max_length,
                                    token_dim=T5_XXL["d_model"], pooled_dim=T5_XXL["d_model"])  # fmt: skip
        else:
            cond = conditioning_of(full, 1000)
        full_flops = flops_per_image(full, LATENT, cond)
        print(f"FLOPs per training image, full preset on {LATENT[0]}x32x32 latents: "
              f"{full_flops / 1e9:.1f} GFLOP (forward + backward)")  # fmt: skip
    print(f"\npreset {args.preset}, device {device}, global batch {cfg.train.batch_size}, "
          f"precision {cfg.train.mixed_precision}, compile {cfg.train.compile}, channels_last {cfg.train.channels_last}, "
          f"{args.steps} measured steps, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'loop':<32}{'images/s':>12}")
    print(f"{'bare PyTorch (in-memory data)':<32}{bare:>12.1f}")
    print(f"{'fmgen pipeline (loader+EMA+log)':<32}{pipe:>12.1f}")
    print(f"ratio pipeline / bare: {pipe / bare:.3f} (target >= 0.95)")
    print(f"FLOPs per training image (this model, forward + backward): {flops / 1e9:.3f} GFLOP; "
          f"bare loop at {bare * flops / 1e12:.3f} TFLOP/s")  # fmt: skip
    if device.type == "cuda":
        print(f"peak GPU memory (pipeline): {result.peak_memory_gb:.2f} GiB")
    if not math.isfinite(pipe):
        raise SystemExit("the pipeline reported no steady-state throughput; raise --steps")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


if __name__ == "__main__":
    main()
