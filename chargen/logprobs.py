"""The model's log-probabilities of the characters it was given or picked, and its most likely
alternatives: what OpenAI's ``logprobs`` reports (TorchScript-compatible: the engine runs it
inside its scripted step).

They are the model's own distribution, ``log_softmax`` of the raw logits, before temperature,
top_k, top_p, logit_bias and penalties: the same numbers `chargen eval`'s loss is made of.
"""

from __future__ import annotations

import torch
from torch import Tensor


def score(logits: Tensor, chosen: Tensor, top_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """logits [N, V] and the characters that followed, chosen [N] -> (log p(chosen) [N] float64,
    the top_n largest log-probabilities [N, top_n] and their character ids [N, top_n])."""
    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    top_v, top_i = torch.topk(lp, top_n, dim=-1)
    return lp.gather(1, chosen.unsqueeze(1)).squeeze(1), top_v, top_i
