import importlib

import pytest
import torch

from sigec.ir.costs import KernelCosts
from sigec.runtime import native

# the module (the package exports the pass function under the same name)
partition_module = importlib.import_module("sigec.passes.partition")


def pytest_sessionstart(session):
    # every test runs on the native kernels when they build (CI builds them first), so the
    # whole suite checks them against the reference interpreter and dense models
    native.load()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


#: Kernel costs proportional to MACs and moved elements, with free calls: the tests' small models
#: go sparse wherever that saves work, so the sparse paths are exercised at any size, and which
#: nodes are sparse does not depend on the machine running the tests (tests/ir/test_costs.py
#: measures, and tests/passes/test_partition.py prices with realistic figures).
WORK_PROPORTIONAL_COSTS = KernelCosts(dense_mac=1e-12, dense_weight_byte=1e-18, sparse_mac=1e-12,
                                      sparse_weight_byte=1e-18, element=4e-12, call=1e-18,
                                      source="tests: proportional to work")


@pytest.fixture(autouse=True, scope="session")
def _work_proportional_kernel_costs(tmp_path_factory):
    # session scope: module-scoped fixtures compile engines too, before any function fixture runs.
    # Commands the tests run in subprocesses (CLI, benchmarks) measure their own costs, on a
    # machine busy with the tests: into a cache of the session's, never the user's.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(partition_module, "machine_costs", lambda *args, **kwargs: WORK_PROPORTIONAL_COSTS)
        patch.setenv("SIGEC_CACHE_DIR", str(tmp_path_factory.mktemp("sigec-cache")))
        yield
