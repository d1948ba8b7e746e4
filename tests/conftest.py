import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/hf_models.py
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor_cache"))

try:
    import transformers

    transformers.logging.set_verbosity_error()
except ImportError:  # transformers is a pinned test dependency; tests that need it import it themselves
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
