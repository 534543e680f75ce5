"""Output guard: blocked terms and PII (e-mail addresses, phone numbers) in replies are masked and counted.

Configured per endpoint (`GuardConfig`). `allow` lists strings that are never masked, e.g. the company's own
support number and address, which the customer-service answers are trained to give. A phone number is a run
of at least 7 digits with the separators people write (space, dot, dash, parentheses, a leading +): 7 is the
shortest local number; prices ("$15") and years ("2026") stay shorter.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import msgspec

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d .()-]{5,}\d(?!\w)")
MIN_PHONE_DIGITS = 7
MASKS = {"email": "[email]", "phone": "[phone]"}


class GuardConfig(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = True
    blocked_terms: list[str] = []
    mask_email: bool = True
    mask_phone: bool = True
    allow: list[str] = []


@dataclass
class GuardResult:
    text: str
    hits: Counter[str] = field(default_factory=Counter)  # kind (blocked_term, email, phone) -> count

    @property
    def flagged(self) -> bool:
        return bool(self.hits)


class Guard:
    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        terms = sorted({t.strip() for t in self.config.blocked_terms if t.strip()}, key=len, reverse=True)
        # Whole words only, so a blocked "ass" does not mask "pass"; longest term first.
        self._blocked = (
            re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, terms)) + r")(?!\w)", re.I) if terms else None
        )
        self._allow = {a.lower() for a in self.config.allow}

    def apply(self, text: str) -> GuardResult:
        result = GuardResult(text)
        if not self.config.enabled or not text:
            return result

        def masker(kind: str):
            def sub(m: re.Match[str]) -> str:
                s = m.group(0)
                if s.lower() in self._allow:
                    return s
                if kind == "phone" and sum(c.isdigit() for c in s) < MIN_PHONE_DIGITS:
                    return s
                result.hits[kind] += 1
                return "*" * len(s) if kind == "blocked_term" else MASKS[kind]

            return sub

        out = text
        if self.config.mask_email:
            out = EMAIL.sub(masker("email"), out)
        if self.config.mask_phone:
            out = PHONE.sub(masker("phone"), out)
        if self._blocked is not None:
            out = self._blocked.sub(masker("blocked_term"), out)
        result.text = out
        return result


_BOUNDARY = re.compile(r"[.!?。！？\n]\s|\n")


class StreamGuard:
    """Guards streamed text: holds back the tail after the last sentence boundary (a phone number or an
    e-mail never spans one), releases the guarded head. `flush()` releases the rest at the end."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.buffer = ""
        self.hits: Counter[str] = Counter()

    def _release(self, text: str) -> str:
        r = self.guard.apply(text)
        self.hits.update(r.hits)
        return r.text

    def feed(self, text: str) -> str:
        self.buffer += text
        ends = [m.end() for m in _BOUNDARY.finditer(self.buffer)]
        if not ends:
            return ""
        head, self.buffer = self.buffer[: ends[-1]], self.buffer[ends[-1] :]
        return self._release(head)

    def flush(self) -> str:
        head, self.buffer = self.buffer, ""
        return self._release(head) if head else ""
