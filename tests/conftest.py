import os

import pytest
import torch

# Tests are CPU-only and small; one thread keeps them deterministic and polite on 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
