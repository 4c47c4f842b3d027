"""Training checkpoints: atomic single-file saves, a ``latest`` pointer, retention and resume discovery.

Layout: ``<out_dir>/checkpoints/step_0000100.pt`` (one file per save) and ``<out_dir>/checkpoints/latest`` (a text
file holding the newest file name). Every file is written to a hidden temp file in the same directory, fsync'ed and
``os.replace``d into place, and the pointer is updated only after the checkpoint is complete, so a process killed at
any moment leaves the previous checkpoint and pointer intact. Checkpoints hold only tensors, numbers, strings,
lists and dicts, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")
POINTER = "latest"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def _fsync_dir(path: Path) -> None:
    try:  # make the rename itself durable; not supported on every platform/filesystem
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync, then ``os.replace`` it onto ``path``.

    On any exception the temp file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: dict, out_dir: str | Path, step: int, *, keep_last: int = 2,
                    milestone_every: int = 0) -> Path:
    """Write ``state`` as ``checkpoints/step_<step>.pt`` atomically, update ``latest``, prune old files.

    Kept: the newest ``keep_last`` checkpoints plus every step that is a multiple of ``milestone_every`` (> 0).
    Returns the checkpoint path. Call on the main process only.
    """
    ckpt_dir = checkpoint_dir(out_dir)
    path = ckpt_dir / checkpoint_name(step)
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(ckpt_dir / POINTER, lambda f: f.write((path.name + "\n").encode()))
    prune_checkpoints(ckpt_dir, keep_last=keep_last, milestone_every=milestone_every)
    return path


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*.pt`` in ``ckpt_dir``, oldest first (temp files are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def prune_checkpoints(ckpt_dir: str | Path, *, keep_last: int, milestone_every: int = 0) -> list[Path]:
    """Delete checkpoints outside the newest ``keep_last`` that are not milestones; returns the deleted paths."""
    ckpts = list_checkpoints(ckpt_dir)
    keep = {s for s, _ in ckpts[-keep_last:]} if keep_last > 0 else set()
    deleted = []
    for step, path in ckpts:
        if step in keep or (milestone_every > 0 and step % milestone_every == 0):
            continue
        path.unlink(missing_ok=True)
        deleted.append(path)
    return deleted


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint safely (``weights_only=True``). Missing or unreadable files raise one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle, ...
        raise ValueError(f"checkpoint {str(path)!r} is unreadable: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"checkpoint {str(path)!r} is not a dit training checkpoint (no 'model'/'step' entries)")
    return state


def find_resume_checkpoint(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest loadable checkpoint under ``out_dir`` (a run directory or its ``checkpoints/`` folder).

    Unreadable files are skipped with a warning. Returns ``(path, state)`` or ``None`` if there is none.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir if out_dir.name == "checkpoints" else checkpoint_dir(out_dir)
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path)
        except (ValueError, FileNotFoundError) as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    return None


def resolve_resume(resume: str | None, out_dir: str | Path) -> tuple[Path, dict] | None:
    """Interpret ``train.resume``: ``None`` -> no resume; ``"auto"`` -> newest valid checkpoint of ``out_dir`` (or
    ``None``); a directory -> newest valid checkpoint in it (error if none); a file -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        return find_resume_checkpoint(out_dir)
    path = Path(resume)
    if path.is_dir():
        found = find_resume_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"train.resume: no readable checkpoint under {str(path)!r}")
        return found
    if not path.exists():
        raise FileNotFoundError(f"train.resume: checkpoint {str(path)!r} not found")
    return path, load_checkpoint(path)
