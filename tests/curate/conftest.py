import faiss
import pytest


@pytest.fixture
def one_faiss_thread():
    """faiss on one thread: OpenMP on tiny searches is very slow on a busy 2-core machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
