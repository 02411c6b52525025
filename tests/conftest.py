import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_PESC = REPO.parent / "shared" / "data" / "pesc"


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def shared_pesc() -> Path:
    """The real task files; tests that need them skip when they are absent."""
    if not (SHARED_PESC / "val.json").exists():
        pytest.skip("../shared/data/pesc not present")
    return SHARED_PESC


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared machine: one torch thread is faster than two spinning against other
    jobs. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
