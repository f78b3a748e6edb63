"""FlowPipeline: an export loads as a diffusers pipeline and draws sample.py's images.

The exports are freshly initialised tiny models (``export_tiny``), so no test trains; a random
U-Net is a non-trivial field, enough to tell one sampler, label or seed from another.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_tiny
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image
from torch import nn

from fmgen.base import FmgenError
from fmgen.cli.sample import parser as sample_parser
from fmgen.cli.sample import sample_command
from fmgen.core import SamplingSpec
from fmgen.eval import generate
from fmgen.models import BACKBONES, BackboneSpec, load_model
from fmgen.models.store import DamagedCheckpointError, write_manifest
from fmgen.pipeline import FlowPipeline, PipelineError

LABELS = [3, 3, 7, 0]


@pytest.fixture(scope="module")
def export(tmp_path_factory, one_torch_thread):
    """A class-conditional velocity U-Net on the linear path."""
    return export_tiny(tmp_path_factory.mktemp("pipe") / "run")


@pytest.fixture(scope="module")
def pipe(export):
    p = FlowPipeline.from_pretrained(export)
    p.set_progress_bar_config(disable=True)
    return p


def fmgen_images(source, spec: SamplingSpec, labels, seed: int) -> torch.Tensor:
    """What sample.py draws: generate() on the model load_model gives it."""
    loaded = load_model(source)
    cond = None if labels is None else torch.as_tensor(labels)
    num = len(labels) if labels is not None else 3
    return generate(loaded.model, loaded.path, spec, num=num, cond=cond, seed=seed)


def sample_py_euler(export, tmp_path) -> Path:
    """sample.py's PNGs of LABELS (Euler, 4 steps, guidance 2, seed 7): the folder."""
    out = tmp_path / "s"
    args = sample_parser().parse_args(["--checkpoint", str(export), "--labels", "3,3,7,0",
                                       "--sampler", "euler", "--steps", "4", "--guidance", "2",
                                       "--seed", "7", "--device", "cpu", "--out", str(tmp_path / "g.png"),
                                       "--out-dir", str(out)])  # fmt: skip
    sample_command(args)
    return out


