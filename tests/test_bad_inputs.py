"""Bad command-line and config inputs: each ends in one line naming the value and the fix,
exit status 2, no traceback, and nothing written.

The table runs the commands' ``main`` in this process (argparse's own errors exit 2 with a
usage line and one ``error:`` line). ``pytest -s`` prints input | message for every row.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DIGITS
from PIL import Image

from fmgen.cli.ema import main as ema_main
from fmgen.cli.evaluate import main as eval_main
from fmgen.cli.index import main as index_main
from fmgen.cli.prepare import main as prepare_main
from fmgen.cli.sample import main as sample_main
from fmgen.cli.train import main as train_main

COMMANDS = {"train": train_main, "sample": sample_main, "eval": eval_main, "prepare": prepare_main,
            "index": index_main, "ema": ema_main}  # fmt: skip
EMA = ["--run", "{run}", "--sigma-rel", "0.1", "--out"]
CFG = ["--dry-run", "--config", str(DIGITS)]  # checked like a real start, nothing trained
IMGS = ["--images", "{tmp}/imgs", "--data", "{shards}"]  # three 8x8 images, digits' shape
RUN = ["--config", str(DIGITS), "train.run_dir={tmp}/run", "eval.report=", "logging.wandb=false"]

CASES = [
    # (command, arguments, a word the message must hold)
    ("train", ["--config", "nope.yaml"], "nope.yaml"),
    ("train", [*CFG, "train.bach_size=1"], "train.bach_size"),
    ("train", [*CFG, "train.batch_size=abc"], "train.batch_size"),
    ("train", [*CFG, "train.batch_size=-8"], "train.batch_size"),
    ("train", [*CFG, "train.batch_size=15", "train.grad_accum=2"], "train.grad_accum"),
    ("train", [*CFG, "train.total_images=0"], "train.total_images"),
    ("train", [*CFG, "train.seed=-1"], "train.seed"),
    ("train", [*CFG, "optim.lr=nan"], "optim.lr"),
    ("train", [*CFG, "optim.lr=.inf"], "optim.lr"),
    ("train", [*CFG, "optim.eps=0"], "optim.eps"),
    ("train", [*CFG, "optim.betas=[0.9,1.5]"], "optim.betas"),
    ("train", [*CFG, "sample.guidance=-1"], "sample.guidance"),
    ("train", [*CFG, "sample.guidance=nan"], "sample.guidance"),
    ("train", [*CFG, "sample.steps=0"], "sample.steps"),
    ("train", [*CFG, "sample.t_start=1.0"], "sample.t_start"),
    ("train", [*CFG, "model.type=vit"], "model.type"),
    ("train", [*CFG, "model.type=dit", "model.dit.patch_size=3"], "model.dit.patch_size"),
    ("train", [*CFG, "model.type=dit", "model.dit.patch_size=0"], "model.dit.patch_size"),
    ("train", [*CFG, "model.type=dit", "model.dit.width=130"], "model.dit.heads"),
    ("train", [*CFG, "model.type=dit", "model.dit.width=30", "model.dit.heads=3"], "model.dit.width"),
    ("train", [*CFG, "model.type=dit", "model.dit.heads=0"], "model.dit.heads"),
    ("train", [*CFG, "model.type=dit", "model.dit.depth=0"], "model.dit.depth"),
    ("train", [*CFG, "model.type=dit", "model.dit.dropout=1"], "model.dit.dropout"),
    ("train", [*CFG, "model.dit.depht=2"], "model.dit.depht"),
    ("train", [*CFG, "model.unet.attention_levels=[9]"], "model.unet.attention_levels"),
    ("train", [*CFG, "model.block_out_channels=[8,16]"], "model.block_out_channels"),
    ("train", [*CFG, "model.p_uncond=1"], "model.p_uncond"),
    ("train", [*CFG, "data.resolution=10"], "data.resolution"),
    ("train", [*CFG, "data.channels=2"], "data.channels"),
    ("train", [*CFG, "data.source=s3"], "data.source"),
    ("train", [*CFG, "data.shuffle_buffer=-1"], "data.shuffle_buffer"),
    ("train", [*CFG, "loss.t_min=0.7"], "loss.t_min"),
    ("train", [*CFG, "loss.scale=0"], "loss.scale"),
    ("train", [*CFG, "path.b0=-1"], "path.b0"),
    ("train", [*CFG, "eval.feature_network=clip"], "eval.feature_network"),
    ("train", [*CFG, "eval.feature_network=dinov2"], "eval.feature_network_path"),
    ("train", [*CFG, "eval.precision_recall_k=-1"], "eval.precision_recall_k"),
    ("train", [*CFG, "eval.report=imagenet"], "eval.report"),
    ("train", [*CFG, "eval.fid_num_samples=0"], "eval.fid_num_samples"),
    ("train", [*CFG, "eval.fid_every_images=1000", "eval.fid_num_samples=100"], "eval.fid_num_samples"),
    ("train", [*CFG, "ema.half_life_images=0"], "ema.half_life_images"),
    ("train", [*CFG, "ema.posthoc_sigma_rels=[0.05,0.3]"], "ema.posthoc_sigma_rels[1]"),
    ("train", [*CFG, "ema.posthoc_sigma_rels=[0.1,0.1]"], "twice"),
    ("train", [*CFG, "ema.posthoc_sigma_rels=[0]"], "ema.posthoc_sigma_rels[0]"),
    ("train", [*CFG, "ema.posthoc_every_images=0"], "ema.posthoc_every_images"),
    ("train", [*CFG, "train.mixed_precision=fp8"], "train.mixed_precision"),
    ("train", [*CFG, "noequals"], "section.key=value"),
    ("train", [*CFG, "data.fit=stretch"], "data.fit"),
    ("train", [*CFG, "data.path=[a,b]"], "data.source=webdataset"),
    ("train", [*CFG, "data.source=webdataset", "data.num_classes=-1"], "data.num_classes"),
    ("train", [*CFG, "data.source=webdataset", "data.path=pipe:cat a.tar b: c"], "quote"),
    ("train", [*RUN, "data.path={foreign}"], "data.source=webdataset"),
    ("train", [*CFG, "model.autoencoder={tmp}/nothing"], "no such folder"),
    ("train", [*CFG, "model.autoencoder={foreign}"], "no AutoencoderKL config"),
    ("train", [*CFG, "model.autoencoder={export}/backbone"], "'UNet2DModel'"),
    ("train", [*RUN, "data.source=webdataset", "data.path={tmp}/nothing/x-{{0..3}}.tar"], "do not exist"),
    ("train", [*RUN, "data.source=webdataset", "data.path={foreign}"], "cannot read the shard"),
    ("index", ["{tmp}/nothing", "--out", "{tmp}/i"], "do not exist"),
    ("index", ["{tmp}", "--out", "{tmp}/i"], "holds no shards"),
    ("index", ["{foreign}", "--out", "{tmp}/i", "--workers", "0"], "--workers"),
    ("sample", ["--checkpoint", "{tmp}/nothing"], "not an fmgen checkpoint"),
    ("sample", ["--checkpoint", "{run}", "--labels", "3,12"], "12"),
    ("sample", ["--checkpoint", "{run}", "--labels", "a,b"], "--labels"),
    ("sample", ["--checkpoint", "{run}", "--steps", "0"], "--steps"),
    ("sample", ["--checkpoint", "{run}", "--steps", "-3"], "--steps"),
    ("sample", ["--checkpoint", "{run}", "--guidance", "nan"], "--guidance"),
    ("sample", ["--checkpoint", "{run}", "--guidance", "-1"], "--guidance"),
    ("sample", ["--checkpoint", "{run}", "--guidance", "inf"], "--guidance"),
    ("sample", ["--checkpoint", "{run}", "--sde-sigma", "-1"], "--sde-sigma"),
    ("sample", ["--checkpoint", "{run}", "--t-start", "1.5"], "--t-start"),
    ("sample", ["--checkpoint", "{run}", "--sampler", "ddim"], "--sampler"),
    ("sample", ["--checkpoint", "{run}", "--per-class", "0"], "--per-class"),
    ("sample", ["--checkpoint", "{run}", "--num-samples", "0"], "--num-samples"),
    ("sample", ["--checkpoint", "{run}", "--num-samples", "-5"], "--num-samples"),
    ("sample", ["--checkpoint", "{run}", "--grid-max", "0"], "--grid-max"),
    ("sample", ["--checkpoint", "{run}", "--seed", "-1"], "--seed"),
    ("sample", ["--checkpoint", "{run}", "--device", "cuda:7"], "--device"),
    ("sample", ["--checkpoint", "{run}", "--device", "tpu"], "--device"),
    ("sample", ["--checkpoint", "{run}", "--out", "/proc/nope/g.png"], "--out"),
    ("sample", ["--checkpoint", "{export}", "--weights", "raw"], "EMA"),
    ("eval", ["--images", "{tmp}"], "--data"),
    ("eval", ["--images", "{tmp}/nothing", "--data", "{shards}"], "not a folder"),
    ("eval", ["--images", "{tmp}", "--data", "{shards}"], "no .png"),
    ("eval", ["--checkpoint", "{run}", "--num-samples", "0"], "0"),
    ("eval", ["--checkpoint", "{run}", "--num-samples", "100"], "128"),
    ("eval", ["--checkpoint", "{run}", "--steps", "0"], "--steps"),
    ("eval", ["--checkpoint", "{run}", "--seed", "-2"], "--seed"),
    ("eval", ["--checkpoint", "{run}", "--feature-network", "clip"], "--feature-network"),
    ("eval", ["--checkpoint", "{run}", "--precision-recall-k", "-1"], "--precision-recall-k"),
    ("eval", [*IMGS, "--feature-network", "clip"], "--feature-network"),
    ("eval", [*IMGS, "--feature-network", "dinov2"], "--feature-network-path"),
    ("eval", [*IMGS, "--feature-network", "dinov2:{tmp}/nothing"], "does not exist"),
    ("eval", [*IMGS, "--feature-network", "dinov2:{tmp}"], "config.json"),
    ("eval", [*IMGS, "--feature-network", "module:{tmp}/nothing.py:make"], "does not exist"),
    ("eval", [*IMGS, "--feature-network", "module:{tmp}/nofactory.py:make"], "no function make"),
    ("eval", [*IMGS, "--feature-network", "module:{tmp}/wrong.py:make"], "(B, D)"),
    ("eval", [*IMGS, "--feature-network", "{tmp}/junk.pt"], "not a TorchScript archive"),
    ("eval", [*IMGS, "--feature-network-path", "{tmp}"], "needs none"),
    ("ema", [*EMA, "{tmp}/e"], "no post-hoc EMA snapshots"),
    ("ema", ["--run", "{tmp}/nothing", "--sigma-rel", "0.1", "--out", "{tmp}/e"], "--run"),
    ("ema", ["--run", "{run}", "--sigma-rel", "0.3", "--out", "{tmp}/e"], "--sigma-rel"),
    ("ema", ["--run", "{run}", "--sigma-rel", "0", "--out", "{tmp}/e"], "--sigma-rel"),
    ("ema", ["--run", "{run}", "--sigma-rel", "nan", "--out", "{tmp}/e"], "--sigma-rel"),
    ("ema", ["--run", "{run}", "--sigma-rel", "abc", "--out", "{tmp}/e"], "--sigma-rel"),
    ("ema", [*EMA, "{tmp}/e", "--images", "0"], "--images"),
    ("ema", [*EMA, "/proc/nope/e"], "--out"),
    ("ema", [*EMA, "{foreign}"], "not an fmgen export"),
    ("ema", [*EMA, "{run}"], "choose a new folder"),
    ("prepare", ["--source", "folder", "--out", "{tmp}/p"], "--source-path"),
    ("prepare", ["--source", "folder", "--source-path", "{tmp}/nothing", "--out", "{tmp}/p"], "does not exist"),
    ("prepare", ["--resolution", "0", "--out", "{tmp}/p"], "resolution"),
    ("prepare", ["--resolution", "-4", "--out", "{tmp}/p"], "resolution"),
    ("prepare", ["--samples-per-shard", "0", "--out", "{tmp}/p"], "samples per shard"),
    ("prepare", ["--max-shard-mb", "0", "--out", "{tmp}/p"], "max shard size"),
    ("prepare", ["--holdout-fraction", "1.5", "--out", "{tmp}/p"], "holdout fraction"),
    ("prepare", ["--holdout-fraction", "nan", "--out", "{tmp}/p"], "holdout fraction"),
    ("prepare", ["--format", "jpg", "--jpeg-quality", "500", "--out", "{tmp}/p"], "JPEG quality"),
    ("prepare", ["--seed", "-1", "--out", "{tmp}/p"], "seed"),
    ("prepare", ["--out", "{shards}"], "--overwrite"),
    ("prepare", ["--out", "{foreign}"], "did not write"),
    ("prepare", ["--source", "hf", "--source-path", "{tmp}/nothing", "--out", "{tmp}/p"], "could not load"),
    ("prepare", ["--autoencoder", "{tmp}/nothing", "--out", "{tmp}/p"], "no such folder"),
    ("prepare", ["--autoencoder", "{foreign}", "--out", "{tmp}/p"], "no AutoencoderKL config"),
    ("prepare", ["--source", "shards", "--data-path", "{shards}", "--out", "{tmp}/p"], "--autoencoder"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "argv", "needle"), CASES, ids=[f"{c}:{' '.join(a)[-48:]}" for c, a, _ in CASES]
)
def test_bad_input_is_one_clear_line(command, argv, needle, tiny_run, shards, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-000000.tar").write_bytes(b"somebody's shard")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 80 * i, dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png"
        )
    (tmp_path / "nofactory.py").write_text("import torch\n")
    (tmp_path / "wrong.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Identity()\n"
    )
    (tmp_path / "junk.pt").write_bytes(b"not an archive")
    where = {"run": tiny_run.run_dir, "export": tiny_run.export_dir, "shards": shards,
             "tmp": tmp_path, "foreign": foreign}  # fmt: skip
    args = [a.format(**where) for a in argv]
    try:
        code = COMMANDS[command](args)
    except SystemExit as e:  # argparse: usage + one error line
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    print(f"\n{command} {' '.join(argv)} | {errors[-1] if errors else err.strip()}")
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert needle in errors[0], errors[0]
    assert (foreign / "train-000000.tar").read_bytes() == b"somebody's shard"
    assert not (tmp_path / "p" / "manifest.json").exists()
