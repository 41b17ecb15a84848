import pytest
import torch

# Test models are tiny: one thread avoids OpenMP overhead and contention on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_(module, std=0.2, seed=0):
    """Give a freshly built HF model weights large enough that every feature moves the logits measurably
    (HF's default init of std 0.02 makes a tiny model's logits nearly constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module
