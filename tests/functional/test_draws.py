import pytest
import torch

from gapwatch.functional._draws import make_generator


def test_fresh_generator_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    g = make_generator(None, torch.device("cpu"))
    torch.randn(3, generator=g)
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(TypeError, match="Generator"):
        make_generator(0, torch.device("cpu"))
