"""Typed run configs: YAML files, key=value overrides, and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from distillkit.config import (
    ConfigError,
    RunConfig,
    build_dataclass,
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)
from distillkit.methods import registry
from distillkit.runner import check_config, resolve_options


def checked(path, overrides=None):
    """load_config plus the runner's checks of names and method options."""
    cfg = load_config(path, overrides)
    check_config(cfg)
    return cfg


SSL_METHODS = {"dino", "mokd"}  # self-supervised: no teacher
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.y*ml"))


def _yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- loading


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.method == "ce" and cfg.subset.method == "full"


def test_yaml_and_overrides(tmp_path):
    path = _yaml(
        tmp_path,
        "name: exp\nmodel: mlp\nepochs: 5\nlr: 0.1\nsubset:\n  fraction: 0.5\n  per_class: false\n",
    )
    cfg = load_config(
        path,
        [
            "epochs=7",
            "lr=1",  # an integer where a float is expected: coerced
            "subset.method=kt",
            "augment=false",
            "milestones=[3, 6]",
            "grad_clip=2",
            "data_dir=null",
            "model_kwargs={hidden: [8]}",
        ],
    )
    assert cfg.name == "exp" and cfg.model == "mlp"
    assert cfg.epochs == 7 and isinstance(cfg.epochs, int)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.subset.method == "kt"
    assert cfg.subset.fraction == 0.5  # nested override merged, not replacing the mapping
    assert cfg.subset.per_class is False
    assert cfg.augment is False
    assert cfg.milestones == [3, 6]
    assert cfg.grad_clip == 2.0 and isinstance(cfg.grad_clip, float)
    assert cfg.data_dir is None
    assert cfg.model_kwargs == {"hidden": [8]}


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "# nothing\n")) == RunConfig()


