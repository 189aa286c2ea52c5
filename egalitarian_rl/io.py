"""Atomic file writes and strict JSON: every artefact the project saves goes through here.

Every artefact is written to a temporary file in the destination folder and
moved into place with :func:`os.replace`, so a reader (or a resumed pipeline)
never sees a half-written file: it sees the old one or the new one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: dicts with ``str`` keys, lists, str, int, float, bool, None.

    Converts numpy scalars and arrays, tuples and sets (to lists), paths (to
    str), dataclasses (to dicts) and mapping keys (to str). Non-finite floats
    (NaN, +-inf) become ``None``, so the result is valid strict JSON; anything
    else unknown becomes its ``str``.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(value) for value in obj]
    return str(obj)


def _json_default(obj: Any) -> Any:
    # Only reached for objects json cannot encode itself: numpy types, paths.
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; give artefacts the mode a plain open() would (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Create ``path`` atomically: ``write`` fills a temporary file that then replaces ``path``.

    The parent folder is created if needed. If ``write`` raises, ``path`` is
    left untouched and the temporary file is removed.

    :param path: the destination file.
    :param write: called with the temporary file opened for binary writing.
    :return: ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomic`)."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda handle: handle.write(data))


def save_json_atomic(obj: Any, path: str | os.PathLike[str], indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (temporary file + :func:`os.replace`).

    numpy scalars and arrays and paths are converted; NaN and infinities are
    refused (strict JSON has no such numbers: convert them first, for example
    with :func:`to_jsonable`).

    :raises ValueError: ``obj`` holds NaN or an infinity; nothing is written.
    :raises TypeError: ``obj`` holds something JSON cannot represent; nothing is written.
    :return: ``path`` as a :class:`~pathlib.Path`.
    """
    # Encode first, so an unencodable object never creates a temporary file.
    text = json.dumps(obj, indent=indent, allow_nan=False, default=_json_default) + "\n"
    return write_text_atomic(text, path)


__all__ = ["save_json_atomic", "to_jsonable", "write_atomic", "write_text_atomic"]
