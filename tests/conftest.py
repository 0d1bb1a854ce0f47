import os

import pytest
import torch

torch.set_num_threads(2)
# Tests that want the gRPC endpoint ask for a free port; the default (8001) may be taken on this machine.
os.environ["WARN_GRPC_PORT"] = "0"


@pytest.fixture(scope="session")
def tiny_config():
    from models.warn import WARNConfig

    return WARNConfig(depth=10, width=1, attention_depth=3, attention_width=3, input_size=(48, 48))