def test_save_config_roundtrip(tmp_path):
    cfg = load_config(None, ["model=mlp", "subset.method=random", "subset.fraction=0.25"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_save_config_history_is_a_comment_that_reads_back(tmp_path):
    from distillkit.config import read_config_history

    cfg = load_config(None, ["model=mlp"])
    history = ["distillkit train model=mlp", "resume runs/x at epoch 2: epochs=4"]
    save_config(cfg, tmp_path / "config.yaml", history)
    assert load_config(tmp_path / "config.yaml") == cfg
    assert read_config_history(tmp_path / "config.yaml") == history
    assert read_config_history(tmp_path / "missing.yaml") == []


def test_format_overrides_inverts_parse_overrides():
    from distillkit.config import format_overrides

    items = ["epochs=3", "subset.method=kt", "subset.fraction=0.5", "milestones=[1, 2]", "x=null"]
    assert parse_overrides(format_overrides(parse_overrides(items))) == parse_overrides(items)


def test_with_absolute_paths(tmp_path):
    from distillkit.config import with_absolute_paths

    cfg = load_config(None, ["method=kd", "teacher=runs/t", "data_dir=data"])
    out = with_absolute_paths(cfg, tmp_path)
    assert out.teacher == str(tmp_path / "runs" / "t")
    assert out.data_dir == str(tmp_path / "data")
    assert with_absolute_paths(out, tmp_path / "elsewhere") == out  # absolute stays as is


def test_parse_overrides_nested_and_typed():
    out = parse_overrides(["a=1", "b=x", "c.d=0.5", "c.e=true", "f="])
    assert out == {"a": 1, "b": "x", "c": {"d": 0.5, "e": True}, "f": None}


def test_override_value_with_equals_sign():
    assert parse_overrides(["name=a=b"]) == {"name": "a=b"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path, tmp_path):
    method = yaml.safe_load(path.read_text()).get("method")
    # the method's options are checked too, not only the run-level keys
    extra = [] if method in SSL_METHODS else [f"teacher={tmp_path / 'teacher_run'}"]
    cfg = checked(path, extra)
    assert cfg.name == path.stem
    assert cfg.epochs > 0


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 3


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "override,key,suggestion",
    [
        ("epoch=3", "epoch", "epochs"),
        ("learning_rat=0.1", "learning_rat", None),
        ("subset.fractoin=0.5", "subset.fractoin", "subset.fraction"),
        ("teacher_cahce=true", "teacher_cahce", "teacher_cache"),
    ],
)
def test_unknown_key_names_it(override, key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'") as info:
        load_config(None, [override])
    if suggestion:
        assert f"did you mean '{suggestion}'" in str(info.value)


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="'batchsize'.*did you mean 'batch_size'"):
        load_config(_yaml(tmp_path, "batchsize: 32\n"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("epochs=abc", "epochs"),
        ("epochs=2.5", "epochs"),
        ("epochs=true", "epochs"),
        ("lr=fast", "lr"),
        ("augment=1", "augment"),
        ("name=3", "name"),
        ("milestones=5", "milestones"),
        ("milestones=[1, x]", r"milestones\[1\]"),
        ("subset=kt", "subset"),
        ("subset.fraction=half", "subset.fraction"),
        ("grad_clip=big", "grad_clip"),
        ("options=[1]", "options"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,key",
    [
        ("optimizer=adam", "optimizer"),
        ("schedule=linear", "schedule"),
        ("amp=fp8", "amp"),
        ("subset.method=herding", "subset.method"),
        ("epochs=0", "epochs"),
        ("lr=-0.1", "lr"),
        ("batch_size=0", "batch_size"),
        ("subset.fraction=0", "subset.fraction"),
        ("subset.fraction=1.5", "subset.fraction"),
        ("save_every=0", "save_every"),
        ("warmup_epochs=-1", "warmup_epochs"),
        ("image_size=0", "image_size"),
        ("name=../elsewhere", "name"),
        ("name=a/b", "name"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "key", ["temperature", "alpha", "hint_layer", "teacher_hint_layer", "hint_weight"]
)
def test_method_keys_moved_into_options(key, tmp_path):
    with pytest.raises(ConfigError, match=f"^config key '{key}' moved to 'options.{key}'$"):
        load_config(None, ["method=kd", "teacher=runs/t", f"{key}=1"])
    with pytest.raises(ConfigError, match=f"config key '{key}' moved to 'options.{key}'"):
        load_config(_yaml(tmp_path, f"method: fitnet\n{key}: 2\n"))


def test_build_dataclass_is_public():
    @dataclass
    class Opts:
        depth: int = 1
        width: float = 2.0

    assert build_dataclass(Opts, {"depth": 3, "width": 1}, prefix="options.") == Opts(3, 1.0)
    with pytest.raises(ConfigError, match="unknown config key 'options.dpeth'.*'options.depth'"):
        build_dataclass(Opts, {"dpeth": 3}, prefix="options.")


def test_config_alone_does_not_check_names():
    # config.py knows nothing of models, datasets or methods: the runner checks those
    cfg = load_config(None, ["model=resnet2000", "dataset=mnist3d", "method=dkd2"])
    assert (cfg.model, cfg.dataset, cfg.method) == ("resnet2000", "mnist3d", "dkd2")


def test_unknown_model_names_it():
    with pytest.raises(ConfigError, match="'resnet2000'") as info:
        checked(None, ["model=resnet2000"])
    assert "model" in str(info.value)


def test_unknown_model_suggests_close_name():
    with pytest.raises(ConfigError, match="did you mean 'cnn_small'"):
        checked(None, ["model=cnn_smal"])


def test_unknown_dataset_names_it():
    with pytest.raises(ConfigError, match="unknown dataset 'mnist3d'") as info:
        checked(None, ["dataset=mnist3d"])
    assert "digits" in str(info.value)  # lists the valid ones


def test_unknown_method_names_it():
    with pytest.raises(ConfigError, match="unknown method 'dkd2'") as info:
        checked(None, ["method=dkd2"])
    assert "kd" in str(info.value) and "ce" in str(info.value)


@pytest.mark.parametrize(
    "model", ["nets/my_net.py:Net", "/abs/nets.py:Net", "mypackage.nets:make_net"]
)
def test_models_and_datasets_by_import_path_pass_the_checks(model):
    cfg = checked(None, [f"model={model}", "dataset=data/make.py:make_data"])
    assert cfg.model == model


@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_method_without_teacher(method):
    with pytest.raises(ConfigError, match=f"method '{method}' needs a teacher"):
        checked(None, [f"method={method}"])
    assert checked(None, [f"method={method}", "teacher=runs/t"]).teacher == "runs/t"


@pytest.mark.parametrize("method", ["kd", "stablekd"])
@pytest.mark.parametrize("alpha", [-0.1, 1.01, 2])
def test_alpha_out_of_range(method, alpha):
    with pytest.raises(ConfigError, match="config key 'options.alpha'"):
        checked(None, [f"method={method}", "teacher=runs/t", f"options.alpha={alpha}"])


@pytest.mark.parametrize("alpha", [0, 0.0, 0.5, 1])
def test_alpha_in_range(alpha):
    cfg = checked(None, ["method=kd", "teacher=runs/t", f"options.alpha={alpha}"])
    assert resolve_options(cfg).alpha == float(alpha)


@pytest.mark.parametrize("method", ["kd", "kd_da", "stablekd"])
def test_temperature_must_be_positive(method):
    with pytest.raises(ConfigError, match="config key 'options.temperature': must be > 0"):
        checked(None, [f"method={method}", "teacher=runs/t", "options.temperature=0"])


def test_method_options_have_the_old_defaults():
    for method in ("kd", "stablekd", "kd_da"):
        opts = resolve_options(checked(None, [f"method={method}", "teacher=runs/t"]))
        assert opts.temperature == 4.0
    assert resolve_options(checked(None, ["method=kd", "teacher=t"])).alpha == 0.1
    fit = resolve_options(checked(None, ["method=fitnet", "teacher=t", "options.hint_layer=l2"]))
    assert (fit.hint_layer, fit.teacher_hint_layer, fit.hint_weight) == ("l2", None, 100.0)
    with pytest.raises(ConfigError, match="config key 'options.hint_weight'"):
        checked(None, ["method=fitnet", "teacher=t", "options.hint_weight=-1"])


def test_subset_teacher_features_need_teacher():
    with pytest.raises(ConfigError, match="subset.features"):
        load_config(None, ["subset.method=kt", "subset.features=teacher"])


def test_options_rejected_for_methods_without_options():
    with pytest.raises(ConfigError, match="method 'ce' takes no options.*'beta'"):
        checked(None, ["method=ce", "options.beta=2"])


def test_teacher_cache_only_for_methods_that_can_use_it():
    ok = ["teacher=runs/t", "teacher_cache=true", "augment=false"]
    assert checked(None, ["method=kd", *ok]).teacher_cache
    with pytest.raises(ConfigError, match="teacher_cache.*'fitnet'"):
        checked(None, ["method=fitnet", *ok])
    with pytest.raises(ConfigError, match="teacher_cache needs augment=false"):
        checked(None, ["method=kd", "teacher=runs/t", "teacher_cache=true"])


@dataclass
class _Opts:
    beta: float = 1.0
    steps: int = 3

    def validate(self) -> None:
        if self.beta < 0:
            raise ValueError("options.beta must be >= 0")


@pytest.fixture
def method_with_options(monkeypatch):
    registry.list_methods()  # load the built-in methods first
    spec = registry.MethodSpec(
        "_optdemo", lambda *a: None, options_cls=_Opts, needs_teacher=False, description="test"
    )
    monkeypatch.setitem(registry._REGISTRY, "_optdemo", spec)
    return "_optdemo"


def test_options_typed_for_methods_with_options(method_with_options):
    cfg = load_config(None, [f"method={method_with_options}", "options.beta=2", "options.steps=4"])
    opts = resolve_options(cfg)
    assert isinstance(opts, _Opts)
    assert opts.beta == 2.0 and isinstance(opts.beta, float) and opts.steps == 4
    assert resolve_options(load_config(None, ["method=ce"])) is None


def test_options_errors_name_the_key(method_with_options):
    m = method_with_options
    with pytest.raises(ConfigError, match="unknown config key 'options.beat'.*'options.beta'"):
        checked(None, [f"method={m}", "options.beat=2"])
    with pytest.raises(ConfigError, match="config key 'options.steps'"):
        checked(None, [f"method={m}", "options.steps=many"])
    with pytest.raises(ConfigError, match="options.beta must be >= 0"):
        checked(None, [f"method={m}", "options.beta=-1"])


@pytest.mark.parametrize("item", ["epochs", "lr0.1", ""])
def test_override_without_equals(item):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [item])


def test_override_with_empty_key():
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["=3"])


def test_config_file_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("text", ["a: [1, 2\n", "name: exp\n  bad indent: 1\n", "key: {x\n"])
def test_invalid_yaml(tmp_path, text):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "3\n"])
def test_yaml_not_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_yaml(tmp_path, text))


