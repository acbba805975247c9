"""Teachers trained outside distillkit: model class + weights, TorchScript and ONNX files."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distillkit.errors import ConfigError, InputNotFoundError, InvalidInputError
from distillkit.models import build_model
from distillkit.models.hooks import FeatureHooks, penultimate_features
from distillkit.models.stagewise import split_model
from distillkit.teachers import (
    BlackBoxTeacher,
    BudgetExceededError,
    LocalTeacher,
    is_external_teacher,
    load_external_teacher,
    teacher_file_format,
)

# torch.jit warns that TorchScript is deprecated; the format is still what users hand over
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

MEAN, STD = (0.3,), (0.4,)
CLASSES = [str(i) for i in range(10)]

MODEL_SRC = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.classifier = nn.Linear(width, num_classes)
        self.hook_layers = ["conv"]

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.classifier(h.mean(dim=(2, 3)))
"""


def bundle(**over) -> SimpleNamespace:
    """The dataset attributes a teacher is checked against (digits-shaped: 1x8x8, 10 classes)."""
    values = dict(
        name="digits",
        in_channels=1,
        image_size=8,
        num_classes=10,
        mean=MEAN,
        std=STD,
        classes=CLASSES,
    )
    values.update(over)
    return SimpleNamespace(**values)


def normalised_batch(n: int = 5, seed: int = 0) -> torch.Tensor:
    pixels = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return (pixels - MEAN[0]) / STD[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "nets.py"
    path.write_text(MODEL_SRC)
    return str(path)


def trained(model_file: str, seed: int = 1, **kwargs) -> nn.Module:
    """A Net whose weights and BN statistics are far from any fresh initialisation."""
    torch.manual_seed(seed)
    net = build_model(f"{model_file}:Net", in_channels=1, num_classes=10, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# -- teacher_model + teacher_weights -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "ddp"])
def test_weights_teacher_gives_the_modules_logits(model_file, tmp_path, layout):
    ref = trained(model_file)
    sd = ref.state_dict()
    saved = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[layout]
    weights = tmp_path / "teacher.pth"
    torch.save(saved, weights)
    teacher = load_external_teacher(
        {"teacher_model": f"{model_file}:Net", "teacher_weights": str(weights)}, bundle=bundle()
    )
    assert isinstance(teacher, LocalTeacher) and teacher.kind == "white-box"
    x = normalised_batch()
    with torch.no_grad():
        expected = ref(x)
    torch.testing.assert_close(teacher(x).logits, expected, rtol=0, atol=1e-6)
    # a white-box teacher from a class keeps its layers: feature methods can hook them
    assert penultimate_features(teacher.model, x).shape == (5, 4)


def test_safetensors_weights(model_file, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    ref = trained(model_file, width=6)
    weights = tmp_path / "teacher.safetensors"
    st.save_file(ref.state_dict(), str(weights))
    teacher = load_external_teacher(
        bundle=bundle(),
        teacher_model=f"{model_file}:Net",
        teacher_weights=str(weights),
        teacher_model_kwargs={"width": 6},
    )
    x = normalised_batch()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x).logits, ref(x), rtol=0, atol=1e-6)


def test_pixel_input_for_a_class_teacher(model_file, tmp_path):
    ref = trained(model_file)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    teacher = load_external_teacher(
        bundle=bundle(),
        teacher_model=f"{model_file}:Net",
        teacher_weights=str(tmp_path / "w.pt"),
        teacher_input="pixels",
    )
    x = normalised_batch()
    with torch.no_grad():
        expected = ref(x * STD[0] + MEAN[0])
    torch.testing.assert_close(teacher(x).logits, expected, rtol=0, atol=1e-6)
    # stablekd runs blocks directly, bypassing the input conversion: refused, not silently wrong
    with pytest.raises(ConfigError, match="teacher_input=pixels"):
        split_model(teacher.model)


def test_wrong_weights_name_both_sides(model_file, tmp_path):
    weights = tmp_path / "wide.pt"
    torch.save(trained(model_file, width=6).state_dict(), weights)
    with pytest.raises(ConfigError) as exc:
        load_external_teacher(
            bundle=bundle(), teacher_model=f"{model_file}:Net", teacher_weights=str(weights)
        )
    text = one_line(exc)
    assert str(weights) in text and f"{model_file}:Net" in text
    assert "'conv.weight' is (6, 1, 3, 3) in the file, (4, 1, 3, 3) in the model" in text


def test_weights_for_other_classes_name_both_counts(model_file, tmp_path):
    torch.manual_seed(0)
    other = build_model(f"{model_file}:Net", in_channels=1, num_classes=100)
    torch.save(other.state_dict(), tmp_path / "c100.pt")
    with pytest.raises(ConfigError) as exc:
        load_external_teacher(
            bundle=bundle(),
            teacher_model=f"{model_file}:Net",
            teacher_weights=str(tmp_path / "c100.pt"),
        )
    text = one_line(exc)
    assert "'classifier.weight' is (100, 4) in the file, (10, 4) in the model" in text
    assert "'digits' (1x8x8, 10 classes)" in text


def test_missing_and_unexpected_keys(model_file, tmp_path):
    sd = trained(model_file).state_dict()
    del sd["bn.weight"]
    sd["head.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(ConfigError) as exc:
        load_external_teacher(
            bundle=bundle(),
            teacher_model=f"{model_file}:Net",
            teacher_weights=str(tmp_path / "w.pt"),
        )
    text = one_line(exc)
    assert "missing from the file: bn.weight" in text and "not in the model: head.extra" in text


def test_unreadable_weights_files(model_file, tmp_path):
    spec = {"teacher_model": f"{model_file}:Net"}
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InvalidInputError, match="holds list, not a state_dict") as exc:
        load_external_teacher(spec, bundle=bundle(), teacher_weights=str(tmp_path / "list.pt"))
    one_line(exc)
    # a whole pickled module is refused by weights_only loading, with the way out named
    torch.save(trained(model_file), tmp_path / "module.pt")
    with pytest.raises(InvalidInputError, match=r"torch.save\(model.state_dict\(\)") as exc:
        load_external_teacher(spec, bundle=bundle(), teacher_weights=str(tmp_path / "module.pt"))
    one_line(exc)
    with pytest.raises(InputNotFoundError, match="teacher_weights file not found"):
        load_external_teacher(spec, bundle=bundle(), teacher_weights=str(tmp_path / "none.pt"))


def test_teacher_model_kwargs_errors_name_the_teacher_key(model_file, tmp_path):
    torch.save(trained(model_file).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError) as exc:
        load_external_teacher(
            bundle=bundle(),
            teacher_model=f"{model_file}:Net",
            teacher_weights=str(tmp_path / "w.pt"),
            teacher_model_kwargs={"depth": 3},
        )
    text = one_line(exc)
    assert "'depth'" in text and "(from teacher_model_kwargs)" in text


@pytest.mark.parametrize(
    "keys, needle",
    [
        ({"teacher_model": "cnn_small"}, "needs teacher_weights"),
        ({"teacher_weights": "w.pt"}, "needs teacher_model"),
        ({"teacher": "t.onnx", "teacher_model": "cnn_small"}, "not both"),
        ({"teacher": "t.onnx", "teacher_kind": "grey"}, "'teacher_kind'"),
        ({"teacher": "t.onnx", "teacher_input": "raw"}, "'teacher_input'"),
        ({"teacher": "t.onnx", "teacher_budget": 0}, "'teacher_budget'"),
        ({"teacher": "t.ts", "teacher_kind": "white-box", "teacher_budget": 5}, "black-box"),
        ({}, "no external teacher"),
    ],
)
def test_keys_that_do_not_fit(keys, needle):
    with pytest.raises(ConfigError, match=needle) as exc:
        load_external_teacher(keys, bundle=bundle())
    one_line(exc)


# -- TorchScript -------------------------------------------------------------------------------


def test_torchscript_teacher_is_white_box_without_features(model_file, tmp_path):
    ref = trained(model_file)
    path = tmp_path / "teacher.pt"  # a .pt suffix: told apart from a checkpoint by its content
    torch.jit.save(torch.jit.trace(ref, normalised_batch(2)), str(path))
    torch.save(ref.state_dict(), tmp_path / "plain.pt")
    assert teacher_file_format(path) == "torchscript"
    assert teacher_file_format(tmp_path / "plain.pt") == "checkpoint"
    assert teacher_file_format(tmp_path) == "run"
    assert is_external_teacher({"teacher": str(path)})
    assert not is_external_teacher({"teacher": str(tmp_path / "plain.pt")})

    teacher = load_external_teacher({"teacher": str(path)}, bundle=bundle())
    assert teacher.kind == "white-box" and teacher.info["input"] == "normalized"
    x = normalised_batch(7)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x).logits, ref(x), rtol=0, atol=1e-6)
    # every way a method reads features is a one-line error naming the file
    model = teacher.model
    for read in (
        lambda: penultimate_features(model, x),
        lambda: FeatureHooks(model, ["conv"]),
        lambda: getattr(model, "hook_layers", []),
        lambda: split_model(model),
    ):
        with pytest.raises(ConfigError, match="TorchScript file: its layers cannot be read") as exc:
            read()
        assert str(path) in one_line(exc)


