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


def test_aux_weight_adds_each_attended_layers_own_loss(tiny_config):
    """aux_weight x the attended layers' mean NLL is added to the paper's loss; the backbone's own output is not."""
    from dataclasses import replace

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = WARN(replace(tiny_config, reg_weight=0.0)).eval()
    out = model(torch.rand(4, 3, 48, 48))
    target = torch.tensor([0, 1, 2, 3])
    paper = model.loss(out, target)
    model.config.aux_weight = 0.5
    layers = out.layer_log_probabilities
    per_layer = [F.nll_loss(layers[:, i], target) for i in range(layers.shape[1] - 1)]
    expected = paper + 0.5 * torch.stack(per_layer).mean()
    torch.testing.assert_close(model.loss(out, target), expected)
    assert WARNConfig.from_dict({k: v for k, v in tiny_config.to_dict().items() if k != "aux_weight"}).aux_weight == 0


@pytest.mark.parametrize("name", ["reg_weight", "aux_weight", "gate_decay"])
def test_loss_weights_must_be_non_negative_numbers(tiny_config, name):
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=name):
            WARNConfig(**{**tiny_config.to_dict(), name: bad})


def test_gate_decay_penalizes_saturated_gates_only_by_their_spread():
    from models.warn import gate_spread

    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [12.0, 10.0, 10.0, 10.0]])  # the same gates, shifted
    spread = gate_spread(logits.softmax(1))
    torch.testing.assert_close(spread, torch.tensor(0.75))  # centred logits 1.5, -0.5 x3: mean square 0.75
    assert gate_spread(torch.full((3, 4), 0.25)) == 0
    assert gate_spread(torch.tensor([[20.0, 0, 0, 0]]).softmax(1)) > 50 * spread


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


def test_gates_without_tanh_are_a_plain_softmax_and_old_configs_keep_tanh(tiny_config):
    from dataclasses import replace

    torch.manual_seed(0)
    plain = WARN(replace(tiny_config, gate_tanh=False)).eval()
    paper = WARN(tiny_config).eval()
    paper.load_state_dict(plain.state_dict())  # the same weights, read two ways
    x = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        a, b = plain(x), paper(x)
    # same masks; tanh only squeezes the gate logits, so the paper's gates are never sharper
    torch.testing.assert_close(a.attention[0], b.attention[0])
    assert (a.global_gates.max(1).values >= b.global_gates.max(1).values - 1e-6).all()
    assert b.global_gates.max(1).values.max() <= torch.e**2 / (torch.e**2 + b.global_gates.shape[1] - 1) + 1e-6
    config = tiny_config.to_dict()
    del config["gate_tanh"]  # a checkpoint written before the option existed
    assert WARNConfig.from_dict(config).gate_tanh is True


def test_robustness_report_covers_shifted_renderings_and_images_without_digits(tiny_config):
    from models.evaluate import renderings, robustness

    torch.manual_seed(0)
    report = robustness(WARN(tiny_config).eval())
    for name in renderings():
        assert 0 <= report[name]["top1_accuracy"] <= 1 and 0 <= report[name]["pointing_game"] <= 1
    for name in ("clutter only (300 canvases)", "scikit-learn sample photos (2)", "photos and their quadrants (20)"):
        assert 0 < report[name]["top_probability_mean"] <= 1
        assert report[name]["most_common_answer"] in tiny_config.class_names  # no "none" class to answer with


def test_the_default_model_says_something_with_its_gates_and_knows_when_there_is_no_digit():
    """Its gates differ from image to image (the paper's softmax(tanh) pinned them to within 5e-4), every
    attended layer spreads its trust over several heads, and clutter without a digit is answered "none"."""
    from pathlib import Path

    from models.checkpoint import load
    from models.data import ClutteredDigits, ClutterSpec, clutter_only

    model, _ = load(Path(__file__).resolve().parents[1] / "default_model/model.pt")
    ds = ClutteredDigits("test", 0, ClutterSpec(test_per_scan=1), none_class=True)
    with torch.no_grad():
        out = model(ds.images)
    assert out.global_gates.std(0).max() > 0.01
    for gates in out.gates:  # (N, K)
        assert gates.std(0).max() > 0.05
        entropy = -(gates * gates.clamp_min(1e-12).log()).sum(1)
        assert entropy.mean() > 0.5 and entropy.std() > 0.05  # no head takes all, and not the same mix each time
    empty = clutter_only(60)
    with torch.no_grad():
        answers = model(empty).probabilities.argmax(1)
    assert float((answers == model.config.class_names.index("none")).float().mean()) > 0.85
