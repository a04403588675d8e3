import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are many small ops: one intra-op thread is fastest and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