def test_torchscript_class_mismatch_names_both_sides(model_file, tmp_path):
    torch.manual_seed(0)
    net = build_model(f"{model_file}:Net", in_channels=1, num_classes=100).eval()
    torch.jit.save(torch.jit.trace(net, normalised_batch(2)), str(tmp_path / "c100.ts"))
    with pytest.raises(ConfigError) as exc:
        load_external_teacher(bundle=bundle(), teacher=str(tmp_path / "c100.ts"))
    assert "outputs 100 classes, dataset 'digits' has 10" in one_line(exc)


def _exported(net: nn.Module, fmt: str, path: Path, dataset: str = "digits") -> None:
    """Write `net` as `distillkit export` does (normalisation inside, distillkit metadata)."""
    from distillkit.deploy.export import LoadedModel, write_model

    meta = {
        "name": "nets.py:Net",
        "in_channels": 1,
        "num_classes": 10,
        "image_size": 8,
        "mean": list(MEAN),
        "std": list(STD),
        "dataset": dataset,
        "classes": CLASSES,
    }
    write_model(LoadedModel(net, meta, {}, path.with_suffix(".ckpt"), 1), fmt, path)


def test_distillkit_torchscript_export_takes_pixels(model_file, tmp_path):
    ref = trained(model_file)
    path = tmp_path / "exported.ts"
    _exported(ref, "torchscript", path)
    teacher = load_external_teacher(bundle=bundle(), teacher=str(path))
    assert teacher.info["input"] == "pixels"
    x = normalised_batch()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x).logits, ref(x), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="written by distillkit export"):
        load_external_teacher(bundle=bundle(), teacher=str(path), teacher_input="normalized")
    other = bundle(name="fashion")
    with pytest.raises(ConfigError, match="teacher_dataset_check=false") as exc:
        load_external_teacher(bundle=other, teacher=str(path))
    assert "'digits'" in one_line(exc) and "'fashion'" in str(exc.value)
    load_external_teacher(bundle=other, teacher=str(path), teacher_dataset_check=False)


