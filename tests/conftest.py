import pytest
import torch

import fxcompress as fxc


@pytest.fixture(autouse=True)
def _strict_checks():
    """Every PassManager in every test verifies, checks numerics and checks honesty."""
    with fxc.strict_checks():
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """On 2-core machines intra-op threading makes small ops much slower; tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
