import os

import pytest
import torch

# Ray 2.60 turns token authentication on by default; throwaway local clusters in tests turn it off
# unless a test opts in (the job-submit test keeps it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
