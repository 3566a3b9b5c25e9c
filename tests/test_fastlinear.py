"""fp32 linear layers through oneDNN: same values and gradients as F.linear, same model otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification

from ftkit import fastlinear
from ftkit.fastlinear import onednn_linear, use_onednn_linear

pytestmark = pytest.mark.skipif(not fastlinear.available(), reason="this torch build has no oneDNN")


def _grads(fn, x, w, b):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    out = fn(x, w, b)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(24, 16, generator=gen)
    b = torch.randn(24, generator=gen) if bias else None
    got = _grads(onednn_linear, x, w, b)
    want = _grads(F.linear, x, w, b)
    assert got[0].shape == want[0].shape == (*shape[:-1], 24)
    for g, r in zip(got, want, strict=True):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_frozen_weight():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=gen).t().requires_grad_()  # (6, 16), transposed view
    w = torch.randn(8, 16, generator=gen)  # frozen: no gradient asked for
    out = onednn_linear(x, w)
    out.sum().backward()
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, w.sum(0).expand(6, 16), rtol=1e-5, atol=1e-5)
    assert w.grad is None


def test_autocast_and_tracing_take_torch_path():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn_linear(x, w).dtype == F.linear(x, w).dtype == torch.bfloat16
    graph = str(torch.jit.trace(lambda a: onednn_linear(a, w), x).graph)
    assert "aten::linear" in graph and "mkldnn" not in graph  # exported graphs stay portable
    assert onednn_linear(x.double(), w.double()).dtype == torch.float64  # other dtypes: F.linear


def _batch(n: int = 3, length: int = 9):
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 400, (n, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2][:n])}


def test_patched_model_trains_like_the_original(tiny_model, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    patched = copy.deepcopy(base)
    decision = use_onednn_linear(patched, "onednn")
    linears = [m for m in patched.modules() if isinstance(m, nn.Linear)]
    assert decision["linear_backend"] == "onednn" and decision["linear_layers"] == len(linears) > 0
    assert all(type(m) is nn.Linear for m in linears)  # types stay: quantization and peft still match them
    assert patched.state_dict().keys() == base.state_dict().keys()
    batch = _batch()
    for model in (base, patched):
        model.train()
        torch.manual_seed(1)  # the same dropout masks for both
        model(**batch).loss.backward()
    for (name, p), q in zip(base.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Saved weights are plain: a fresh load (torch's linear) gives the patched model's logits.
    patched.eval().save_pretrained(tmp_path, safe_serialization=True)
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, patched(**batch).logits, rtol=1e-5, atol=1e-6)


def test_modes(tiny_model, monkeypatch):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    forward = nn.Linear.forward
    assert use_onednn_linear(model, "torch")["linear_backend"] == "torch"
    assert all("forward" not in vars(m) for m in model.modules())
    with pytest.raises(ValueError, match="auto, onednn, torch"):
        use_onednn_linear(model, "fast")
    # auto follows the measurement, with a 15% margin for oneDNN.
    monkeypatch.setattr(fastlinear, "measure", lambda *a, **k: {"torch": 100.0, "onednn": 110.0})
    assert use_onednn_linear(model, "auto")["linear_backend"] == "torch"
    monkeypatch.setattr(fastlinear, "measure", lambda *a, **k: {"torch": 100.0, "onednn": 200.0})
    decision = use_onednn_linear(model, "auto")
    assert decision == {
        "linear_backend": "onednn",
        "linear_layers": decision["linear_layers"],
        "linear_gflops_torch": 100.0,
        "linear_gflops_onednn": 200.0,
    }
    assert nn.Linear.forward is forward  # the class is never touched


def test_auto_falls_back_when_the_kernel_fails(tiny_model, monkeypatch):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)

    def broken(*args, **kwargs):
        raise RuntimeError("mkldnn::_linear_pointwise: unsupported")

    monkeypatch.setattr(fastlinear, "measure", broken)
    assert use_onednn_linear(model, "auto")["linear_backend"] == "torch"
    assert all("forward" not in vars(m) for m in model.modules())


def test_lora_wraps_patched_layers(tiny_model):
    from ftkit.models import ModelArguments, add_lora, lora_config

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    use_onednn_linear(model, "onednn")
    model = add_lora(model, lora_config(ModelArguments(use_lora=True, lora_r=4), "text-classification"))
    model(**_batch()).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # B starts at zero, so only B has a gradient at step 0.
    assert any("lora_B" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert all(g is None for n, g in grads.items() if "base_layer" in n)  # the frozen base gets none


def test_measure_reports_both():
    speed = fastlinear.measure(16, 32, tokens=64, repeats=2)
    assert set(speed) == {"torch", "onednn"} and all(v > 0 for v in speed.values())


def test_load_model_only_loads_and_speed_up_sets_dropout_and_backend(tiny_model):
    from transformers import TrainingArguments

    from ftkit.config import Options
    from ftkit.models import load_model
    from ftkit.speed import SpeedArguments, speed_up

    labels = {"a": 0, "b": 1}
    kept = load_model(tiny_model, "text-classification", labels)
    assert {m.p for n, m in kept.named_modules() if n.endswith("attention.self.dropout")} == {0.1}
    assert all("forward" not in vars(m) for m in kept.modules())  # as loaded: torch's linear
    model = load_model(tiny_model, "text-classification", labels)
    args = SpeedArguments(attention_dropout=0.0, linear_backend="onednn", precision="fp32")
    decision, _ = speed_up(model, args, TrainingArguments(use_cpu=True), Options(origins={}))
    assert decision["linear_backend"] == "onednn"
    dropouts = [m for n, m in model.named_modules() if n.endswith("attention.self.dropout")]
    assert len(dropouts) == 2 and all(m.p == 0.0 for m in dropouts)  # one per layer
    assert model.config.attention_probs_dropout_prob == 0.0  # saved config.json says so too
    assert all("forward" in vars(m) for m in model.modules() if isinstance(m, nn.Linear))


def test_hidden_dropout_sets_the_encoder_and_leaves_the_head_and_attention(tiny_model):
    from ftkit.models import load_model
    from ftkit.speed import set_hidden_dropout

    model = load_model(tiny_model, "text-classification", {"a": 0, "b": 1})
    assert not set_hidden_dropout(model, None)  # default: the checkpoint's own
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.1}
    assert set_hidden_dropout(model, 0.0)
    p = {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
    hidden = [n for n in p if n.endswith(("embeddings.dropout", "output.dropout"))]
    assert len(hidden) == 1 + 2 * 2 and all(p[n] == 0.0 for n in hidden)  # embeddings, two per layer
    assert p["dropout"] == 0.1 and all(v == 0.1 for n, v in p.items() if n.endswith("self.dropout"))
    # Saved config: a reload builds the same encoder dropout and the same head dropout.
    assert model.config.hidden_dropout_prob == 0.0 and model.config.classifier_dropout == 0.1


@pytest.mark.parametrize("fault", ["wrong values", "error"])
def test_a_changed_private_op_falls_back_to_torch_with_a_warning(tiny_model, monkeypatch, caplog, fault):
    right = fastlinear.mm_t

    def changed(a, b_t, bias=None):
        if fault == "error":
            raise RuntimeError("mkldnn::_linear_pointwise() expected 5 arguments")
        return right(a, b_t, bias) * 1.01

    monkeypatch.setattr(fastlinear, "mm_t", changed)
    fastlinear.op_matches_f_linear.cache_clear()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
        with caplog.at_level("WARNING", logger="ftkit.fastlinear"):
            assert use_onednn_linear(model, "onednn")["linear_backend"] == "torch"
        assert "torch default" in caplog.text
        assert all("forward" not in vars(m) for m in model.modules())
    finally:
        monkeypatch.undo()
        fastlinear.op_matches_f_linear.cache_clear()  # the real op, for the tests after this one
    assert fastlinear.op_matches_f_linear()
