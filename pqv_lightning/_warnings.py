"""Known deprecation warnings of the legacy paths we keep on purpose: silenced, explained once per process."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

log = logging.getLogger("pqv_lightning")
_explained: set[str] = set()


@contextlib.contextmanager
def deprecations_silenced(notice: str, patterns: Sequence[tuple[type[Warning], str]]) -> Iterator[None]:
    """Ignore warnings matching ``patterns`` (category, message regex) in the block; log ``notice`` once."""
    if notice not in _explained:
        log.info(notice)
        _explained.add(notice)
    with warnings.catch_warnings():
        for category, message in patterns:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


# TorchScript and the lite interpreter are deprecated in PyTorch; they are the PQV-Mobile formats we keep.
JIT_DEPRECATIONS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
    (FutureWarning, r"Lite Interpreter is deprecated"),
    (UserWarning, r"The TorchScript type system doesn't support instance-level annotations"),
)


def jit_deprecations_silenced() -> contextlib.AbstractContextManager[None]:
    """Silence TorchScript / lite interpreter deprecation warnings; log one notice per process."""
    return deprecations_silenced(
        "TorchScript and lite export use deprecated PyTorch APIs (kept for PQV-Mobile's formats; "
        "ExecuTorch is their successor); their deprecation warnings are silenced.",
        JIT_DEPRECATIONS,
    )
