"""Test-wide settings."""

import torch

# the suite runs many tiny models: one intra-op thread avoids oversubscription on small machines
torch.set_num_threads(1)
