import pytest
import torch

from models.attention import head_overlap
from models.profile import overhead
from models.warn import WARN, WARNConfig, combined_attention, warn_16_2, warn_16_4


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return WARN(tiny_config).eval()


def test_shapes_and_sums(model, tiny_config):
    x = torch.rand(5, 3, 48, 48)
    out = model(x)
    n, c, k = 5, tiny_config.num_classes, tiny_config.attention_width
    assert out.probabilities.shape == (n, c)
    assert out.layer_log_probabilities.shape == (n, 4, c)
    assert out.global_gates.shape == (n, 4)
    assert [tuple(m.shape) for m in out.attention] == [(n, k, 48, 48), (n, k, 24, 24), (n, k, 12, 12)]
    assert model.strides == [1, 2, 4]
    for mask, gates in zip(out.attention, out.gates):
        torch.testing.assert_close(mask.sum((2, 3)), torch.ones(n, k))
        assert gates.shape == (n, k)
        torch.testing.assert_close(gates.sum(1), torch.ones(n))
    torch.testing.assert_close(out.global_gates.sum(1), torch.ones(n))
    torch.testing.assert_close(out.probabilities.sum(1), torch.ones(n))
    torch.testing.assert_close(out.layer_log_probabilities.exp().sum(2), torch.ones(n, 4))
    torch.testing.assert_close(out.log_probabilities.exp(), out.probabilities)
    combined = combined_attention(out, (48, 48))
    torch.testing.assert_close(combined.sum((1, 2)), torch.ones(n))


def test_ad0_is_the_plain_backbone(tiny_config):
    torch.manual_seed(0)
    plain = WARN(WARNConfig(**{**tiny_config.to_dict(), "attention_depth": 0})).eval()
    assert not list(plain.attention) and plain.global_gate is None
    x = torch.rand(3, 3, 48, 48)
    out = plain(x)
    expected = torch.log_softmax(plain.backbone((x - plain.mean) / plain.std), -1)
    torch.testing.assert_close(out.log_probabilities, expected)
    assert out.attention == () and out.global_gates.shape == (3, 1)


@pytest.mark.parametrize("ad", [1, 2, 3])
def test_attention_depth_attends_the_last_stages(tiny_config, ad):
    m = WARN(WARNConfig(**{**tiny_config.to_dict(), "attention_depth": ad}))
    assert m.attended == list(range(3 - ad, 3))
    assert len(m(torch.rand(1, 3, 48, 48)).attention) == ad


def test_gradients_reach_every_attention_parameter(model):
    model.train()
    out = model(torch.rand(4, 3, 48, 48))
    model.loss(out, torch.tensor([0, 1, 2, 3])).backward()
    attention_params = [*model.attention.named_parameters(), *model.global_gate.named_parameters()]
    assert attention_params
    for name, p in attention_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_regularizer_zero_for_orthogonal_and_positive_for_identical():
    disjoint = torch.zeros(2, 2, 4, 4)
    disjoint[:, 0, :2] = 1 / 8  # top half
    disjoint[:, 1, 2:] = 1 / 8  # bottom half
    assert head_overlap(disjoint) == 0
    same = torch.full((2, 2, 4, 4), 1 / 16)
    assert head_overlap(same) > 0
    assert head_overlap(torch.rand(2, 1, 4, 4)) == 0


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="6n\\+4"):
        WARN(WARNConfig(depth=12))
    with pytest.raises(ValueError, match="attention_depth"):
        WARNConfig(attention_depth=4)


def test_config_round_trips_through_json():
    import json

    cfg = WARNConfig(class_names=list("abcdefghij"))
    assert WARNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_variants_and_overhead():
    assert warn_16_2().config.width == 2 and warn_16_4().config.input_size == (32, 32)
    r = overhead(WARNConfig(depth=10, width=1, input_size=(32, 32)))
    assert r["warn"]["params"] > r["backbone"]["params"] > 0
    assert r["warn"]["flops"] > r["backbone"]["flops"] > 0


def test_gradcam_comparison_reports_both_maps_on_the_same_images(tiny_config):
    from torch.utils.data import Subset

    from models.data import ClutteredDigits, ClutterSpec
    from models.evaluate import compare_gradcam

    torch.manual_seed(0)
    model = WARN(tiny_config).eval()
    images = Subset(ClutteredDigits("test", 0, ClutterSpec(test_per_scan=1)), range(10))
    result = compare_gradcam(model, images, batch_size=4)
    assert result["images"] == 10 and result["pointing_game_tolerance_px"] == 2
    assert set(result["pointing_game"]) == {"warn", "gradcam"}
    assert all(0 <= v <= 1 for v in result["pointing_game"].values())
    assert result["ms_per_image"]["warn"] > 0 and result["ms_per_image"]["gradcam"] > 0
    # Grad-CAM's backward pass must not leave gradients or training mode behind
    assert not model.training and all(p.grad is None for p in model.parameters())
