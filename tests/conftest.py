"""Test-wide settings."""

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
