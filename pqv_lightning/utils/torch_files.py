"""Reading torch files a user hands over: weights-only, with an error that says what is wrong with the file."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "read_checkpoint"]


class CheckpointError(ValueError):
    """A file that cannot be used as the checkpoint it was given as; the message says what it is instead."""


def read_checkpoint(path: str | os.PathLike, expected: str = "a torch checkpoint", mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with an error that says what is wrong with the file.

    Empty, truncated and non-torch files, and files holding objects that would need unpickling (refused, never
    run), each raise :class:`CheckpointError` naming the file and ``expected``; a missing file raises
    ``FileNotFoundError``. ``mmap`` (default: for zip-format files) maps the tensors instead of reading them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist or is not a file; expected {expected}.")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes), not {expected}: was it written completely?")
    try:
        mapped = zipfile.is_zipfile(path) if mmap is None else mmap
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        detail = next(
            (line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else ""
        )
        raise CheckpointError(
            f"{str(path)!r} is not {expected}: it cannot be read as a weights-only torch file, because it holds "
            f"objects that would have to be unpickled (refused, nothing was run): {detail[:200]}"
        ) from None
    except Exception as err:  # torch's readers raise EOFError, RuntimeError, IndexError, ... on bad bytes
        first = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else type(err).__name__
        with path.open("rb") as f:
            starts_as_zip = f.read(4) == b"PK\x03\x04"
        hint = ""
        if starts_as_zip and not zipfile.is_zipfile(path):
            hint = " It starts as a torch archive but its end is missing: truncated (a partial copy or write)."
        raise CheckpointError(
            f"{str(path)!r} ({size} bytes) is not {expected}: it cannot be read as a weights-only torch file "
            f"({type(err).__name__}: {first}).{hint}"
        ) from None
