"""A Graves-style stacked LSTM for characters.

Alex Graves, "Generating Sequences With Recurrent Neural Networks" (2013), section 2:

    i_t = sigmoid(W_xi x_t + W_hi h_{t-1} + w_ci * c_{t-1} + b_i)       input gate
    f_t = sigmoid(W_xf x_t + W_hf h_{t-1} + w_cf * c_{t-1} + b_f)       forget gate
    c_t = f_t * c_{t-1} + i_t * tanh(W_xc x_t + W_hc h_{t-1} + b_c)     cell
    o_t = sigmoid(W_xo x_t + W_ho h_{t-1} + w_co * c_t + b_o)           output gate
    h_t = o_t * tanh(c_t)

The w_c* are the diagonal "peephole" weights. Layers are stacked with skip connections: the input
character reaches every layer (layer n sees [x_t, h^{n-1}_t]), and every layer's h reaches the
output layer (y_t = W_y [h^1_t, ..., h^N_t] + b_y).

The input-to-hidden products do not depend on the recurrence, so each layer computes them for the
whole segment in one matrix product (``x_proj``); only ``h_{t-1} @ W_h`` runs per time step.

The module is written so that ``torch.jit.script`` compiles it as is: the exported artifact is
this very code, with ``forward``, ``step``, ``init_state`` and ``inspect``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.fast_layer import peephole_layer


@dataclass
class ModelConfig:
    vocab_size: int = 65  # characters in the vocabulary (65 for Tiny Shakespeare)
    layers: int = 3  # stacked LSTM layers (Graves uses 3 to 8)
    hidden: int = 256  # units per layer
    dropout: float = 0.1  # dropout between layers and before the output layer (training only)

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def peephole_lstm_layer(
    x_proj: Tensor, h: Tensor, c: Tensor, w_h: Tensor, peephole: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one layer over a segment.

    x_proj: [T, B, 4H] input projections plus bias, gate order (i, f, g, o)
    h, c:   [B, H] state before the segment
    w_h:    [H, 4H] recurrent weights
    peephole: [3, H] diagonal weights w_ci, w_cf, w_co
    Returns the hidden states [T, B, H] and the final (h, c).
    """
    outputs: list[Tensor] = []
    w_ci, w_cf, w_co = peephole.unbind(0)
    # unbind, not x_proj[t]: indexing would make autograd build a full-size gradient per step.
    for x_t in x_proj.unbind(0):
        h, c = peephole_lstm_cell(torch.addmm(x_t, h, w_h), c, w_ci, w_cf, w_co)
        outputs.append(h)
    return torch.stack(outputs), h, c


def peephole_lstm_cell(gates: Tensor, c: Tensor, w_ci: Tensor, w_cf: Tensor, w_co: Tensor) -> tuple[Tensor, Tensor]:
    """One time step given the gate pre-activations W_x x_t + W_h h_{t-1} + b, [B, 4H]."""
    _, _, o, c = peephole_lstm_gates(gates, c, w_ci, w_cf, w_co)
    return o * torch.tanh(c), c


