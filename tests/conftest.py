"""Test configuration.

Without a GPU, Triton kernels run on CPU tensors through the interpreter: ``TRITON_INTERPRET=1`` must
be set before any ``@triton.jit`` function is created, so it is set here, before the package is
imported. Every fused launcher's outputs are pre-filled with NaN during tests (``poison`` fixture).
Commands that tests only start and read (``_background.declare``) run behind the other tests.
The developer tools (``tools/``, outside the installed package) are importable as ``tools``.

Markers (registered in pyproject.toml): ``gpu`` tests call the CUDA kernels of
``l2m_kernels._C_cuda`` directly and skip, saying so, without a CUDA device (``pytest -m gpu tests``
runs them alone); ``huge`` tests need tens of GB of GPU memory and skip unless ``--huge`` is given.
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


def pytest_addoption(parser):
    parser.addoption("--huge", action="store_true", default=False,
                     help="run the tests marked huge (e.g. one merge launch over 2**31 rows, "
                          "~52 GB of GPU memory)")


def pytest_collection_modifyitems(config, items):
    no_cuda = None if torch.cuda.is_available() else pytest.mark.skip(
        reason=f"needs a CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
               f"CUDA {torch.version.cuda or 'not built'})")
    no_huge = None if config.getoption("--huge") else pytest.mark.skip(
        reason="huge: needs --huge (tens of GB of GPU memory)")
    for item in items:
        if no_cuda is not None and item.get_closest_marker("gpu") is not None:
            item.add_marker(no_cuda)
        if no_huge is not None and item.get_closest_marker("huge") is not None:
            item.add_marker(no_huge)


@pytest.fixture(scope="session")
def cuda_ext():
    """``l2m_kernels._C_cuda``, the installed CUDA extension, whose low-level functions the gpu
    tests call directly (skips with the reason it cannot be imported)."""
    module = _ext.cuda_extension()
    if module is None:
        pytest.skip(f"needs l2m_kernels._C_cuda: {_ext.cuda_extension_error()}")
    return module


@pytest.fixture
def one_thread():
    """torch runs on one thread for the test: on a shared 2-core machine, OpenMP barriers of 2
    threads stall behind other processes (for tests that check a command, not its speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
