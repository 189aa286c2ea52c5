import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def fairgrid_population():
    from egalitarian_rl import envs

    return envs.make_population("egalitarian_rl/FairGrid-v0", {"majority": 0.8, "minority": 0.2})