def test_the_export_is_a_diffusers_pipeline_folder(export, pipe):
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == "FlowPipeline"
    assert index["backbone"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["autoencoder"] == [None, None]
    assert isinstance(pipe.backbone, UNet2DModel) and pipe.autoencoder is None
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.invert_sigmas is True
    # the manifest covers the diffusers files: they were written inside the swapped-in folder
    files = json.loads((export / "fmgen_manifest.json").read_text())["files"]
    assert {"model_index.json", "scheduler/scheduler_config.json", "fmgen.json"} <= set(files)
    assert not [p.name for p in export.parent.iterdir() if p.name.startswith(".tmp-")]
    # and load_model still reads the same export
    for a, b in zip(load_model(export).model.parameters(), pipe.backbone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_pipeline_reproduces_sample_py_euler_samples(export, pipe, tmp_path):
    """Same seed, labels, steps and guidance: floats within 1e-5 of generate (what sample.py
    calls), and PIL images byte-equal to the PNGs sample.py writes."""
    kw = {"num_inference_steps": 4, "guidance_scale": 2.0, "seed": 7, "sampler": "euler"}
    spec = pipe.sampling.replace(sampler="euler", steps=4, guidance=2.0)
    want = fmgen_images(export, spec, LABELS, seed=7)  # (4, 1, 8, 8) in [-1, 1]
    pt = pipe(class_labels=LABELS, output_type="pt", **kw).images
    assert pt.shape == (4, 1, 8, 8) and pt.dtype == torch.float32
    assert (pt * 2 - 1 - want).abs().max() <= 1e-5
    arr = pipe(class_labels=LABELS, output_type="np", **kw).images
    assert arr.shape == (4, 8, 8, 1) and np.abs(arr * 2 - 1 - want.permute(0, 2, 3, 1).numpy()).max() <= 1e-5  # fmt: skip
    assert want.std() > 0.1 and not torch.allclose(want[1], want[2], atol=1e-2)  # not vacuous

    out = sample_py_euler(export, tmp_path)
    result = pipe(class_labels=LABELS, **kw)
    assert isinstance(result, ImagePipelineOutput) and len(result.images) == 4
    for i, (img, label) in enumerate(zip(result.images, LABELS, strict=True)):
        assert img.mode == "L" and img.size == (8, 8)
        png = np.asarray(Image.open(out / f"{i:06d}_class{label}.png"))
        assert np.array_equal(np.asarray(img), png)
    (tup,) = pipe(class_labels=LABELS, return_dict=False, output_type="pt", **kw)
    assert torch.equal(tup, pt)


@pytest.mark.parametrize(("path", "prediction"), [("vp-cosine", "eps"), ("vp-linear", "x0")])
def test_any_path_and_prediction_type_samples_as_fmgen_does(tmp_path, path, prediction):
    """The export's own sampler (heun, denoising last step) on other paths and targets."""
    src = export_tiny(tmp_path / "run", f"path.name={path}", f"model.prediction_type={prediction}")
    p = FlowPipeline.from_pretrained(src)
    spec = p.sampling.replace(steps=3, guidance=1.5)
    assert spec.sampler == "heun"
    want = fmgen_images(src, spec, [1, 5], seed=3)
    got = p(class_labels=[1, 5], num_inference_steps=3, guidance_scale=1.5, seed=3, output_type="pt").images  # fmt: skip
    assert (got * 2 - 1 - want).abs().max() <= 1e-5
    sde = SamplingSpec("sde", steps=3, guidance=1.5)  # stochastic: increments from (seed, index)
    got = p(class_labels=[1, 5], sampling=sde, seed=3, output_type="pt").images
    assert (got * 2 - 1 - fmgen_images(src, sde, [1, 5], seed=3)).abs().max() <= 1e-5


def test_labels_by_name_null_labels_and_unconditional_models(export, pipe, tmp_path):
    kw = {"num_inference_steps": 2, "seed": 1, "output_type": "pt"}
    by_name = pipe(class_labels=["digit 3", "digit 7"], **kw).images
    assert torch.equal(by_name, pipe(class_labels=torch.tensor([3, 7]), **kw).images)
    assert pipe(class_labels=7, **kw).images.shape == (1, 1, 8, 8)
    # no labels: the null label, as sample.py --num-samples
    spec = pipe.sampling.replace(steps=2)
    null = fmgen_images(export, spec, [10, 10, 10], seed=1)
    assert (pipe(batch_size=3, **kw).images * 2 - 1 - null).abs().max() <= 1e-5

    src = export_tiny(tmp_path / "u", "model.class_conditional=false")
    u = FlowPipeline.from_pretrained(src)
    got = u(batch_size=3, **kw).images
    assert (got * 2 - 1 - fmgen_images(src, spec, None, seed=1)).abs().max() <= 1e-5
    with pytest.raises(PipelineError, match="unconditional; pass batch_size"):
        u(class_labels=[1], **kw)


def test_seeds_and_generators(pipe):
    kw = {"class_labels": [3, 7], "num_inference_steps": 2, "output_type": "pt"}
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)
    gen = torch.Generator().manual_seed(0)
    first, second = pipe(generator=gen, **kw).images, pipe(generator=gen, **kw).images
    assert torch.equal(first, a) and not torch.allclose(first, second, atol=1e-3)  # it advances
    with pytest.raises(PipelineError, match="seed .* or generator, not both"):
        pipe(seed=1, generator=torch.Generator(), **kw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_labels": [3, 10]}, r"label 10 is outside the model's classes 0\.\.9; for uncond"),
        ({"class_labels": torch.tensor([-1])}, r"label -1 is outside the model's classes 0\.\.9"),
        ({"class_labels": ["seven"]}, "'seven' is not a class of this model; its classes: digit 0"),
        ({"class_labels": [1.5]}, "give class indices or class names"),
        ({"class_labels": []}, "class_labels is empty"),
        ({"class_labels": [1, 2], "batch_size": 3}, "batch_size=3 but 2 class labels"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"output_type": "latent"}, "output_type 'latent': choose one of pil, np, pt"),
        ({"num_inference_steps": 0}, "sampling options: steps must be a whole number >= 1"),
        ({"sampler": "ddim"}, "sampling options: sampler 'ddim' is not one of"),
        ({"seed": -1}, "seed must be a whole number >= 0"),
        ({"generator": [torch.Generator()]}, "generator must be one torch.Generator"),
    ],
)
def test_bad_arguments_are_one_line_errors(pipe, kwargs, message):
    with pytest.raises(FmgenError, match=message) as e:
        pipe(**{"num_inference_steps": 2, **kwargs})
    assert "\n" not in str(e.value)


