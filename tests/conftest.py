"""Test-wide settings."""

import signal

import pytest
import torch

# the suite runs many tiny models: one intra-op thread avoids oversubscription on small machines
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_for_every_test():
    """A test that calls a benchmark's main() in-process may change torch's thread count: the
    next test (a bit-exact resume comparison against a one-thread child process) must not
    inherit it."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_is_delivered():
    """A shell starts a background job (`make test &`, nohup) with SIGINT ignored, and children
    inherit that: the Ctrl-C tests would then see no KeyboardInterrupt. Restore Python's handler
    (children exec'd from here get the default action, as in a terminal)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="session")
def digits_mlp_teacher(tmp_path_factory):
    """A small but useful digits teacher (mlp, about 95% test accuracy), trained once a session."""
    from distillkit.cli import main

    out = tmp_path_factory.mktemp("digits_mlp") / "teacher"
    args = ["train", "model=mlp", "epochs=3", "batch_size=32", "lr=0.1", "augment=false"]
    assert main([*args, f"out_dir={out}", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def digits_bundle():
    """scikit-learn's digits as a DataBundle, loaded once a session."""
    from distillkit.data.datasets import load_dataset

    return load_dataset("digits")
