import os
import sys

# The Triton GHC kernels run on the CPU through Triton's interpreter; it must be on before triton is imported.
# Only code that asks for the Triton implementation uses it (VWN_IMPL=auto picks the reference on the CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

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
