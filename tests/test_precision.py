"""Mixed precision and torch.compile on the CPU: what runs here of the GPU training paths.

bf16 autocast runs on a CPU as on a GPU. fp16 needs CUDA (Accelerate trains in fp32 without
it), so its GradScaler path is checked through the flag Accelerate sets when the scaler skips a
step. Throughput and memory in bf16 are measured by `bench/train_step.py --preset cifar10` on a
GPU machine.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny
from test_train import latest, run_train, weights


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_bf16_trains_and_resumes_exactly_after_an_fp32_run(shards, tmp_path):
    """One process, two precisions (Accelerate's settings are process-wide); bf16 is really on."""
    n, det = 2, "train.deterministic=true"
    fp32 = run_train(tiny(shards, tmp_path / "fp32", 2 * n, det))
    bf16 = ["train.mixed_precision=bf16", det]
    full = run_train(tiny(shards, tmp_path / "full", 2 * n, *bf16))
    run_train(tiny(shards, tmp_path / "half", n, *bf16))
    run_train(tiny(shards, tmp_path / "half", 2 * n, *bf16), resume="auto")
    (w_full, e_full), (w_half, e_half) = (
        weights(latest(full.run_dir)),
        weights(latest(tmp_path / "half")),
    )
    assert max_diff(w_full, w_half) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(e_full, e_half, strict=True))
    w32, _ = weights(latest(fp32.run_dir))
    # bf16 autocast changes the arithmetic, so the weights differ from fp32, yet stay close and finite
    assert all(torch.isfinite(w).all() for w in w_full.values())
    assert 0.0 < max_diff(w32, w_full) < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of fp16 (GPU: real fp16)")
def test_fp16_on_cpu_warns_and_trains_in_fp32(shards, tmp_path, caplog):
    fp32 = run_train(tiny(shards, tmp_path / "fp32", 2, "train.deterministic=true"))
    with caplog.at_level(logging.WARNING, logger="fmgen.train"):
        fp16 = run_train(
            tiny(
                shards,
                tmp_path / "fp16",
                2,
                "train.deterministic=true",
                "train.mixed_precision=fp16",
            )
        )
    assert any("fp16 needs a GPU" in r.getMessage() for r in caplog.records)
    assert max_diff(weights(latest(fp32.run_dir))[0], weights(latest(fp16.run_dir))[0]) == 0.0


def test_step_skipped_by_the_grad_scaler_is_not_averaged_into_ema(shards, tmp_path, monkeypatch):
    """fp16's GradScaler skips updates with inf/NaN gradients; EMA and the guard must follow."""
    from accelerate import Accelerator

    calls = {"n": 0}

    def skipped(self) -> bool:
        calls["n"] += 1
        return calls["n"] == 2  # the scaler's verdict on the second update

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))
    res = run_train(tiny(shards, tmp_path / "run", 4))
    assert calls["n"] == 4
    state = json.loads((res.checkpoint / "fmgen_state.json").read_text())
    assert state["nonfinite_total"] == 1 and state["nonfinite_streak"] == 0
    extra = json.loads((res.checkpoint / "fmgen_extra.json").read_text())
    assert extra["ema"]["optimization_step"] == 3  # 4 steps, one skipped


class BackwardHalved(torch.nn.Module):
    """A stand-in for a miscompiled model: the right outputs, half the gradient."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = net  # where fmgen finds the prediction type, as with torch.compile

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self._orig_mod(*args, **kwargs)
        return out.detach() + 0.5 * (out - out.detach())


def test_compile_check_refuses_wrong_gradients_and_passes_faithful_ones(
    shards, tmp_path, monkeypatch, caplog
):
    import fmgen.train.loop as tr

    monkeypatch.setattr(tr.torch, "compile", BackwardHalved)
    with pytest.raises(tr.TrainingError, match=r"gradients 50\.0% away from eager"):
        run_train(tiny(shards, tmp_path / "bad", 2, "train.compile=true"))
    # the check can be switched off (a user who knows better), and then training runs
    assert (
        run_train(
            tiny(shards, tmp_path / "off", 2, "train.compile=true", "train.compile_check=false")
        ).step
        == 2
    )
    monkeypatch.setattr(tr.torch, "compile", lambda net: net)  # a faithful "compiler"
    for precision in ("no", "bf16"):
        with caplog.at_level(logging.INFO, logger="fmgen.train"):
            run_train(
                tiny(
                    shards,
                    tmp_path / precision,
                    1,
                    "train.compile=true",
                    f"train.mixed_precision={precision}",
                )
            )
        assert any("torch.compile gradients match" in r.getMessage() for r in caplog.records)
        caplog.clear()


# The torch this project pins for CPU machines (README); its inductor's fused U-Net backward is
# wrong on a CPU, which the compile check must catch.
PINNED_CPU_TORCH = torch.__version__.split("+")[0] == "2.13.0" and not torch.cuda.is_available()


@pytest.mark.slow
def test_real_compile_is_checked_and_its_checkpoints_load_without_compile(
    shards, tmp_path, monkeypatch
):
    """Inductor trains as eager does, or the gradient check refuses it; never a silent wrong run.

    torch 2.13's CPU inductor fuses this U-Net's backward wrongly (the check refuses it);
    without fusion its gradients are right, which lets this test train compiled on a CPU.
    """
    import torch._dynamo
    import torch._inductor.config as inductor

    from fmgen.models import load_model
    from fmgen.train import TrainingError

    common = ["train.deterministic=true", "optim.eps=1e-4"]
    eager = run_train(tiny(shards, tmp_path / "eager", 2, *common))
    w_eager = weights(latest(eager.run_dir))[0]

    torch._dynamo.reset()
    if PINNED_CPU_TORCH:  # measured: the check refuses inductor's default fusion on this torch
        with pytest.raises(TrainingError, match="train.compile=false"):
            run_train(tiny(shards, tmp_path / "default", 2, *common, "train.compile=true"))
    else:  # another torch or a GPU: the outcome is that torch's, but never a silent wrong run
        try:
            default = run_train(
                tiny(shards, tmp_path / "default", 2, *common, "train.compile=true")
            )
        except TrainingError as e:
            assert "train.compile=false" in str(e)
        else:
            assert max_diff(w_eager, weights(latest(default.run_dir))[0]) < 1e-4

    torch._dynamo.reset()  # compiled code is cached per model class, not per inductor setting
    monkeypatch.setattr(inductor, "max_fusion_size", 1)
    compiled = run_train(tiny(shards, tmp_path / "compiled", 2, *common, "train.compile=true"))
    w_comp = weights(latest(compiled.run_dir))[0]
    assert w_comp.keys() == w_eager.keys()  # no torch.compile prefix in the checkpoint
    assert max_diff(w_eager, w_comp) < 1e-4
    raw = load_model(compiled.checkpoint, weights="raw")
    for k, v in raw.model.state_dict().items():
        assert torch.equal(v, w_comp[k])
    more = run_train(tiny(shards, tmp_path / "compiled", 3, *common), resume="auto")
    assert more.step == 3
    torch._dynamo.reset()
