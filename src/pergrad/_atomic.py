"""Write files atomically: a reader sees the old file or the complete new one, never a part.

Each writer goes to a temporary file in the target's directory (so the final rename stays on one
filesystem), flushes and fsyncs it, then ``os.replace``-s it onto the target. On any error the
temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["write_atomic", "savefig_atomic"]


@contextlib.contextmanager
def _replacing(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` when the block exits without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Mode 0o666 lets the umask decide the permissions, as for a plain open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str, encoding: str = "utf-8") -> None:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: the file to create or replace; its directory must exist.
        data: bytes written as they are, or text encoded with ``encoding``.
        encoding: used only when ``data`` is a ``str``.

    Raises:
        OSError: the directory is missing or not writable; ``path`` is then untouched.
    """
    payload = data.encode(encoding) if isinstance(data, str) else data
    with _replacing(path) as f:
        f.write(payload)


def savefig_atomic(fig: Figure, path: str | os.PathLike[str], **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure to ``path`` atomically.

    Args:
        fig: the figure to save.
        path: the file to create or replace; its suffix picks the format (``.png``, ``.pdf``, ...)
            unless ``savefig_kwargs`` has ``format``.
        **savefig_kwargs: passed to ``fig.savefig`` (``dpi``, ``bbox_inches``, ...).

    Raises:
        OSError: the directory is missing or not writable; ``path`` is then untouched.
    """
    savefig_kwargs.setdefault("format", Path(path).suffix.lstrip(".") or None)
    with _replacing(path) as f:
        fig.savefig(f, **savefig_kwargs)