def test_bad_folders_are_clear_errors(export, tmp_path):
    with pytest.raises(PipelineError, match="not an fmgen export folder"):
        FlowPipeline.from_pretrained(tmp_path)
    old = export_tiny(tmp_path / "old")  # an export as fmgen wrote them before pipelines
    (old / "model_index.json").unlink()
    for f in (old / "scheduler").iterdir():
        f.unlink()
    (old / "scheduler").rmdir()
    write_manifest(old)
    assert load_model(old).step == 0
    with pytest.raises(PipelineError, match="has no model_index.json: an export written before"):
        FlowPipeline.from_pretrained(old)
    damaged = export_tiny(tmp_path / "damaged")
    index = damaged / "model_index.json"
    index.write_text(index.read_text().replace("UNet2DModel", "UNet2DModeX"))
    with pytest.raises(DamagedCheckpointError, match="model_index.json is damaged"):
        FlowPipeline.from_pretrained(damaged)
    with pytest.raises(PipelineError, match="samples in pixel space"):
        FlowPipeline.from_loaded(load_model(export), autoencoder=nn.Identity())
    with pytest.raises(PipelineError, match="knows no fmgen export"):
        FlowPipeline(backbone=load_model(export).model.backbone,
                     scheduler=FlowMatchEulerDiscreteScheduler())(class_labels=[1])  # fmt: skip


def test_save_pretrained_writes_an_export_and_from_loaded_matches(export, pipe, tmp_path):
    kw = {"class_labels": [2, 9], "num_inference_steps": 2, "seed": 4, "output_type": "pt"}
    want = pipe(**kw).images
    pipe.save_pretrained(tmp_path / "copy")
    again = FlowPipeline.from_pretrained(tmp_path / "copy")
    assert torch.equal(again(**kw).images, want)
    assert json.loads((tmp_path / "copy" / "fmgen.json").read_text())["class_names"][9] == "digit 9"
    assert torch.equal(FlowPipeline.from_loaded(load_model(export))(**kw).images, want)
    with pytest.raises(PipelineError, match="save_pretrained takes only the folder here .*push_to_hub"):  # fmt: skip
        pipe.save_pretrained(tmp_path / "x", push_to_hub=True)


class TinyConv(ModelMixin, ConfigMixin):
    """A stand-in backbone outside diffusers: one 3x3 convolution of [x, t], plus a label bias."""

    @register_to_config
    def __init__(self, channels: int = 1, num_embeddings: int = 11):
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.emb = nn.Embedding(num_embeddings, channels)

    def forward(self, x, t, c):
        b, _, h, w = x.shape
        z = self.conv(torch.cat([x, t.to(x.dtype).view(b, 1, 1, 1).expand(b, 1, h, w)], 1))
        return z + self.emb(c)[:, :, None, None]


def test_a_registered_backbone_outside_diffusers_loads_as_a_component(tmp_path, monkeypatch):
    """model_index.json names its module; diffusers resolves it because registering the
    backbone imported that module."""
    build = lambda cfg, shape, cond: TinyConv(shape[0], cond.num_embeddings)  # noqa: E731
    monkeypatch.setitem(BACKBONES, "tinyconv", BackboneSpec("tinyconv", TinyConv, build=build))
    src = export_tiny(tmp_path / "run", "model.type=tinyconv")
    assert json.loads((src / "model_index.json").read_text())["backbone"] == [__name__, "TinyConv"]
    p = FlowPipeline.from_pretrained(src)
    assert type(p.backbone) is TinyConv
    spec = p.sampling.replace(steps=3)
    got = p(class_labels=[4, 1], num_inference_steps=3, seed=2, output_type="pt").images
    assert (got * 2 - 1 - fmgen_images(src, spec, [4, 1], seed=2)).abs().max() <= 1e-5


def test_every_registered_backbone_is_a_component_diffusers_can_load():
    """diffusers finds the loading method of a class outside its libraries by looking the base
    classes up in the module model_index.json names; a module that does not expose ModelMixin
    exports fine but fails FlowPipeline.from_pretrained (DiT did)."""
    import importlib

    from fmgen.models.pipeline_files import library_entry

    for name, spec in BACKBONES.items():
        library, cls_name = library_entry(spec.module_class)
        module = importlib.import_module(library)
        assert getattr(module, cls_name) is spec.module_class, name
        assert issubclass(spec.module_class, getattr(module, "ModelMixin", type(None))), name
