"""Stop strings over a stream of characters."""

from __future__ import annotations


class StopMatcher:
    """Holds back generated text that may be the start of a stop string; says when one is complete.

    A completed stop string is never returned. ``held`` is the tail of the text so far that is
    still the start of some stop string: at most the longest stop string less one character.
    """

    __slots__ = ("held", "strings")

    def __init__(self, strings: tuple[str, ...]) -> None:
        self.strings = strings
        self.held = ""

    def push(self, ch: str) -> tuple[str, str | None]:
        """One more character: (the text that can be released now, the stop string it completed).

        After a completed stop string the text before it is released and nothing is held.
        """
        held = self.held + ch
        for stop in self.strings:
            if held.endswith(stop):
                self.held = ""
                return held[: len(held) - len(stop)], stop
        for start in range(len(held)):  # the longest tail that may still become a stop string
            tail = held[start:]
            if any(s.startswith(tail) for s in self.strings):
                self.held = tail
                return held[:start], None
        self.held = ""
        return held, None

    def release(self) -> str:
        """Everything held (the generation ended without a stop string)."""
        text, self.held = self.held, ""
        return text
