"""The pool-first attention equals the per-pixel formulation it replaced (tests/reference_attention.py)."""

import pytest
import torch

from models.attention import AttentionModule, GlobalGate, mask_forms, mask_logits, pool_patches, shifted_masks
from models.checkpoint import load
from models.warn import WARN, WARNConfig
from service.config import DEFAULT_MODEL
from tests import reference_attention as ref


def reference_outputs(model: WARN, x: torch.Tensor, monkeypatch) -> tuple:
    with monkeypatch.context() as m:
        m.setattr(AttentionModule, "forward", ref.attention_module)
        m.setattr(GlobalGate, "forward", ref.global_gate)
        return model(x)


def assert_outputs_close(got, want, atol: float) -> None:
    for name, a, b in zip(got._fields, got, want):
        if isinstance(a, tuple):
            for i, (ai, bi) in enumerate(zip(a, b)):
                torch.testing.assert_close(ai, bi, atol=atol, rtol=0, msg=f"{name}[{i}]")
        elif a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)


def test_pool_patches_is_the_masked_sum_of_unfolded_patches():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    mask = torch.rand(2, 3, 7, 6, dtype=torch.float64)
    patches = torch.nn.functional.unfold(z, 3, padding=1).unflatten(1, (5, 9))  # (N, C, 9, S): (c, ky, kx)
    want = torch.einsum("ncds,nks->nkdc", patches, mask.flatten(2)).flatten(2)  # (N, K, 9*C): (ky, kx, c)
    torch.testing.assert_close(pool_patches(z, mask), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(7, 6), (1, 1), (2, 5)])
def test_masks_are_shifted_alike_in_pytorch_and_in_the_export(monkeypatch, size):
    """Slices in PyTorch, a one-hot grouped convolution in the export (models.attention.shifted_masks)."""
    torch.manual_seed(2)
    mask = torch.rand(2, 3, *size, dtype=torch.float64)
    sliced = shifted_masks(mask)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(shifted_masks(mask), sliced, atol=0, rtol=0)
    h, w = size
    padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
    ky, kx = 0, 2  # channel 2 of head 1: H(y + 1, x - 1)
    torch.testing.assert_close(sliced[:, 1 * 9 + ky * 3 + kx].reshape(2, h, w), padded[:, 1, 2:, :w])


@pytest.mark.parametrize("size", [(48, 48), (33, 20)])
def test_equal_to_the_per_pixel_formulation_on_random_weights(monkeypatch, size):
    torch.manual_seed(1)
    cfg = WARNConfig(depth=10, width=1, num_classes=37, attention_width=3, input_size=size)
    model = WARN(cfg).double().eval()
    x = torch.rand(3, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        got, want = model(x), reference_outputs(model, x, monkeypatch)
    assert_outputs_close(got, want, atol=1e-10)  # float64: the two differ only in summation order
    model.float()
    with torch.no_grad():
        got, want = model(x.float()), reference_outputs(model, x.float(), monkeypatch)
    assert_outputs_close(got, want, atol=1e-5)


def test_equal_on_the_default_model(monkeypatch):
    from models.data import ClutteredDigits, ClutterSpec

    model, _ = load(DEFAULT_MODEL.with_name("model.pt"))
    x = ClutteredDigits("test", 0, ClutterSpec(test_per_scan=1), none_class=True).images[:24]

    # Log-probabilities of classes near -40 carry more than 1e-5 of float32 rounding in either
    # formulation, so they are compared as probabilities, as the export publishes them.
    def as_probabilities(o):
        return o._replace(log_probabilities=o.probabilities, layer_log_probabilities=o.layer_log_probabilities.exp())

    with torch.no_grad():
        wide = model.double()
        got, want = wide(x.double()), reference_outputs(wide, x.double(), monkeypatch)
        assert_outputs_close(as_probabilities(got), as_probabilities(want), atol=1e-10)  # the same sums
        model = model.float()
        got, want = model(x), reference_outputs(model, x, monkeypatch)
    # In float32 the summation order shows (1.7e-6 at most on this model), and 3e-15 in float64 above.
    assert_outputs_close(as_probabilities(got), as_probabilities(want), atol=1e-5)


def test_gradients_equal_the_per_pixel_formulation(monkeypatch):
    torch.manual_seed(2)
    model = WARN(WARNConfig(depth=10, width=1, attention_width=2)).double().train()
    x, y = torch.rand(4, 3, 48, 48, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    model.loss(model(x), y).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.loss(reference_outputs(model, x, monkeypatch), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-10, rtol=1e-8, msg=n)


@pytest.mark.parametrize("form", ["taps", "rows"])
@pytest.mark.parametrize(("heads", "cin", "size"), [(4, 5, (7, 6)), (1, 3, (1, 1)), (3, 8, (2, 9)), (6, 2, (5, 4))])
def test_reordered_mask_logits_equal_the_convolution(form, heads, cin, size):
    torch.manual_seed(3)
    z = torch.randn(2, cin, *size, dtype=torch.float64)
    w = torch.randn(heads, cin, 3, 3, dtype=torch.float64)
    want = torch.nn.functional.conv2d(z, w, padding=1)
    torch.testing.assert_close(mask_logits(z, w, form), want, atol=1e-12, rtol=0)


def test_an_unknown_mask_form_is_refused():
    with pytest.raises(ValueError, match="form must be one of"):
        mask_logits(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), "cols")


def test_mask_forms_change_no_output_and_are_undone():
    torch.manual_seed(4)
    model = WARN(WARNConfig(depth=10, width=1, num_classes=7, attention_width=3, input_size=(20, 28))).double().eval()
    x = torch.rand(2, 3, 20, 28, dtype=torch.float64)
    forms = {model.attention[0]: "rows", model.attention[1]: "taps", model.global_gate: "taps"}
    with torch.no_grad():
        want = model(x)
        with mask_forms(forms):
            assert [m.mask_form for m in forms] == list(forms.values())
            got = model(x)
    assert all(m.mask_form == "conv" for m in forms)
    assert_outputs_close(got, want, atol=1e-10)
