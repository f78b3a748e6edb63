"""Config schema: presets load, overrides apply with types, bad keys/values fail naming the key."""

from pathlib import Path

import pytest

from fmgen.config import Config, ConfigError, config_from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"digits.yaml", "cifar10.yaml"}


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        ROOT / "configs/digits.yaml",
        [
            "train.batch_size=64",
            "optim.lr=1e-3",
            "model.unet.block_out_channels=[16,32]",
            "logging.wandb=false",
        ],
    )
    assert cfg.train.batch_size == 64 and isinstance(cfg.train.batch_size, int)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.unet.block_out_channels == [16, 32]
    assert cfg.logging.wandb is False


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.bach_size=3", "train.bach_size"),
        ("trian.batch_size=3", "trian"),
        ("train.batch_size=abc", "train.batch_size"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("logging.wandb=maybe", "logging.wandb"),
        ("path.name=vp", "path.name"),
        ("loss.name=mse", "loss.name"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("model.prediction_type=noise", "model.prediction_type"),
        ("sample.time_grid=karras", "sample.time_grid"),
        ("train.batch_size=0", "train.batch_size"),
        ("model.p_uncond=1.5", "model.p_uncond"),
        ("model.unet.attention_levels=[7]", "model.unet.attention_levels"),
        ("model.unet.block_out_channels=[12,16]", "model.unet.block_out_channels"),
        ("model.block_out_channels=[8,16]", "model.block_out_channels"),
        ("data.resolution=10", "data.resolution"),
        ("model.type=transformer", "model.type"),
        ("data.source=s3", "data.source"),
        ("eval.feature_network=clip", "eval.feature_network"),
        ("eval.report=imagenet", "eval.report"),
        ("sample.guidance=nan", "sample.guidance"),
        ("optim.lr=.inf", "optim.lr"),
        ("sample.steps=0", "sample.steps"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    """Every check of a config, the schema's and those of the layers above it (train runs all)."""
    from fmgen.train import check_config

    with pytest.raises(ConfigError, match=None) as err:
        check_config(load_config(ROOT / "configs/digits.yaml", [override]))
    assert needle in str(err.value)


def test_layer_checks_run_before_training(tmp_path):
    """A bad backbone option fails in train() before any data or run folder is touched."""
    from fmgen.train import train

    cfg = load_config(ROOT / "configs/digits.yaml", [f"train.run_dir={tmp_path / 'run'}",
                                                      f"data.path={tmp_path / 'data'}",
                                                      "model.unet.attention_levels=[5]"])  # fmt: skip
    with pytest.raises(ConfigError, match="model.unet.attention_levels"):
        train(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_digits_report_needs_digits_data():
    from fmgen.train import check_config

    with pytest.raises(ConfigError, match="eval.report='digits' judges data.source digits"):
        check_config(load_config(ROOT / "configs/digits.yaml", ["data.source=folder"]))
    check_config(load_config(ROOT / "configs/digits.yaml", ["data.source=folder", "eval.report="]))


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.bach_size=3"])
    assert "batch_size" in str(err.value)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_with_unknown_section_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config(bad)


def test_dry_run_prints_resolved_config(capsys):
    from fmgen.cli.train import main as train_main

    assert (
        train_main(["--config", str(ROOT / "configs/digits.yaml"), "train.seed=7", "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert "seed: 7" in out and "batch_size: 128" in out


def test_cli_reports_config_errors_without_traceback(capsys):
    from fmgen.cli.train import main as train_main

    assert (
        train_main(
            ["--config", str(ROOT / "configs/digits.yaml"), "train.bach_size=1", "--dry-run"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train.bach_size" in err and "Traceback" not in err


@pytest.mark.parametrize("word", ["no", "bf16", "fp16"])
def test_mixed_precision_words_stay_strings(word, tmp_path):
    """`no` is a documented value: YAML 1.1 would read it as False, on the command line and in files."""
    cfg = load_config(ROOT / "configs/cifar10.yaml", [f"train.mixed_precision={word}"])
    assert cfg.train.mixed_precision == word
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  mixed_precision: {word}\n")
    assert load_config(f).train.mixed_precision == word
    assert config_from_dict(to_dict(load_config(f))).train.mixed_precision == word


@pytest.mark.parametrize(
    ("word", "value"), [("true", True), ("off", False), ("Yes", True), ("false", False)]
)
def test_boolean_options_take_true_false_and_yes_no_words(word, value):
    assert load_config(None, [f"logging.wandb={word}"]).logging.wandb is value
