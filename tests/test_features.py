"""Feature networks for any data set: a user module's FD equals the hand-computed one, DINOv2 and
TorchScript features equal the networks' own, a network trained on another data set is refused
unless forced, and every one records the hash of what it read."""

from __future__ import annotations

import ast
import hashlib

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from torch import nn
from torch.nn import functional as F

import fmgen.data
from fmgen.eval.digits import digits_spec, train_digits_classifier
from fmgen.eval.features import FEATURE_NETWORKS, EvalError, feature_spec, parse_feature_network
from fmgen.eval.images import to_uint8
from fmgen.eval.manifold import precision_recall
from fmgen.eval.networks import IMAGENET_MEAN, IMAGENET_STD
from fmgen.eval.protocol import fid_of_folder

FEATURES = '''
import torch
from torch import nn


class Project(nn.Module):
    """(B, 1, 8, 8) in [-1, 1] -> (B, 6): a fixed random projection and a square, in float64."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(64, 6, generator=g, dtype=torch.float64))

    def forward(self, x):
        y = x.flatten(1) @ self.w
        return torch.cat([y[:, :3], y[:, 3:] ** 2], dim=1)


def make():
    return Project()


def make_for_clothes():
    net = Project()
    net.trained_on = "fashion_mnist"
    return net
'''


def sha256_16(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def frechet_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), float64, from eigh alone."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(s: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(s)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    root = sqrtm(sa)
    cross = sqrtm(root @ sb @ root)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + torch.trace(sa + sb - 2 * cross))


def image_folder(folder, count: int, seed: int, size: int = 8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def module_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "features.py"
    path.write_text(FEATURES)
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("generated"), 150, seed=1)


@pytest.fixture(scope="module")
def clothes(tmp_path_factory):
    """Shards prepared from an image folder (two classes of noise): not digits."""
    root = tmp_path_factory.mktemp("clothes")
    for k in range(2):
        image_folder(root / "src" / f"class{k}", 80, seed=10 + k)
    fmgen.data.prepare("folder", root / "shards", source_path=root / "src", resolution=8,
                       channels=1, progress=False)  # fmt: skip
    return root / "shards"


def test_module_network_gives_the_fid_and_precision_recall_computed_by_hand(
    shards, module_file, generated, tmp_path
):
    record = fid_of_folder(generated, data_dir=shards, feature_network=f"module:{module_file}:make",
                           out=tmp_path / "fid.json")  # fmt: skip
    # by hand: the same module on the same uint8 images, mapped to [-1, 1]
    spec = {}
    exec(compile(module_file.read_text(), str(module_file), "exec"), spec)
    net = spec["make"]().eval()
    real_u8 = to_uint8(fmgen.data.read_all(shards)[0])
    fake_u8 = torch.stack([torch.from_numpy(np.array(Image.open(p)))[None]
                           for p in sorted(generated.glob("*.png"))])  # fmt: skip
    with torch.no_grad():
        real, fake = (net(u8.double() / 127.5 - 1) for u8 in (real_u8, fake_u8))
    want = frechet_by_hand(real, fake)
    print(f"\nFD module {record['fid']!r}, by hand {want!r}")
    assert record["fid"] == pytest.approx(want, rel=1e-9, abs=0)
    assert record["num_reference"] == 1797 and record["num_generated"] == 150
    pr = precision_recall(real, fake, k=3)
    assert (record["precision"], record["recall"]) == (pr.precision, pr.recall)
    assert record["precision_recall"]["k"] == 3 and record["precision_recall"]["num_real"] == 1797
    assert record["feature_network"] == "module"
    assert record["feature_network_path"] == f"{module_file}:make"
    assert record["feature_weights_hash"].startswith(f"sha256:{sha256_16(module_file)}+tensors:")
    # the reference and its features now come from the cache: the same numbers
    again = fid_of_folder(generated, data_dir=shards, feature_network=f"module:{module_file}:make",
                          out=tmp_path / "again.json")  # fmt: skip
    assert again["reference"]["computed"] is False
    assert (again["fid"], again["precision"], again["recall"]) == (
        record["fid"], record["precision"], record["recall"])  # fmt: skip


