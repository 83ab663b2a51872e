"""Checkpoints: written atomically, read with `torch.load(weights_only=True)` only."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "gacd-study/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not what was expected; names the file."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError | RuntimeError):
            cause = error if isinstance(error, OSError) else error.__context__ or error
            raise CheckpointError(
                f"checkpoint {str(path)!r}: could not be written ({cause}); the previous one, "
                "if any, is kept"
            ) from error
        raise
    return path


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """Load tensors and plain containers only; anything needing more pickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():  # garbage bytes, not a forbidden object
            raise CheckpointError(
                f"{what} {str(path)!r}: not a readable PyTorch file (truncated or corrupt?)"
            ) from error
        raise CheckpointError(
            f"{what} {str(path)!r}: refused, it holds objects other than tensors and plain "
            "containers, which torch.load(weights_only=True) will not unpickle; re-save its "
            "state dict"
        ) from error
    except Exception as error:  # noqa: BLE001 - untrusted bytes: whatever the reader tripped on
        # torch's readers raise RuntimeError, EOFError, ValueError, but also IndexError,
        # KeyError, struct.error or zipfile's errors on garbage (found by fuzzing).
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{what} {str(path)!r}: not a readable PyTorch file (truncated or corrupt?): "
            f"{first_line[:200]}"
        ) from error


def is_project_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT
