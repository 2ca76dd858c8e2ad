"""Exceptions as one short line: for records, manifests, warnings and summaries that must stay readable."""

from __future__ import annotations

__all__ = ["error_summary", "last_line"]


def error_summary(err: BaseException, lines: int = 3, limit: int = 500) -> str:
    """``"Type: first lines | joined"``: the exception type and its first ``lines`` non-empty message lines."""
    text = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {' | '.join(text[:lines])[:limit]}"


def last_line(err: BaseException, limit: int = 300) -> str:
    """The last line of the message (where tracebacks re-raised as text put the cause), ``""`` if none."""
    text = str(err).strip()
    return text.splitlines()[-1][:limit] if text else ""
