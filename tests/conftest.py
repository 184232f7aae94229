import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that put a tiny run's data cache and outputs under the test's temp folder."""
    return [f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]