def test_digits_network_is_refused_on_other_data_unless_forced(
    clothes, generated, tmp_path, monkeypatch
):
    # the digits classifier of 1 epoch, not 25: its refusal is tested, not its accuracy
    def quick(*, resolution, channels, cache_dir, **_):
        clf = train_digits_classifier(resolution, channels, epochs=1, cache_dir=cache_dir)
        return digits_spec(clf, channels)

    monkeypatch.setitem(FEATURE_NETWORKS, "digits-classifier", quick)
    with pytest.raises(
        EvalError, match=r"digits-classifier .*trained on 'digits' .*--force-feature-network"
    ):
        fid_of_folder(generated, data_dir=clothes, feature_network="digits-classifier")
    assert not (clothes / "fid-cache").exists()  # refused before training the classifier
    record = fid_of_folder(generated, data_dir=clothes, feature_network="digits-classifier",
                           force=True, out=tmp_path / "forced.json")  # fmt: skip
    assert record["feature_network_forced"] is True and record["fid"] > 0
    assert record["feature_network_trained_on"] == "digits"


def test_a_modules_trained_on_is_checked_too(shards, module_file, generated):
    with pytest.raises(EvalError, match=r"trained on 'fashion_mnist' but .* 'digits'"):
        fid_of_folder(
            generated, data_dir=shards, feature_network=f"module:{module_file}:make_for_clothes"
        )


def test_dinov2_features_are_the_models_cls_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, patch_size=14, image_size=28)  # fmt: skip
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    spec = feature_spec(f"dinov2:{tmp_path / 'dino'}", resolution=8, channels=1)
    assert spec.dim == 32 and spec.channels == 3 and spec.weights_hash.startswith("sha256:")
    u8 = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    ours = spec.feature(u8)
    # by hand: EDM2's FD-DINOv2 input (bicubic antialiased to 224, ImageNet mean/std)
    x = F.interpolate(
        u8.float().repeat(1, 3, 1, 1), size=(224, 224), mode="bicubic", antialias=True
    )
    x = (x / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
        :, None, None
    ]
    model = Dinov2Model.from_pretrained(tmp_path / "dino").eval()
    with torch.no_grad():
        cls = model(pixel_values=x).last_hidden_state[:, 0]  # (B, 32), after the final layer norm
    assert ours.dtype == torch.float64 and torch.equal(ours, cls.double())
    with pytest.raises(EvalError, match="config.json"):
        feature_spec(f"dinov2:{tmp_path}", resolution=8, channels=1)


def test_transformers_is_imported_only_where_its_models_are_loaded():
    """No fmgen module imports transformers at its top: only the builders that load one of its
    models (dinov2, a CLIP for CLIP score, a frozen text encoder), when called. (torchmetrics'
    FID module imports it on its own when installed, so sys.modules cannot tell.)"""
    where = []
    for file in sorted((ROOT / "fmgen").rglob("*.py")):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])  # fmt: skip
            if any(n.split(".")[0] == "transformers" for n in names):
                where.append((file.relative_to(ROOT).as_posix(), node in tree.body))
    assert sorted(set(where)) == [("fmgen/eval/clip_score.py", False),
                                  ("fmgen/eval/networks.py", False),
                                  ("fmgen/models/text.py", False)], where  # fmt: skip


class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 5)
        self.trained_on = "digits"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x.flatten(1)))


def test_torchscript_features_are_the_scripted_networks_and_a_pickle_is_refused(
    shards, clothes, generated, tmp_path
):
    torch.manual_seed(0)
    net = torch.jit.script(Scripted().eval())
    file = tmp_path / "net.pt"
    torch.jit.save(net, str(file))
    for name in (f"torchscript:{file}", str(file)):
        assert parse_feature_network(name).kind == "torchscript"
    spec = feature_spec(str(file), resolution=8, channels=1)
    assert spec.trained_on == "digits" and spec.weights_hash == f"sha256:{sha256_16(file)}"
    u8 = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(spec.feature(u8), net(u8.float() / 127.5 - 1).double())
    # its trained_on holds as a module's: accepted on digits, refused on other data
    assert fid_of_folder(generated, data_dir=shards, feature_network=str(file),
                         out=tmp_path / "fid.json")["fid"] > 0  # fmt: skip
    with pytest.raises(EvalError, match="trained on 'digits'"):
        fid_of_folder(generated, data_dir=clothes, feature_network=str(file))
    # a torch.save pickle whose loading would run code: refused, the code never run
    marker = tmp_path / "marker"

    class Armed:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"net": Armed()}, tmp_path / "armed.pt")
    with pytest.raises(EvalError, match="not a TorchScript archive"):
        feature_spec(str(tmp_path / "armed.pt"), resolution=8, channels=1)
    assert not marker.exists()
