"""Stop sequences on streamed text: the text before the first stop, never the stop itself."""

from __future__ import annotations


class StopText:
    """Filters text arriving in pieces: ``push`` returns what can be shown, holding back a tail
    that could still grow into a stop sequence; once one appears, ``hit`` is True and nothing
    from it on is returned."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hit = False
        self._held = ""

    def push(self, text: str) -> str:
        """Add ``text``; return the part that is certainly not (the start of) a stop sequence."""
        if self.hit or not self.stops:
            return "" if self.hit else text
        held = self._held + text
        found = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self._held = True, ""
            return held[:min(found)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]

    def flush(self) -> str:
        """At the end of the text: the held-back tail (it never became a stop sequence)."""
        held, self._held = self._held, ""
        return held
