import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_config():
    from models.warn import WARNConfig

    return WARNConfig(depth=10, width=1, attention_depth=3, attention_width=3, input_size=(48, 48))
