"""The peephole LSTM layer as the trainer runs it: the same math as ``model.peephole_lstm_layer``,
with a hand-written backward.

Autograd through ``peephole_lstm_layer`` records about a dozen small ops per time step and, going
back, accumulates the recurrent weights' gradient with one small matrix product per step. Here one
autograd node covers the whole segment:

- forward: per step one ``addmm`` (``W_x x_t + b + W_h h_{t-1}``) and a few in-place pointwise ops
  on its output; the activations are kept for backward;
- backward: per step the pointwise gradient of the cell and one ``addmm`` for ``dh_{t-1}``; the
  gradients of ``W_h`` and the peepholes come afterwards from one matrix product and three
  reductions over the whole segment.

Under autocast (bf16 on CUDA, or on CPU in the tests) ``W_h`` is cast once per segment, not at every
step: autocast caches casts of leaf tensors only, and ``w_h[n]`` is a view. The cell's state and
pointwise math stay in float32.

tanh(x) is computed as 2 sigmoid(2x) - 1, the same function: on the development CPU ``torch.tanh``
takes about 5x as long as ``torch.sigmoid``, and the sigmoids of the i and f gates and of the cell
input (for its tanh) become one call. ``CharLSTM.forward`` uses this layer in eager mode; the scripted
artifact keeps ``peephole_lstm_layer`` (TorchScript drops the eager branch).

``compiled_cells()`` swaps the two per-step pointwise functions for ``torch.compile``d ones, which
fuse each into one kernel: one launch instead of about fifteen, which is what a GPU waits on. On the
development CPU the compiled step measured slower than these eager functions (docs/training.md), so
by default the trainer compiles on CUDA only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def cell_forward(
    gates: Tensor, c: Tensor, w_cif: Tensor, w_co: Tensor, one: Tensor, h_out: Tensor, c_out: Tensor, tanh_out: Tensor
) -> None:
    """One time step, in place.

    gates [B, 4, H] holds the pre-activations W_x x_t + b + W_h h_{t-1} (gate order i, f, g, o) and
    receives the activations i, f, g, o; c is c_{t-1} [B, H]; w_cif the peepholes w_ci, w_cf as
    [2, H] and w_co [H]; one a 1-element tensor holding 1. Writes h_t, c_t and tanh(c_t).
    """
    i, f, g, o = gates.unbind(1)
    gates[:, :2].addcmul_(w_cif, c.unsqueeze(1))  # i and f see c_{t-1}
    g.add_(g)
    gates[:, :3].sigmoid_()  # i, f and sigmoid(2 a_g): one call for three gates
    g.sub_(one, alpha=0.5).add_(g)  # tanh(x) = 2 sigmoid(2x) - 1
    torch.mul(f, c, out=c_out).addcmul_(i, g)  # c_t = f c_{t-1} + i g
    o.addcmul_(w_co, c_out).sigmoid_()  # o sees c_t
    torch.add(c_out, c_out, out=tanh_out).sigmoid_()
    tanh_out.sub_(one, alpha=0.5).add_(tanh_out)
    torch.mul(o, tanh_out, out=h_out)


def cell_backward(
    dh: Tensor,
    dc: Tensor,
    gates: Tensor,
    c_prev: Tensor,
    tanh_c: Tensor,
    w_ci: Tensor,
    w_cf: Tensor,
    w_co: Tensor,
    one: Tensor,
    da: Tensor,
) -> Tensor:
    """The cell's gradient at one step.

    dh: dLoss/dh_t (from the layer's output and from step t+1); dc: dLoss/dc_t through c_{t+1};
    gates [B, 4, H] and tanh_c: what ``cell_forward`` wrote; c_prev: c_{t-1}.
    Writes dLoss/da, the gradient of the gate pre-activations, into da [B, 4, H]; returns
    dLoss/dc_{t-1}.
    """
    i, f, g, o = gates.unbind(1)
    # sigmoid'(x) = s (1 - s), tanh'(x) = 1 - tanh(x)^2
    da_o = (dh * tanh_c).mul_(torch.addcmul(o, o, o, value=-1))
    dc = torch.addcmul(dc, dh * o, torch.addcmul(one, tanh_c, tanh_c, value=-1))
    dc.addcmul_(da_o, w_co)
    da_i = (dc * g).mul_(torch.addcmul(i, i, i, value=-1))
    da_f = (dc * c_prev).mul_(torch.addcmul(f, f, f, value=-1))
    da_g = (dc * i).mul_(torch.addcmul(one, g, g, value=-1))
    torch.stack([da_i, da_f, da_g, da_o], dim=1, out=da)
    dc_prev = dc * f
    return dc_prev.addcmul_(da_i, w_ci).addcmul_(da_f, w_cf)


# The two per-step functions the layer calls; compiled_cells() swaps in compiled ones.
KERNELS: dict[str, Callable[..., Any]] = {"forward": cell_forward, "backward": cell_backward}


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the layer's matrix products: autocast's where it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class PeepholeLayer(torch.autograd.Function):
    """One layer over a segment: ``peephole_lstm_layer(x_proj, h, c, w_h, peephole)``."""

    @staticmethod
    def forward(ctx, x_proj: Tensor, h0: Tensor, c0: Tensor, w_h: Tensor, peephole: Tensor):  # type: ignore[override]
        T, (B, H) = x_proj.shape[0], c0.shape
        state = c0.dtype  # the cell's pointwise math and its state: float32 (float64 in gradcheck)
        w = w_h.to(matmul_dtype(x_proj.device, w_h.dtype))  # once per segment; a no-op without autocast
        p = peephole.to(state)
        one = c0.new_ones(1)
        hs = c0.new_empty(T + 1, B, H)  # h_0 .. h_T
        cs = c0.new_empty(T + 1, B, H)  # c_0 .. c_T
        gates = c0.new_empty(T, B, 4 * H)  # the activations i, f, g, o of every step
        tanh_c = c0.new_empty(T, B, H)
        hs[0], cs[0] = h0, c0
        # Each step's slices, made once: a view costs about as much as a small op.
        h_, c_, a_, tanh_ = hs.unbind(0), cs.unbind(0), gates.unbind(0), tanh_c.unbind(0)
        gates_ = gates.view(T, B, 4, H).unbind(0)
        cell = KERNELS["forward"]
        w_cif, w_co = p[:2], p[2]
        with torch.autocast(x_proj.device.type, enabled=False):  # the dtypes here are explicit
            for t, x_t in enumerate(x_proj.to(state).unbind(0)):
                if w.dtype == state:
                    torch.addmm(x_t, h_[t], w, out=a_[t])
                else:  # bf16 product, float32 sum
                    torch.add(x_t, torch.mm(h_[t].to(w.dtype), w), out=a_[t])
                cell(gates_[t], c_[t], w_cif, w_co, one, h_[t + 1], c_[t + 1], tanh_[t])
        # All that backward needs goes through save_for_backward, so saved-tensor hooks (and the
        # test that counts the bytes kept per step) see every byte.
        ctx.save_for_backward(w, p, hs, cs, gates, tanh_c)
        ctx.input_dtypes = (x_proj.dtype, h0.dtype, c0.dtype, w_h.dtype, peephole.dtype)
        return hs[1:], hs[T], cs[T]

    @staticmethod
    def backward(ctx, d_out: Tensor, d_h: Tensor, d_c: Tensor):  # type: ignore[override]
        w, p, hs, cs, gates, tanh_c = ctx.saved_tensors
        T, B, H = tanh_c.shape
        state = hs.dtype
        w_t = w.t().contiguous()  # measured ~15% faster per step than the transposed view
        w_ci, w_cf, w_co = p.unbind(0)
        one = p.new_ones(1)
        d_a = hs.new_empty(T, B, 4 * H)  # dLoss/d(gate pre-activations) of every step
        d_out = d_out.to(state)
        d_out_, c_, tanh_, d_a_ = d_out.unbind(0), cs.unbind(0), tanh_c.unbind(0), d_a.unbind(0)
        gates_, d_gates_ = gates.view(T, B, 4, H).unbind(0), d_a.view(T, B, 4, H).unbind(0)
        cell = KERNELS["backward"]
        dh, dc = d_out_[T - 1] + d_h.to(state), d_c.to(state)
        for t in range(T - 1, -1, -1):
            dc = cell(dh, dc, gates_[t], c_[t], tanh_[t], w_ci, w_cf, w_co, one, d_gates_[t])
            if t == 0 and not ctx.needs_input_grad[1]:
                break  # dLoss/dh_0 is not wanted: the trainer detaches the carried state
            if w.dtype != state:  # bf16 product, float32 sum
                dh = torch.mm(d_a_[t].to(w.dtype), w_t) + (d_out_[t - 1] if t > 0 else 0)
            elif t > 0:
                dh = torch.addmm(d_out_[t - 1], d_a_[t], w_t)
            else:
                dh = torch.mm(d_a_[t], w_t)
        # The weights' gradients for the whole segment at once: one matrix product, three sums.
        d_w = torch.mm(hs[:-1].reshape(T * B, H).t().to(w.dtype), d_a.view(T * B, 4 * H).to(w.dtype))
        d_i, d_f, _, d_o = d_a.view(T, B, 4, H).unbind(2)
        c_prev, c_new = cs[:-1], cs[1:]
        d_p = torch.stack([(d_i * c_prev).sum((0, 1)), (d_f * c_prev).sum((0, 1)), (d_o * c_new).sum((0, 1))])
        x_dtype, h_dtype, c_dtype, w_dtype, p_dtype = ctx.input_dtypes
        d_h0 = dh.to(h_dtype) if ctx.needs_input_grad[1] else None
        return d_a.to(x_dtype), d_h0, dc.to(c_dtype), d_w.to(w_dtype), d_p.to(p_dtype)


def peephole_layer(
    x_proj: Tensor, h: Tensor, c: Tensor, w_h: Tensor, peephole: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Same signature and result as ``model.peephole_lstm_layer``."""
    return PeepholeLayer.apply(x_proj, h, c, w_h, peephole)


EAGER: dict[str, Callable[..., Any]] = dict(KERNELS)
_compiled: dict[str, Callable[..., Any]] = {}  # made once: dynamo keeps its compiled code per function


@contextmanager
def compiled_cells(enabled: bool) -> Iterator[None]:
    """Within the block, run the two per-step functions through torch.compile (where enabled).

    Compilation happens at the first step of each new shape (the training batch, then the
    evaluation rows). Where it fails (no C++ compiler or no Triton, an unsupported platform), the
    eager functions take over and one line on stderr says why.
    """
    if enabled:
        if not _compiled:
            for name, function in EAGER.items():
                _compiled[name] = _with_fallback(name, torch.compile(function, dynamic=None), function)
        KERNELS.update(_compiled)
    try:
        yield
    finally:
        KERNELS.update(EAGER)


def _with_fallback(name: str, compiled: Callable[..., Any], eager: Callable[..., Any]) -> Callable[..., Any]:
    failed = False

    def run(*args: Tensor) -> Any:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args)
            except Exception as err:  # inductor and dynamo raise their own types for a missing compiler
                failed = True
                first_line = (str(err).strip().splitlines() or [""])[0][:200]
                message = f"torch.compile of the LSTM cell failed, running eager ({type(err).__name__}: {first_line})"
                print(f"chargen: {message}", file=sys.stderr)
        return eager(*args)

    return run
