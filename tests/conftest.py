"""Test configuration.

Without a GPU, Triton kernels run on CPU tensors through the interpreter: ``TRITON_INTERPRET=1`` must
be set before any ``@triton.jit`` function is created, so it is set here, before the package is
imported. Every fused launcher's outputs are pre-filled with NaN during tests (``poison`` fixture).
Commands that tests only start and read (``_background.declare``) run behind the other tests.
The developer tools (``tools/``, outside the installed package) are importable as ``tools``.
"""
import os
import sys
import tempfile
import warnings

import pytest
import torch

# A fresh inductor cache per test run: a cache kept from an older checkout can replay graphs that
# call our custom ops with an older schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="l2m_inductor_"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Appended, not prepended: a copy of the package placed first on the path (scripts/sanitize.sh
# tests a sanitized build that way) must still be the l2m_kernels imported.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

import _background  # noqa: E402
import l2m_kernels  # noqa: E402
from l2m_kernels import _ext, backends  # noqa: E402
from l2m_kernels.testing import poisoned_outputs  # noqa: E402

# The fallback warning (missing extension) is tested explicitly; elsewhere it is noise.
warnings.filterwarnings("ignore", message="l2m_kernels: backend", category=RuntimeWarning)


@pytest.fixture(autouse=True)
def poison():
    with poisoned_outputs():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_finish(session):
    _background.start(f"{item.module.__name__}::{item.originalname}" for item in session.items
                      if getattr(item, "module", None) is not None)
