"""The one way mixbuild writes an output: to a hidden sibling, renamed into place when complete.

Guarantees, for every output (artifact, engine, validation report, timing cache):
- nothing is replaced that mixbuild did not create: an existing output directory is replaced
  only with `overwrite` and only when its manifest says it is a mixbuild output of the same
  kind; never when it is, or holds, an input of the command;
- a failure, Ctrl-C or SIGTERM leaves the destination as it was (absent, or the old output),
  never a half-written one: the temporary sibling is removed, and if the final swap fails the
  old output is put back;
- the leftovers of a run killed outright (SIGKILL, power loss) are hidden siblings named
  `.NAME.{tmp,old,scratch}-PID-RANDOM`; the next run on the same output removes those whose
  process is gone, restoring an old output that a killed swap had moved aside, and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from mixbuild.contract import (
    ARTIFACT_KIND,
    ENGINE_KIND,
    ENGINE_MANIFEST_FILE,
    HF_CHECKPOINT_KIND,
    HF_MANIFEST_FILE,
    MANIFEST_FILE,
    REPORT_FILE,
    REPORT_SCHEMA,
)
from mixbuild.errors import UsageError

# kind -> (the manifest file that marks it, the key, the value that key holds)
OUTPUT_KINDS = {
    ARTIFACT_KIND: (MANIFEST_FILE, "kind", ARTIFACT_KIND),
    ENGINE_KIND: (ENGINE_MANIFEST_FILE, "kind", ENGINE_KIND),
    "report": (REPORT_FILE, "schema", REPORT_SCHEMA),
    HF_CHECKPOINT_KIND: (HF_MANIFEST_FILE, "kind", HF_CHECKPOINT_KIND),
}
_ROLES = ("tmp", "old", "scratch")


class Terminated(BaseException):
    """SIGTERM arrived while an output was being written (raised so that cleanup runs)."""

    exit_code = 143


def output_kind(path: str | Path) -> str | None:
    """The kind of mixbuild output `path` is ("artifact", "engine", "report", "hf-checkpoint"),
    or None."""
    path = Path(path)
    for kind, (marker, key, value) in OUTPUT_KINDS.items():
        try:
            data = json.loads((path / marker).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get(key) == value:
            return kind
    return None


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def check_destination(out: str | Path, overwrite: bool, kind: str,
                      inputs: Iterable[str | Path] = ()) -> None:
    """Refuse (UsageError) an output that would destroy anything mixbuild did not create."""
    out = Path(out)
    target = _resolved(out)
    for source in inputs:
        src = _resolved(source)
        if src == target or target in src.parents:
            what = "is" if src == target else "holds"
            raise UsageError(f"the output directory {what} an input of this command: {out}",
                             expected="an output path outside every input",
                             found=f"-o {out} {what} {source}",
                             hint="choose another -o; mixbuild never deletes its own inputs")
    for parent in (out.parent, *out.parent.parents):   # the nearest one that exists
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"cannot create {out}: {parent} is a file, not a directory",
                                 expected="an output path whose existing parents are directories",
                                 found=f"{parent} is a file", hint="choose another -o")
            break
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UsageError(f"output path exists and is not a directory: {out}",
                         hint="choose another -o")
    if not overwrite:
        raise UsageError(f"output directory already exists: {out}",
                         hint="pass --overwrite to replace it, or choose another -o")
    found = output_kind(out)
    if found != kind:
        marker = OUTPUT_KINDS[kind][0]
        raise UsageError(f"refusing to replace {out}: it is not a mixbuild {kind}",
                         expected=f"a directory whose {marker} marks it as a mixbuild {kind}",
                         found=f"a mixbuild {found}" if found else "a directory mixbuild did not create",
                         hint="choose another -o; --overwrite only replaces mixbuild's own outputs")


# ------------------------------------------------------------------------------ leftovers

def _sibling(out: Path, role: str) -> Path:
    return out.parent / f".{out.name}.{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_leftovers(out: str | Path, report=None) -> list[str]:
    """Remove the hidden siblings of `out` left by runs that were killed; put back an old output
    that a killed swap moved aside (when `out` itself is missing). Returns what was done, each
    line also passed to `report` (default: printed to stderr)."""
    out = Path(out)
    report = report or (lambda line: print(f"note: {line}", file=sys.stderr))
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({'|'.join(_ROLES)})-(\d+)-[0-9a-f]{{8}}$")
    done = []
    try:
        siblings = sorted(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return done
    for path in siblings:
        match = pattern.match(path.name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        role = match.group(1)
        if role == "old" and not out.exists() and path.is_dir():
            os.replace(path, out)
            line = f"restored {out} from {path.name}, moved aside by an interrupted run"
        else:
            _remove(path)
            line = f"removed {path}, left by an interrupted run (process {match.group(2)})"
        done.append(line)
        report(line)
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------- signals

_signal_depth = 0
_signal_lock = threading.Lock()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM raises Terminated (once), so the
    `except BaseException` cleanups run as they do for Ctrl-C."""
    global _signal_depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _signal_lock:
        _signal_depth += 1
        outer = _signal_depth == 1
        previous = signal.getsignal(signal.SIGTERM) if outer else None
        if outer:
            def handler(signum, frame):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second one must not stop cleanup
                raise Terminated()
            signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        with _signal_lock:
            _signal_depth -= 1
            if outer:
                signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------- writers

def _public_mode(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


@contextlib.contextmanager
def atomic_directory(out: str | Path, kind: str, overwrite: bool = False,
                     inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block completes."""
    out = Path(out)
    inputs = list(inputs)
    check_destination(out, overwrite, kind, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(out)
    check_destination(out, overwrite, kind, inputs)   # a restored old output is checked too
    with _sigterm_raises():
        tmp = _sibling(out, "tmp")
        tmp.mkdir()
        _public_mode(tmp)
        try:
            yield tmp
            _swap(tmp, out)
        except BaseException:
            _remove(tmp)
            raise


def _swap(new: Path, out: Path) -> None:
    """Rename `new` onto `out`; the old `out` is moved aside first and put back on failure."""
    if not out.exists() and not out.is_symlink():
        os.replace(new, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


@contextlib.contextmanager
def scratch_directory(out: str | Path) -> Iterator[Path]:
    """A working directory beside `out` (same disk), removed when the block ends however it
    ends; a killed run's scratch is removed by the next run on `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_raises():
        path = _sibling(out, "scratch")
        path.mkdir()
        try:
            yield path
        finally:
            _remove(path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(path)
    with _sigterm_raises():
        tmp = _sibling(path, "tmp")
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
