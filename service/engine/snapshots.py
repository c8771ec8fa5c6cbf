"""The per-row snapshots that make rewinding exact."""

from __future__ import annotations

from collections import deque
from itertools import repeat

from torch import Tensor

# (h, c, idx, pending): the state after a row's text is h[:, idx], c[:, idx] after all of it but its
# last character, plus that character, "pending", not yet fed. Feeding it gives the distribution
# of the next one; it is exactly what a session stores.
State = tuple[Tensor, Tensor, int, int]


class Snapshots:
    """A row's state after each position of its generated text, from its client's position on.

    Position p is the state after the first p generated characters (0: after the prompt). They are
    references into each step's output tensors, never copies, so keeping them costs no model work
    and no torch op; a stop string or a client that goes away rewinds to the right one by lookup.
    The newest is always kept.
    """

    __slots__ = ("first", "states")

    def __init__(self) -> None:
        self.first = 0  # the position of states[0]
        self.states: deque[State] = deque()

    def __bool__(self) -> bool:
        return bool(self.states)

    def record(self, h: Tensor, c: Tensor, idx: int, pending: int) -> None:
        """The state after one more position."""
        self.states.append((h, c, idx, pending))

    def record_steps(self, hs: list[Tensor], cs: list[Tensor], idx: int, picks: list[int]) -> None:
        """The states after several more positions: step k's output and pick each."""
        self.states.extend(zip(hs, cs, repeat(idx), picks))

    def at(self, position: int) -> State:
        return self.states[position - self.first]

    def forget_before(self, position: int) -> None:
        """Drop the states before ``position``: the client has that text, no rewind goes there."""
        states = self.states
        while self.first < position and len(states) > 1:
            states.popleft()
            self.first += 1
