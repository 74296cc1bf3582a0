import pyro
import pytest
import torch

# One thread per process is faster at these sizes (docs/pyro_pitfalls.md), and two
# pytest processes on 2 cores with 2 threads each slow each other badly.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Each test starts from an empty param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
