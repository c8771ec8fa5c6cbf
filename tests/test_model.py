"""The Graves LSTM: the math of one step, skips, initialisation, segment == steps, scripting."""

from __future__ import annotations

import torch

from training.export import script
from training.model import CharLSTM, ModelConfig


def small_model(layers: int = 3, hidden: int = 8, vocab: int = 11, seed: int = 0) -> CharLSTM:
    torch.manual_seed(seed)
    model = CharLSTM(ModelConfig(vocab_size=vocab, layers=layers, hidden=hidden, dropout=0.0))
    with torch.no_grad():  # non-zero peepholes and biases so the test sees them act
        model.peephole.uniform_(-0.5, 0.5)
        model.bias.uniform_(-0.5, 0.5)
    return model.eval()


def reference_step(model: CharLSTM, token: int, h: torch.Tensor, c: torch.Tensor):
    """Graves (2013) eq. 7-11 written out per gate with explicit one-hot inputs, layer by layer."""
    V, L, H = model.vocab_size, model.layers, model.hidden
    x = torch.zeros(V)
    x[token] = 1.0
    w_x = model.input_proj.weight.T  # [L*4H, V]
    hs, cs = [], []
    below = None
    for n in range(L):
        rows = slice(n * 4 * H, (n + 1) * 4 * H)
        pre = w_x[rows] @ x + model.bias[n] + model.w_h[n].T @ h[n]
        if below is not None:
            pre = pre + model.w_below[n - 1].T @ below
        a_i, a_f, a_g, a_o = pre.split(H)
        w_ci, w_cf, w_co = model.peephole[n]
        i = torch.sigmoid(a_i + w_ci * c[n])
        f = torch.sigmoid(a_f + w_cf * c[n])
        c_new = f * c[n] + i * torch.tanh(a_g)
        o = torch.sigmoid(a_o + w_co * c_new)
        h_new = o * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        below = h_new
    logits = model.output.weight @ torch.cat(hs) + model.output.bias
    return logits, torch.stack(hs), torch.stack(cs)


@torch.no_grad()
def test_step_matches_the_papers_equations() -> None:
    model = small_model()
    h = torch.randn(3, 1, 8)
    c = torch.randn(3, 1, 8)
    logits, h1, c1 = model.step(torch.tensor([4]), h, c)
    ref_logits, ref_h, ref_c = reference_step(model, 4, h[:, 0], c[:, 0])
    torch.testing.assert_close(logits[0], ref_logits)
    torch.testing.assert_close(h1[:, 0], ref_h)
    torch.testing.assert_close(c1[:, 0], ref_c)


@torch.no_grad()
def test_forget_bias_starts_at_one_and_other_biases_at_zero() -> None:
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=5, layers=2, hidden=4))
    for n in range(2):
        assert torch.equal(model.bias[n, 4:8], torch.ones(4))
        assert torch.equal(model.bias[n, :4], torch.zeros(4))
        assert torch.equal(model.bias[n, 8:], torch.zeros(8))


@torch.no_grad()
def test_input_reaches_every_layer_and_every_layer_reaches_the_output() -> None:
    model = small_model(layers=3)
    assert model.output.in_features == 3 * model.hidden  # [h^1, h^2, h^3] -> output
    h, c = model.init_state(1)
    _, h1, _ = model.step(torch.tensor([1]), h, c)
    _, h2, _ = model.step(torch.tensor([2]), h, c)
    # With zero state, layer 3 differs between inputs even if the layers below it were cut off:
    with torch.no_grad():
        model.w_below.zero_()
    _, h1_cut, _ = model.step(torch.tensor([1]), h, c)
    _, h2_cut, _ = model.step(torch.tensor([2]), h, c)
    assert not torch.allclose(h1_cut[2], h2_cut[2])  # the input reaches layer 3 directly
    # Zeroing the output weights that read layer 1 changes the logits: layer 1 reaches the output.
    logits, _, _ = model.step(torch.tensor([1]), h, c)
    model.output.weight[:, : model.hidden] = 0
    logits_cut, _, _ = model.step(torch.tensor([1]), h, c)
    assert not torch.allclose(logits, logits_cut)
    assert not torch.allclose(h1[0], h2[0])


@torch.no_grad()
def test_t_single_steps_equal_one_segment_forward() -> None:
    model = small_model()
    tokens = torch.randint(0, 11, (4, 13))
    h0 = torch.randn(3, 4, 8)
    c0 = torch.randn(3, 4, 8)
    logits, h, c = model(tokens, h0, c0)
    hs, cs = h0, c0
    for t in range(13):
        step_logits, hs, cs = model.step(tokens[:, t], hs, cs)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hs, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cs, c, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_scripted_model_equals_eager() -> None:
    model = small_model()
    scripted = script(model)
    tokens = torch.randint(0, 11, (2, 9))
    h, c = model.init_state(2)
    for a, b in zip(model(tokens, h, c), scripted(tokens, h, c), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.step(tokens[:, 0], h, c), scripted.step(tokens[:, 0], h, c), strict=True):
        torch.testing.assert_close(a, b)


def test_segment_gradients_flow_to_every_parameter() -> None:
    model = small_model()
    model.train()
    tokens = torch.randint(0, 11, (2, 6))
    h, c = model.init_state(2)
    logits, _, _ = model(tokens, h, c)
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def saved_bytes(model: CharLSTM, tokens: torch.Tensor) -> int:
    """Bytes autograd keeps for backward of one forward (each storage counted once), under CPU
    bf16 autocast: the same code path as CUDA's bf16 autocast."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    h, c = model.init_state(tokens.size(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, _ = model(tokens, h, c)
    logits.float().sum().backward()
    return sum(storages.values())


def test_autocast_keeps_activations_per_step_not_a_cast_of_the_weights() -> None:
    B, L, H = 2, 2, 16
    model = small_model(layers=L, hidden=H)
    tokens = torch.randint(0, 11, (B, 12))
    per_step = (saved_bytes(model, tokens) - saved_bytes(model, tokens[:, :4].clone())) // 8
    # What one more character costs, all of it activations: per layer the gate activations (4H),
    # tanh(c_t), h_t and c_t in float32; the bf16 copy of the layer below's h that W_below's product
    # keeps; the bf16 copy of every layer's h that the output layer keeps; the int64 character.
    # A bf16 cast of W_h per step and layer would add L * H * 4H * 2 = 8,192 bytes.
    activations = L * B * (4 * H + 3 * H) * 4 + (L - 1) * B * H * 2 + B * L * H * 2 + B * 8
    assert per_step == activations
