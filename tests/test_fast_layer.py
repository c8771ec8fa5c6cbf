"""The trainer's LSTM layer (training/fast_layer.py): its hand-written backward is the gradient of
``peephole_lstm_layer``, the artifact keeps the reference code, compilation is optional."""

from __future__ import annotations

import pytest
import torch

from tests.test_model import small_model
from training import fast_layer
from training.export import script
from training.fast_layer import PeepholeLayer, compiled_cells, peephole_layer
from training.model import peephole_lstm_layer


def layer_inputs(T: int = 5, B: int = 3, H: int = 4, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    torch.manual_seed(0)
    shapes = [(T, B, 4 * H), (B, H), (B, H), (H, 4 * H), (3, H)]
    return [torch.randn(*shape, dtype=dtype).requires_grad_() for shape in shapes]


def outputs_and_gradients(layer, inputs: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """The layer's three outputs and the gradients of every input, for a loss using all outputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = layer(*inputs)
    weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o) for o in outputs]
    sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
    return [*outputs, *(t.grad for t in inputs)]


def test_the_backward_is_the_gradient_of_the_forward() -> None:
    # Finite differences in float64 against the hand-written backward, every input and output.
    assert torch.autograd.gradcheck(PeepholeLayer.apply, layer_inputs())


def test_outputs_and_gradients_equal_autograd_through_the_reference_layer() -> None:
    inputs = layer_inputs(T=7, B=2, H=8, dtype=torch.float32)
    ours = outputs_and_gradients(peephole_layer, inputs)
    reference = outputs_and_gradients(peephole_lstm_layer, inputs)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_artifact_keeps_the_reference_layer() -> None:
    code = script(small_model()).forward.code
    assert "peephole_lstm_layer" in code and "PeepholeLayer" not in code and "peephole_layer(" not in code


def test_a_failed_compilation_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken_compile(function, **kwargs):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            raise RuntimeError("no C++ compiler\nmore detail")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fast_layer, "_compiled", {})
    inputs = layer_inputs()
    with compiled_cells(True):
        got = outputs_and_gradients(peephole_layer, inputs)
    for a, b in zip(got, outputs_and_gradients(peephole_layer, inputs), strict=True):
        assert torch.equal(a, b)
    lines = capsys.readouterr().err.splitlines()
    assert (
        lines == ["chargen: torch.compile of the LSTM cell failed, running eager (RuntimeError: no C++ compiler)"] * 2
    )  # once for the forward function, once for the backward one
    assert fast_layer.EAGER == fast_layer.KERNELS  # and eager again after the block


# torch.compile's own modules still call torch.jit APIs that warn of their deprecation.
@pytest.mark.filterwarnings("ignore:.*torch\\.jit.*:DeprecationWarning")
def test_compiled_cells_compute_what_the_eager_ones_do(capsys: pytest.CaptureFixture[str]) -> None:
    """One small compiled forward and backward (a few seconds of compilation)."""
    inputs = layer_inputs(T=3, B=2, H=4, dtype=torch.float32)
    eager = outputs_and_gradients(peephole_layer, inputs)
    with compiled_cells(True):
        compiled = outputs_and_gradients(peephole_layer, inputs)
    if "torch.compile of the LSTM cell failed" in capsys.readouterr().err:
        pytest.skip("torch.compile is not available on this machine")
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