# -- ONNX --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_files(model_file, tmp_path_factory) -> dict[str, object]:
    """One dynamo export of a trained Net: as distillkit writes it, and stripped of metadata."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("onnx")
    ref = trained(model_file)
    exported = root / "exported.onnx"
    _exported(ref, "onnx", exported)
    proto = onnx.load(str(exported))
    del proto.metadata_props[:]
    foreign = root / "foreign.onnx"
    onnx.save(proto, str(foreign))
    return {"ref": ref, "exported": exported, "foreign": foreign}


def test_onnx_soft_answers_softmax_of_the_module(onnx_files):
    ref = onnx_files["ref"]
    teacher = load_external_teacher(bundle=bundle(), teacher=str(onnx_files["exported"]))
    assert teacher.kind == "soft" and teacher.info["input"] == "pixels"
    x = normalised_batch(9)
    out = teacher(x)
    assert out.logits is None and out.labels is None
    with torch.no_grad():
        expected = torch.softmax(ref(x), dim=1)
    torch.testing.assert_close(out.probs, expected, rtol=0, atol=1e-5)
    assert teacher.queries == 9


def test_onnx_hard_labels_and_budget(onnx_files):
    ref = onnx_files["ref"]
    teacher = load_external_teacher(
        bundle=bundle(), teacher=str(onnx_files["exported"]), teacher_kind="hard", teacher_budget=10
    )
    assert teacher.queries == 0  # the shape probe is not charged
    x = normalised_batch(6)
    out = teacher(x)
    assert out.probs is None
    with torch.no_grad():
        assert torch.equal(out.labels, ref(x).argmax(dim=1))
    assert (teacher.queries, teacher.remaining) == (6, 4)
    with pytest.raises(BudgetExceededError, match="6 used \\+ 6 asked > budget 10"):
        teacher(x)
    assert teacher.queries == 6
    # a method that wraps teacher.model in its own black box gets labels only, on the same budget
    rewrapped = BlackBoxTeacher(teacher.model, kind="soft")
    probs = rewrapped(x[:4]).probs
    assert torch.equal(probs.argmax(dim=1), out.labels[:4])
    assert torch.all(probs.max(dim=1).values > 0.999)
    assert teacher.remaining == 0
    with pytest.raises(BudgetExceededError):
        rewrapped(x[:1])


def test_foreign_onnx_input_convention(onnx_files):
    ref = onnx_files["ref"]
    x = normalised_batch()
    # no distillkit metadata: the graph gets the run's normalised batch as it is ...
    teacher = load_external_teacher(bundle=bundle(), teacher=str(onnx_files["foreign"]))
    assert teacher.info["input"] == "normalized"
    with torch.no_grad():
        as_given = torch.softmax(ref((x - MEAN[0]) / STD[0]), dim=1)
        as_pixels = torch.softmax(ref(x), dim=1)
    torch.testing.assert_close(teacher(x).probs, as_given, rtol=0, atol=1e-5)
    # ... unless told it takes pixels in [0, 1]
    teacher = load_external_teacher(
        bundle=bundle(), teacher=str(onnx_files["foreign"]), teacher_input="pixels"
    )
    torch.testing.assert_close(teacher(x).probs, as_pixels, rtol=0, atol=1e-5)


def test_onnx_mismatches_name_both_sides(onnx_files):
    path = str(onnx_files["foreign"])
    with pytest.raises(ConfigError) as exc:
        load_external_teacher(bundle=bundle(name="three", num_classes=3), teacher=path)
    assert "outputs 10 classes, dataset 'three' has 3" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        load_external_teacher(bundle=bundle(name="mnist", image_size=28), teacher=path)
    text = one_line(exc)
    assert "('batch', 1, 8, 8)" in text and "'mnist' (1x28x28, 10 classes)" in text
    with pytest.raises(ConfigError, match="is a black box") as exc:
        load_external_teacher(bundle=bundle(), teacher=path, teacher_kind="white-box")
    with pytest.raises(ConfigError, match=r"black-box \('soft'\) teacher: its layers cannot"):
        teacher = load_external_teacher(bundle=bundle(), teacher=path)
        penultimate_features(teacher.model, normalised_batch(2))


def test_onnx_probability_output_and_fixed_batch(tmp_path):
    """A hand-made graph ending in Softmax with batch fixed at 1: chunked, probabilities kept."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(10, 64, generator=gen), torch.randn(10, generator=gen)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "w", "b"], ["z"], transB=1),
            helper.make_node("Softmax", ["z"], ["p"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 10])],
        initializer=[
            numpy_helper.from_array(w.numpy(), "w"),
            numpy_helper.from_array(b.numpy(), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "softmax.onnx"
    onnx.save(model, str(path))
    teacher = load_external_teacher(bundle=bundle(), teacher=str(path))
    assert teacher.info["outputs"] == "probs"
    x = normalised_batch(5)
    expected = torch.softmax(x.flatten(1) @ w.T + b, dim=1)
    torch.testing.assert_close(teacher(x).probs, expected, rtol=0, atol=1e-5)
    hard = load_external_teacher(bundle=bundle(), teacher=str(path), teacher_kind="hard")
    assert torch.equal(hard(x).labels, expected.argmax(dim=1))


def test_missing_teacher_file(tmp_path):
    with pytest.raises(InputNotFoundError, match="teacher file not found"):
        load_external_teacher(bundle=bundle(), teacher=str(tmp_path / "gone.onnx"))
    shutil.copy(__file__, tmp_path / "not_a_model.onnx")
    with pytest.raises(InvalidInputError, match="cannot load ONNX teacher") as exc:
        load_external_teacher(bundle=bundle(), teacher=str(tmp_path / "not_a_model.onnx"))
    one_line(exc)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_file_teachers_answer_on_the_runs_device(model_file, onnx_files, tmp_path):
    ref = trained(model_file)
    torch.jit.save(torch.jit.trace(ref, normalised_batch(2)), str(tmp_path / "t.ts"))
    x = normalised_batch().cuda()
    scripted = load_external_teacher(bundle=bundle(), teacher=str(tmp_path / "t.ts"), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(scripted(x).logits.cpu(), ref(x.cpu()), rtol=0, atol=1e-5)
    # onnxruntime runs on the CPU; the answers come back on the batch's device
    black = load_external_teacher(
        bundle=bundle(), teacher=str(onnx_files["exported"]), device="cuda"
    )
    probs = black(x).probs
    assert probs.device.type == "cuda"
    with torch.no_grad():
        expected = torch.softmax(onnx_files["ref"](x.cpu()), dim=1)
    torch.testing.assert_close(probs.cpu(), expected, rtol=0, atol=1e-5)
