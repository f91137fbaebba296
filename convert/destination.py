"""Where a conversion may write, and putting its finished output there without losing anything.

The output is built in a hidden ``.DST.partial-<pid>-<random>`` directory beside DST and
renamed into place only when complete. The rename refuses to replace anything that appeared
meanwhile unless ``force`` was given, and ``force`` itself only ever replaces an empty
directory or a model directory: never SRC, a folder holding SRC or the working directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Optional

from mlx_qwenmoe.errors import OutputError

GiB = 1 << 30
_PARTIAL = ".partial-"


def describe_bytes(n: int) -> str:
    """'0.031 GiB (33,554,432 bytes)': enough digits that two different sizes never print alike."""
    return f"{n / GiB:.3f} GiB ({n:,} bytes)"


def check_destination(src: Path, dst: Path) -> None:
    """Refuse a DST whose replacement would touch SRC or the working directory."""
    s, d, cwd = src.resolve(), dst.resolve(), Path.cwd().resolve()
    if d == s:
        raise OutputError(f"{dst}: is the source checkpoint itself; choose another DST")
    if d in s.parents:
        raise OutputError(f"{dst}: contains the source checkpoint {src}; choose another DST")
    if s in d.parents:
        raise OutputError(f"{dst}: lies inside the source checkpoint {src}; choose another DST")
    if d == cwd or d in cwd.parents:
        raise OutputError(f"{dst}: is (or contains) the current directory; choose another DST")


def _replaceable(dst: Path) -> None:
    """``force`` replaces an empty directory or a model directory (one with config.json), nothing else."""
    if dst.is_symlink() or not dst.is_dir():
        raise OutputError(f"{dst}: exists and is not a directory; remove it yourself")
    if any(dst.iterdir()) and not (dst / "config.json").is_file():
        raise OutputError(f"{dst}: exists and is not a model directory (no config.json); force=True replaces only those")


def check_overwrite(dst: Path, force: bool) -> None:
    """The start-of-run check; ``finish`` repeats it at the final rename."""
    if dst.exists() or dst.is_symlink():
        if not force:
            raise OutputError(f"{dst}: already exists (pass force=True to replace it)")
        _replaceable(dst)
    if not dst.parent.is_dir():
        raise OutputError(f"{dst}: parent directory {dst.parent} does not exist")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dst: Path) -> None:
    """Remove the hidden work directories of earlier runs to ``dst`` whose process is gone (SIGKILL)."""
    for path in dst.parent.glob(f".{dst.name}{_PARTIAL}*"):
        pid = path.name[len(f".{dst.name}{_PARTIAL}"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _libc_rename_noreplace() -> Optional[callable]:
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        return lambda a, b: libc.renamex_np(a, b, 0x4)  # RENAME_EXCL
    if hasattr(libc, "renameat2"):
        return lambda a, b: libc.renameat2(-100, a, -100, b, 1)  # AT_FDCWD, RENAME_NOREPLACE
    return None


def rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with FileExistsError if ``dst`` exists, atomically where the OS can."""
    call = _libc_rename_noreplace()
    if call is None or call(os.fsencode(src), os.fsencode(dst)) == 0:
        if call is None:  # no atomic primitive: the check and the rename are as close as we can make them
            if dst.exists() or dst.is_symlink():
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
            os.rename(src, dst)
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL) and not (dst.exists() or dst.is_symlink()):
        os.rename(src, dst)  # a file system without the flag
        return
    raise OSError(err, os.strerror(err), str(dst))


def finish(tmp: Path, dst: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``dst``; with ``force`` a replaceable ``dst`` is swapped out and removed."""
    old = None
    if force and (dst.exists() or dst.is_symlink()):
        _replaceable(dst)
        old = dst.parent / f".{dst.name}{_PARTIAL}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
    try:
        rename_noreplace(tmp, dst)
    except FileExistsError:
        if old is not None:
            os.rename(old, tmp.parent / f".{dst.name}.kept-{uuid.uuid4().hex[:8]}")
        raise OutputError(f"{dst}: appeared while converting (another run?); left it as it is") from None
    except OSError as e:
        if old is not None:
            os.rename(old, dst)
        raise OutputError(f"{dst}: cannot be put in place ({e.strerror or e})") from None
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def staging(dst: Path, force: bool, nbytes: int) -> Iterator[Path]:
    """A hidden directory beside ``dst``, renamed to ``dst`` on success and removed on any failure."""
    clean_stale(dst)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}{_PARTIAL}{os.getpid()}-", dir=dst.parent))
    except OSError as e:
        raise OutputError(f"{dst}: cannot write in {dst.parent} ({e.strerror or e})") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become DST's mode
        free = shutil.disk_usage(tmp).free
        if free < nbytes:
            raise OutputError(f"{dst}: {describe_bytes(nbytes)} needed but {describe_bytes(free)} free on its disk")
        try:
            yield tmp
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(f"{dst}: the disk filled up while writing; {describe_bytes(nbytes)} needed") from None
            raise
        finish(tmp, dst, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
