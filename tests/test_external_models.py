"""Models given by import path (file.py:Name, package.module:Name) and the registry's layering."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from distillkit.models import build_model, list_models

SRC = Path(__file__).resolve().parents[1] / "src"

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, in_channels, num_classes, width=4):
            super().__init__()
            self.width = width
            self.body = nn.Conv2d(in_channels, width, 3, padding=1)
            self.classifier = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.classifier(self.body(x).mean((2, 3)))


    def make(num_classes, **kwargs):
        model = nn.Linear(7, num_classes)
        model.seen = dict(kwargs)
        return model


    def needs_depth(num_classes, depth):
        return nn.Linear(depth, num_classes)


    def not_a_model(num_classes=10):
        return 42


    VALUE = 3
    """
)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mynets.py"
    path.write_text(MODEL_FILE)
    return path


def test_registry_imports_no_model_file(model_file):
    # Load distillkit.models.registry (and one model file) without running the package
    # __init__: a registry that pulls in model files, or a model file that imports the
    # old zoo (which imports every model file), shows up in sys.modules. The same fresh
    # process also builds a model from a file, whose module name must match this process's.
    code = textwrap.dedent(
        f"""
        import importlib, json, sys, types
        sys.path.insert(0, {str(SRC)!r})
        import distillkit
        pkg = types.ModuleType("distillkit.models")
        pkg.__path__ = [{str(SRC / "distillkit" / "models")!r}]
        sys.modules["distillkit.models"] = pkg
        registry = importlib.import_module("distillkit.models.registry")
        models = ["cnn", "resnet", "wrn", "vgg", "vit", "mobilenet", "zoo"]
        after_registry = [m for m in models if "distillkit.models." + m in sys.modules]
        importlib.import_module("distillkit.models.cnn")
        after_cnn = [m for m in models if "distillkit.models." + m in sys.modules]
        net = registry.build_model({f"{model_file}:Net"!r}, in_channels=1, num_classes=2)
        print(json.dumps([after_registry, after_cnn, type(net).__module__]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    after_registry, after_cnn, module = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_registry == []
    assert after_cnn == ["cnn"]
    here = build_model(f"{model_file}:Net", in_channels=1, num_classes=2)
    assert module == type(here).__module__ and module in sys.modules


def test_model_class_from_file(model_file):
    model = build_model(f"{model_file}:Net", in_channels=2, num_classes=5, image_size=8, width=6)
    assert isinstance(model, nn.Module) and model.width == 6
    assert model.body.in_channels == 2 and model.classifier.out_features == 5
    assert model(torch.randn(3, 2, 8, 8)).shape == (3, 5)
    assert not any(":" in name for name in list_models())


def test_factory_gets_only_what_it_accepts(model_file):
    model = build_model(f"{model_file}:make", in_channels=1, num_classes=3, image_size=12, p=0.5)
    assert model.out_features == 3
    # **kwargs takes the offered in_channels and image_size too
    assert model.seen == {"in_channels": 1, "image_size": 12, "p": 0.5}


def test_relative_file_path_from_cwd(model_file, monkeypatch):
    monkeypatch.chdir(model_file.parent)
    model = build_model("mynets.py:Net", in_channels=1, num_classes=4)
    assert model.classifier.out_features == 4


def test_model_by_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "dk_user_pkg_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = build_model("dk_user_pkg_models.nets:Net", in_channels=3, num_classes=2, width=5)
        assert model.width == 5 and model.classifier.out_features == 2
        assert type(model).__module__ == "dk_user_pkg_models.nets"
    finally:
        for name in [m for m in sys.modules if m.startswith("dk_user_pkg_models")]:
            del sys.modules[name]


def test_unknown_kwarg_names_it_and_accepted(model_file):
    with pytest.raises(ValueError) as err:
        build_model(f"{model_file}:Net", in_channels=1, num_classes=2, depth=3)
    msg = str(err.value)
    assert "'depth'" in msg and "width" in msg and "in_channels" in msg
    assert "\n" not in msg


def test_missing_required_argument_is_named(model_file):
    with pytest.raises(ValueError, match="depth"):
        build_model(f"{model_file}:needs_depth", in_channels=1, num_classes=2)
    model = build_model(f"{model_file}:needs_depth", in_channels=1, num_classes=2, depth=9)
    assert model.in_features == 9


def test_same_file_same_class(model_file):
    a = build_model(f"{model_file}:Net", in_channels=1, num_classes=2)
    b = build_model(f"{model_file}:Net", in_channels=1, num_classes=2)
    assert type(a) is type(b)


def test_pickled_model_loads_once_file_is_loaded_again(model_file):
    torch.manual_seed(0)
    model = build_model(f"{model_file}:Net", in_channels=1, num_classes=3)
    buf = io.BytesIO()
    torch.save(model, buf)
    x = torch.ones(1, 1, 4, 4)
    expected = model(x)
    name = type(model).__module__
    del sys.modules[name]  # as in a new process that has not loaded the file yet
    with pytest.raises(ModuleNotFoundError):
        torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    build_model(f"{model_file}:Net", in_channels=1, num_classes=3)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert type(loaded).__module__ == name
    assert torch.allclose(loaded(x), expected)


@pytest.mark.parametrize(
    "attr,needle",
    [
        ("Nope", "Nope"),
        ("VALUE", "not an nn.Module class or a factory"),
        ("not_a_model", "int"),
    ],
)
def test_bad_attribute_errors(model_file, attr, needle):
    with pytest.raises(ValueError) as err:
        build_model(f"{model_file}:{attr}", in_channels=1, num_classes=2)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_attribute_lists_candidates(model_file):
    with pytest.raises(ValueError) as err:
        build_model(f"{model_file}:Nett", in_channels=1, num_classes=2)
    assert "Net" in str(err.value) and "make" in str(err.value)


def test_missing_file_and_module(tmp_path):
    missing = tmp_path / "nothere.py"
    with pytest.raises(ValueError, match="not found") as err:
        build_model(f"{missing}:Net")
    assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match="No module named") as err:
        build_model("dk_no_such_module_xyz.sub:Net")
    assert "dk_no_such_module_xyz" in str(err.value)


def test_broken_file_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def oops(:\n")
    with pytest.raises(ValueError, match="SyntaxError") as err:
        build_model(f"{bad}:Net")
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_canonical_model_spec(model_file, monkeypatch):
    from distillkit.models import canonical_model_spec, is_import_spec

    assert canonical_model_spec("resnet20") == "resnet20"
    assert canonical_model_spec("pkg.mod:Net") == "pkg.mod:Net"
    absolute = f"{model_file}:Net"
    assert canonical_model_spec("mynets.py:Net", base_dir=model_file.parent) == absolute
    assert canonical_model_spec(absolute, base_dir=Path("/elsewhere")) == absolute
    monkeypatch.chdir(model_file.parent.parent)
    rel = f"{model_file.parent.name}/sub/../mynets.py:Net"
    assert canonical_model_spec(rel) == absolute
    assert is_import_spec("a/b.py:Net") and is_import_spec("pkg.mod:make")
    assert not is_import_spec("resnet20") and not is_import_spec("pkg.mod:")