def peephole_lstm_gates(
    gates: Tensor, c: Tensor, w_ci: Tensor, w_cf: Tensor, w_co: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cell's equations: gate activations i, f, o and the new cell state c_t, each [B, H].

    Shared by ``peephole_lstm_cell`` (training and serving) and ``CharLSTM.inspect``, so the
    inspector shows exactly the numbers the model computes.
    """
    i, f, g, o = gates.chunk(4, dim=1)
    i = torch.sigmoid(i + w_ci * c)  # peepholes from c_{t-1} ...
    f = torch.sigmoid(f + w_cf * c)
    c = f * c + i * torch.tanh(g)
    o = torch.sigmoid(o + w_co * c)  # ... and from c_t
    return i, f, o, c


class CharLSTM(nn.Module):
    """N peephole LSTM layers with input-to-every-layer and every-layer-to-output skips."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        V, L, H = config.vocab_size, config.layers, config.hidden
        self.vocab_size = V
        self.layers = L
        self.hidden = H
        self.dropout = config.dropout
        # x_t is one-hot, so W_x x_t is a row lookup; one table holds every layer's rows.
        self.input_proj = nn.Embedding(V, L * 4 * H)
        # Layer n > 0 also sees h^{n-1}: W_below[n-1] maps it to that layer's four gates. With one
        # layer it is empty and takes no gradient (DDP fails on a parameter that never gets one).
        self.w_below = nn.Parameter(torch.empty(L - 1, H, 4 * H), requires_grad=L > 1)
        self.w_h = nn.Parameter(torch.empty(L, H, 4 * H))  # recurrent weights
        self.bias = nn.Parameter(torch.zeros(L, 4 * H))
        self.peephole = nn.Parameter(torch.zeros(L, 3, H))  # w_ci, w_cf, w_co per layer
        self.output = nn.Linear(L * H, V)  # every layer's h reaches the output
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.hidden
        bound = 1.0 / math.sqrt(H)
        for weight in (self.input_proj.weight, self.w_below, self.w_h, self.peephole):
            nn.init.uniform_(weight, -bound, bound)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[:, H : 2 * H] = 1.0  # forget-gate bias 1: remember by default
        nn.init.uniform_(self.output.weight, -bound, bound)
        nn.init.zeros_(self.output.bias)

    @torch.jit.export
    def init_state(self, batch: int) -> tuple[Tensor, Tensor]:
        """Zero (h, c), each [layers, batch, hidden]."""
        w = self.w_h
        zeros = torch.zeros(self.layers, batch, self.hidden, dtype=w.dtype, device=w.device)
        return zeros, zeros.clone()

    def forward(self, tokens: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens [B, T] int64, h and c [L, B, H] -> logits [B, T, V], new h, new c."""
        L, H = self.layers, self.hidden
        tokens = tokens.t()  # [T, B]
        w_x = self.input_proj.weight  # [V, L*4H]: every layer's columns of W_x
        below = w_x.new_zeros(0)  # h of the layer below, [T, B, H] once layer 0 has run
        layer_outputs: list[Tensor] = []
        new_h: list[Tensor] = []
        new_c: list[Tensor] = []
        for n in range(L):
            # W_x x_t + b for layer n, [T, B, 4H]: one lookup per layer in the table of W_x's rows
            # plus the bias (the same sums as adding b after the lookup, on [V, 4H] instead of
            # [T, B, 4H]); slicing one [T, B, L*4H] lookup per layer would make backward zero-fill
            # a gradient of that full size for every layer.
            x_proj = F.embedding(tokens, w_x[:, n * 4 * H : (n + 1) * 4 * H] + self.bias[n])
            if n > 0:
                x_proj = x_proj + torch.matmul(below, self.w_below[n - 1])
            if torch.jit.is_scripting():  # the artifact: autograd-free serving and evaluation
                hs, h_n, c_n = peephole_lstm_layer(x_proj, h[n], c[n], self.w_h[n], self.peephole[n])
            else:  # eager, as the trainer runs it: the same layer with a hand-written backward
                hs, h_n, c_n = peephole_layer(x_proj, h[n], c[n], self.w_h[n], self.peephole[n])
            new_h.append(h_n)
            new_c.append(c_n)
            hs = F.dropout(hs, self.dropout, self.training)
            layer_outputs.append(hs)
            below = hs
        logits = self.output(torch.cat(layer_outputs, dim=2))  # [T, B, V]
        return logits.transpose(0, 1), torch.stack(new_h), torch.stack(new_c)

    @torch.jit.export
    def step(self, tokens: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One character per stream: tokens [B] -> logits [B, V], new h, new c.

        Same math as ``forward`` with T = 1, without the segment bookkeeping: this is the
        serving hot path.
        """
        H = self.hidden
        x_all = self.input_proj(tokens)  # [B, L*4H]
        below = x_all.new_zeros(0)
        new_h: list[Tensor] = []
        new_c: list[Tensor] = []
        for n in range(self.layers):
            gates = x_all[:, n * 4 * H : (n + 1) * 4 * H] + self.bias[n]
            if n > 0:
                gates = torch.addmm(gates, below, self.w_below[n - 1])
            gates = torch.addmm(gates, h[n], self.w_h[n])
            w_ci, w_cf, w_co = self.peephole[n].unbind(0)
            h_n, c_n = peephole_lstm_cell(gates, c[n], w_ci, w_cf, w_co)
            new_h.append(h_n)
            new_c.append(c_n)
            below = h_n
        logits = self.output(torch.cat(new_h, dim=1))
        return logits, torch.stack(new_h), torch.stack(new_c)

    @torch.jit.export
    def inspect(self, tokens: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``forward`` that also returns what happens inside the cells, for the inspector.

        tokens [B, T] int64, h and c [L, B, H] -> (logits [B, T, V], gates [L, B, T, 3, H] (input,
        forget and output gate activations), cells [L, B, T, H] (c_t), new h, new c). The state
        after character t is (h_t, c_t) of every layer. Same math as ``forward`` in eval mode (no
        dropout); kept apart from it so that training's per-step loop collects nothing extra.
        """
        L, H = self.layers, self.hidden
        x_all = self.input_proj(tokens.t())  # [T, B, L*4H]
        below = x_all.new_zeros(0)
        layer_outputs: list[Tensor] = []
        layer_gates: list[Tensor] = []
        layer_cells: list[Tensor] = []
        new_h: list[Tensor] = []
        new_c: list[Tensor] = []
        for n in range(L):
            x_proj = x_all[:, :, n * 4 * H : (n + 1) * 4 * H] + self.bias[n]
            if n > 0:
                x_proj = x_proj + torch.matmul(below, self.w_below[n - 1])
            h_n, c_n, w_h = h[n], c[n], self.w_h[n]
            w_ci, w_cf, w_co = self.peephole[n].unbind(0)
            hs: list[Tensor] = []
            gs: list[Tensor] = []
            cs: list[Tensor] = []
            for x_t in x_proj.unbind(0):
                i, f, o, c_n = peephole_lstm_gates(torch.addmm(x_t, h_n, w_h), c_n, w_ci, w_cf, w_co)
                h_n = o * torch.tanh(c_n)
                hs.append(h_n)
                gs.append(torch.stack([i, f, o], dim=1))  # [B, 3, H]
                cs.append(c_n)
            below = torch.stack(hs)  # [T, B, H]
            layer_outputs.append(below)
            layer_gates.append(torch.stack(gs, dim=1))  # [B, T, 3, H]
            layer_cells.append(torch.stack(cs, dim=1))  # [B, T, H]
            new_h.append(h_n)
            new_c.append(c_n)
        logits = self.output(torch.cat(layer_outputs, dim=2))  # [T, B, V]
        return (
            logits.transpose(0, 1),
            torch.stack(layer_gates),
            torch.stack(layer_cells),
            torch.stack(new_h),
            torch.stack(new_c),
        )


def upgrade_state_dict(state: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """Weights saved by an earlier trainer, in today's shapes.

    Before W_below became empty for a one-layer model it was an unused [1, H, 4H] tensor; dropping
    it changes nothing the model computes.
    """
    below = state.get("w_below")
    if layers == 1 and below is not None and below.shape[0] == 1:
        state = {**state, "w_below": below[:0]}
    return state


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
