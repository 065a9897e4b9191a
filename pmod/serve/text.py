"""The answer's text as tokens arrive: deltas safe to send (no half character, nothing a stop string may still
claim), and where a stop string ends the answer (OpenAI leaves the stop string out)."""
from __future__ import annotations

__all__ = ["AnswerText"]


class AnswerText:
    def __init__(self, decode, stop: list[str]):
        self.decode, self.stop = decode, stop  # decode: list[int] -> str
        self.ids: list[int] = []
        self.text = ""  # the answer so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one token; returns the new text that can be sent now."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        return self._ready(final=self.stopped)

    def finish(self) -> str:
        """The rest of the text at the end of the answer."""
        return self._ready(final=True)

    def _ready(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # a character split across tokens: wait for its other bytes
                end -= 1
            hold = max((len(s) - 1 for s in self.stop), default=0)  # a stop string may be starting at the end
            end = max(min(end, len(self.text) - hold), self.sent)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end  # decode of a prefix is a prefix of the text (checked in tests)
        return out
