"""Known deprecation warnings of the legacy paths we keep on purpose: silenced, explained once per process.

Each legacy path has one entry in :data:`LEGACY_PATHS` (why it is kept, and the warnings it raises), and code on
that path runs inside ``silenced("<path>")``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence

__all__ = ["LEGACY_PATHS", "deprecations_silenced", "jit_deprecations_silenced", "silenced"]

log = logging.getLogger("pqv_lightning")
_explained: set[str] = set()

Patterns = tuple[tuple[type[Warning], str], ...]

#: Legacy path -> (the notice logged once, the (category, message regex) of the warnings it raises).
LEGACY_PATHS: dict[str, tuple[str, Patterns]] = {
    # TorchScript and the lite interpreter are deprecated in PyTorch; they are the PQV-Mobile formats we keep.
    "jit": (
        "TorchScript and lite export use deprecated PyTorch APIs (kept for PQV-Mobile's formats; "
        "ExecuTorch is their successor); their deprecation warnings are silenced.",
        (
            (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
            (FutureWarning, r"Lite Interpreter is deprecated"),
            (UserWarning, r"The TorchScript type system doesn't support instance-level annotations"),
        ),
    ),
    # torch.ao eager/FX quantization is deprecated (pytorch/ao#2259): it is what the PQV-Mobile backends need.
    "torch.ao": (
        "int8_dynamic/int8_static use the deprecated torch.ao.quantization path (kept for the PQV-Mobile "
        "backends and TorchScript/lite export); its deprecation warnings are silenced.",
        (
            (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
            (UserWarning, r"Please use quant_min and quant_max to specify the range"),
            (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor"),
        ),
    ),
}


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


def silenced(path: str) -> contextlib.AbstractContextManager[None]:
    """Silence the known deprecation warnings of a legacy ``path`` of :data:`LEGACY_PATHS`; log its notice once."""
    notice, patterns = LEGACY_PATHS[path]
    return deprecations_silenced(notice, patterns)


def jit_deprecations_silenced() -> contextlib.AbstractContextManager[None]:
    """Silence TorchScript / lite interpreter deprecation warnings; log one notice per process."""
    return silenced("jit")
