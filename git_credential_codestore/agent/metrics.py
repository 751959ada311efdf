"""The agent's counters, and `/metrics` in Prometheus' text exposition format (0.0.4).

Written out by hand: the format is a few lines of text, and the agent runs on installs
without the fleet extra too, so it takes no client library for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# HTTP status of a refusal -> the reason label on codestore_agent_tokens_refused_total.
REASONS = {400: "bad_request", 401: "unauthenticated", 403: "beyond_grant", 409: "mismatch", 429: "rate_limited",
           503: "unavailable", 500: "internal"}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.minted = 0
        self.refused: dict[str, int] = {}
        self._buckets = [0] * len(BUCKETS)
        self._sum = 0.0
        self._count = 0
        self.signer_errors = 0

    def observe(self, status: int, seconds: float) -> None:
        """One token request: its outcome and how long the agent took over it."""
        with self._lock:
            if status == 200:
                self.minted += 1
            else:
                reason = REASONS.get(status, "other")
                self.refused[reason] = self.refused.get(reason, 0) + 1
            self._sum += seconds
            self._count += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self._buckets[i] += 1

    def render(self, gauges: Mapping[str, float], labelled: Mapping[str, Mapping[str, float]], counters: Mapping[str, float]) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        with self._lock:
            metric("codestore_agent_tokens_minted_total", "counter", "Tokens minted.", [("", self.minted)])
            metric("codestore_agent_tokens_refused_total", "counter", "Token requests refused, by reason.",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(self.refused.items())] or [('{reason="beyond_grant"}', 0)])
            cumulative = [(f'_bucket{{le="{b}"}}', n) for b, n in zip(BUCKETS, self._buckets, strict=False)]
            hist = [*cumulative, ('_bucket{le="+Inf"}', self._count), ("_sum", self._sum), ("_count", self._count)]
            out.append("# HELP codestore_agent_token_seconds Time the agent took over a token request.")
            out.append("# TYPE codestore_agent_token_seconds histogram")
            out.extend(f"codestore_agent_token_seconds{suffix} {_num(v)}" for suffix, v in hist)
            metric("codestore_agent_signer_errors_total", "counter", "Signatures that failed.", [("", self.signer_errors)])
        for name, value in counters.items():
            metric(f"codestore_agent_{name}_total", "counter", name.replace("_", " ").capitalize() + ".", [("", value)])
        for name, samples in labelled.items():
            label = "state" if name == "grants" else "what"
            metric(f"codestore_agent_{name}", "gauge", name.capitalize() + ".", [(f'{{{label}="{k}"}}', v) for k, v in samples.items()])
        for name, value in gauges.items():
            metric(f"codestore_agent_{name}", "gauge", name.replace("_", " ").capitalize() + ".", [("", value)])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


Health = Callable[[], "tuple[bool, str]"]
