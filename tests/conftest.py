import os
import sys

import pytest
import torch

# Triton kernels: natively where CUDA is available (so `pytest -m gpu` measures and tests the real kernels), through
# Triton's interpreter on a machine without CUDA (CPU CI). TRITON_INTERPRET set explicitly wins either way
# (TRITON_INTERPRET=1 pytest ... on a GPU machine runs the interpreter). Triton reads the variable when a kernel is
# decorated, i.e. when the kernel modules are imported by the tests, after this file (importing torch does not
# import them). Only code that asks for the Triton implementation uses it (VWN_IMPL=auto picks the reference on
# the CPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
