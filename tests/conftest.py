"""Test-wide settings: one torch thread per test process, since pytest-xdist already runs one process per core."""

import torch

torch.set_num_threads(1)
