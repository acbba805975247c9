"""`distillkit export`: ONNX / TorchScript files checked against the trained network independently."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
# torch.jit.load warns that TorchScript is deprecated; the format is still what it loads
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

_RUNS: dict[str, Path] = {}


def make_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1-epoch cnn_small run and a 1-epoch mlp KD run distilled from it (made once per session)."""
    if not _RUNS:
        root = tmp_path_factory.mktemp("deploy")
        cnn, kd = root / "cnn", root / "kd"
        args = ["epochs=1", "--quiet", "--device", "cpu"]
        assert main(["train", "model=cnn_small", f"out_dir={cnn}", *args]) == 0
        assert main(["distill", "model=mlp", f"teacher={cnn}", f"out_dir={kd}", *args]) == 0
        _RUNS.update(cnn=cnn, kd=kd)
    return _RUNS


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    return make_runs(tmp_path_factory)


def _reference(run_dir: Path, which: str = "best"):
    """The trained network rebuilt by hand from the checkpoint, and the dataset's mean/std."""
    from distillkit.data.datasets import load_dataset
    from distillkit.models import build_model

    state = torch.load(run_dir / "checkpoints" / f"{which}.pt", weights_only=False)
    meta = state["model_meta"]
    net = build_model(meta["name"], in_channels=1, num_classes=10, image_size=8)
    net.load_state_dict(state["model"])
    bundle = load_dataset("digits")
    return net.eval(), bundle


def _pixels(bundle, n: int) -> torch.Tensor:
    """The first n test images as float32 in [0, 1], as the loaders yield them."""
    return bundle.test.images[:n].float() / 255.0


def _normalised(x: torch.Tensor, bundle) -> torch.Tensor:
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("which", ["cnn", "kd"])
def test_onnx_matches_pytorch_with_dynamic_batch(runs, tmp_path, which, capsys):
    out = tmp_path / f"{which}.onnx"
    assert main(["export", str(runs[which]), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exporter: dynamo" in printed
    net, bundle = _reference(runs[which])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert not isinstance(inp.shape[0], int)  # symbolic batch dimension
    for batch in (1, 7):
        x = _pixels(bundle, batch)
        got = session.run(None, {inp.name: x.numpy()})[0]
        with torch.no_grad():
            want = net(_normalised(x, bundle)).numpy()
        assert got.shape == (batch, 10)
        assert np.abs(got - want).max() <= 1e-4
    if which == "kd":
        # the teacher is a CNN: any convolution would mean it leaked into the student's graph
        model = onnx.load(str(out))
        assert "Conv" not in {node.op_type for node in model.graph.node}
        assert {p.key: p.value for p in model.metadata_props}["distillkit.model"] == "mlp"


def test_torchscript_matches_pytorch_with_dynamic_batch(runs, tmp_path):
    for which in ("cnn", "kd"):
        out = tmp_path / f"{which}.pt"
        assert main(["export", str(runs[which]), "--format", "torchscript", "--out", str(out)]) == 0
        module = torch.jit.load(str(out))
        net, bundle = _reference(runs[which])
        for batch in (1, 7):
            x = _pixels(bundle, batch)
            with torch.no_grad():
                diff = (module(x) - net(_normalised(x, bundle))).abs().max().item()
            assert diff <= 1e-4


def test_export_prints_parity_and_top1_agreement(runs, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(runs["cnn"]), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    diff = float(re.search(r"max \|logit diff\| (\S+)", printed).group(1))
    assert 0.0 <= diff <= 1e-4
    agree, total = map(int, re.search(r"top-1 agreement .*\((\d+)/(\d+)\)", printed).groups())
    assert total == 450 and agree == total  # digits test split; an exact copy agrees everywhere


def test_parity_failure_exits_1_and_keeps_existing_file(runs, tmp_path, monkeypatch, capsys):
    from distillkit.deploy import export as ex

    out = tmp_path / "m.pt"
    out.write_text("keep me")
    original = ex.Deployable.forward
    # a graph that is off by 1e-3 everywhere: the check compares against the network itself
    monkeypatch.setattr(ex.Deployable, "forward", lambda self, x: original(self, x) + 1e-3)
    args = ["export", str(runs["cnn"]), "--format", "torchscript", "--out", str(out), "--force"]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "parity check failed" in err
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temp file left


def test_refuses_to_overwrite_without_force(runs, tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_text("keep me")
    code = main(["export", str(runs["cnn"]), "--format", "torchscript", "--out", str(out)])
    assert code == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    args = ["export", str(runs["cnn"]), "--format", "torchscript", "--out", str(out), "--force"]
    assert main(args) == 0
    assert torch.jit.load(str(out))(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_checkpoint_option_and_missing_checkpoint(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["cnn"], run)
    (run / "checkpoints" / "best.pt").unlink()
    out = tmp_path / "m.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "best.pt" in err
    assert not out.exists()
    cmd = ["export", str(run), "--format", "torchscript", "--checkpoint", "last"]
    assert main([*cmd, "--out", str(out)]) == 0
    assert "last.pt" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{missing}", "--out", "{out}"], "no such run directory"),
        (["{run}", "--format", "tflite", "--out", "{out}"], "unknown format"),
        (["{run}", "--checkpoint", "middle", "--out", "{out}"], "unknown checkpoint"),
    ],
)
def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys, args, needle):
    values = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "m.onnx")}
    values["run"] = str(runs["cnn"])
    assert main(["export", *(a.format(**values) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "m.onnx").exists()


def test_legacy_exporter_used_only_when_dynamo_fails(runs, tmp_path, monkeypatch, capsys):
    from distillkit.deploy import export as ex

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator for this test")

    monkeypatch.setattr(ex, "_export_dynamo", broken)
    out = tmp_path / "m.onnx"
    assert main(["export", str(runs["kd"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exporter: legacy" in printed and "unsupported operator for this test" in printed
    net, bundle = _reference(runs["kd"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _pixels(bundle, 5)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - net(_normalised(x, bundle)).numpy()).max() <= 1e-4