def test_config_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict(["epochs", 3])  # type: ignore[arg-type]


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- import paths in runs

NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, image_size):
        super().__init__()
        self.classifier = nn.Linear(in_channels * image_size * image_size, num_classes)

    def forward(self, x):
        return self.classifier(x.flatten(1))
"""

DATA = """
import numpy as np


def make_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 1, 4, 4), dtype=np.uint8)
    y = np.arange(48) % 2
    return {"x_train": x[:32], "y_train": y[:32], "x_test": x[32:], "y_test": y[32:]}
"""


def test_run_records_model_and_dataset_import_paths_as_absolute(tmp_path, monkeypatch):
    from distillkit.runner import evaluate_checkpoint, resume, run

    code = tmp_path / "code"
    code.mkdir()
    (code / "nets.py").write_text(NET)
    (code / "data.py").write_text(DATA)
    monkeypatch.chdir(tmp_path)
    overrides = ["model=code/nets.py:Net", "dataset=code/data.py:make_data", "epochs=1"]
    run(load_config(None, [*overrides, "batch_size=16", "out_dir=out", "quiet=true", "device=cpu"]))
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["model"] == f"{code / 'nets.py'}:Net"
    assert saved["dataset"] == f"{code / 'data.py'}:make_data"
    # from another folder the run still evaluates and resumes
    monkeypatch.chdir(code)
    assert evaluate_checkpoint(tmp_path / "out")["model"] == saved["model"]
    assert resume(tmp_path / "out", {"epochs": 2})["epochs"] == 2


def test_model_file_that_cannot_be_built_is_a_config_error(tmp_path, monkeypatch):
    from distillkit.runner import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(NET)
    base = ["epochs=1", "out_dir=out", "quiet=true", "device=cpu"]
    with pytest.raises(
        ConfigError, match=r"^config key 'model': model file not found: .*missing\.py$"
    ):
        run(load_config(None, [*base, "model=missing.py:Net"]))
    with pytest.raises(ConfigError, match=r"^config key 'model_kwargs': .*no argument 'depth'"):
        run(load_config(None, [*base, "model=nets.py:Net", "model_kwargs={depth: 2}"]))
    assert not (tmp_path / "out").exists()
