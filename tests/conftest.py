import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models gain little from a second thread, and on a shared 2-core machine two spinning OpenMP threads
    per process slow a run tenfold; one thread also pins float reduction order for measured margins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
