import pytest
import torch

from sigec.runtime import native


def pytest_sessionstart(session):
    # every test runs on the native kernels when they build (CI builds them first), so the
    # whole suite checks them against the reference interpreter and dense models
    native.load()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
