"""On Hopper, the runtime's kernels launch as programmatic dependents (qtool.kernels.dependent_launch):
each waits for the kernel before it, so a decode gives the tokens of kernels launched one after
another."""

import pytest
import torch

from qtool.kernels import dependent_launch
from qtool.runtime.bench import synthetic_model

from test_pending_products import CONFIG, greedy_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                reason="programmatic dependent launch needs a GPU of compute capability 9 or more")


def test_kernels_on_hopper_launch_as_dependents():
    assert dependent_launch.dependent_launch(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}
    assert dependent_launch.dependent_launch(torch.device("cpu")) == {"PDL": False}


@pytest.mark.parametrize("graphs", [False, True])
def test_decoding_gives_the_tokens_of_kernels_launched_one_after_another(monkeypatch, graphs):
    model = synthetic_model(CONFIG, 4, 64, torch.float16, "cuda")
    with torch.no_grad():
        overlapped = greedy_tokens(model, graphs, max_tokens=16)
        monkeypatch.setattr(dependent_launch, "overlaps", lambda device: False)
        assert greedy_tokens(model, graphs, max_tokens=16) == overlapped
