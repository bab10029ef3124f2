"""Small shared helpers: atomic writes, JSONL, devices, seeds."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def whole_number(value) -> bool:
    """An int (numpy's too), not a bool: what counts, sizes and seeds must be (2.5 or "4" are not)."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    A crash leaves `final` as it was (old contents or absent), never half-written: a kill between moving the old
    one aside and moving the new one in leaves the old one as `.NAME.old-PID`, which `recover_replaced` puts back.
    A failed save comes out as an OSError naming `final` (`write_failure`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        usual_permissions(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        failure = write_failure(e, final)  # before the clean-up frees the space it reads
        if failure is not None and str(failure.filename or "").startswith(str(tmp)):
            failure.filename = str(final)  # the temporary folder is gone; name what was being written
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None and failure is not e:
            raise failure from e
        raise


# the names atomic writes use beside their target (`.NAME.tmp-XXXX`, `.NAME.old-PID`, `.final.tmp-XXXX`): all a
# killed write can leave behind
LEFTOVER = re.compile(r"^\..+\.(tmp-[^/]*|old-\d+)$")


def is_leftover(path: str | os.PathLike) -> bool:
    return bool(LEFTOVER.match(Path(path).name))


def recover_replaced(final: str | os.PathLike) -> bool:
    """Put back the folder a killed `atomic_dir` had moved aside (`final` missing, `.NAME.old-PID` there): the
    last good checkpoint, not a fresh start. True when it did."""
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return False
    olds = sorted(final.parent.glob(f".{glob.escape(final.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.replace(olds[-1], final)
    return True


def remove_temp_copies(target: str | os.PathLike) -> None:
    """Remove what killed atomic writes of `target` left beside it (`.NAME.tmp-*`: a file, or a whole folder)."""
    target = Path(target)
    for path in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def clear_leftovers(folder: str | os.PathLike, deep: bool = False) -> int:
    """Remove what killed atomic writes left in `folder` (and its subfolders with `deep`): temporary files and
    folders (a whole checkpoint each), once a run holds the folder. Old copies are put back where their
    target is missing. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in sorted(folder.rglob("*") if deep else folder.iterdir(), key=lambda p: len(p.parts), reverse=True):
        if not is_leftover(path) or not os.path.lexists(path):
            continue
        old = re.match(r"^\.(.+)\.old-\d+$", path.name)
        if old and recover_replaced(path.with_name(old.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


SHARED_HOLDER = "torchrun"  # what a shared HeldLock's file says about its holders


class HeldLock:
    """An exclusive lock on `lock_path` (a file beside what it guards) while a run writes there; a second run is
    refused at once. It dies with its process (flock), so a killed run leaves none held; the file is removed on
    release. Not POSIX: no lock."""

    def __init__(self, lock_path: str | os.PathLike, what: str, fix: str, shared: bool = False):
        self.path, self.what, self.fix = Path(lock_path), what, fix
        self.shared = shared  # held by every rank of one torchrun run together; refuses (and is refused by) the rest
        self.fd: int | None = None

    @classmethod
    def beside(cls, target: str | os.PathLike, fix: str, shared: bool = False) -> "HeldLock":
        """The lock of a run writing `target` (a file or a folder): `<target>.lock` next to it, beside the real path
        (a run through a symlink to the same target takes the same lock)."""
        real = Path(os.path.realpath(target))
        return cls(real.with_name(real.name + ".lock"), str(target), fix, shared)

    def acquire(self) -> "HeldLock":
        try:
            import fcntl
        except ImportError:
            return self
        from .errors import ConfigError

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                who = "the processes of a torchrun run" if holder == SHARED_HOLDER else f"process {holder or '?'}"
                raise ConfigError(f"{self.what} is being written by another run ({who}, holding "
                                  f"{self.path.name}); {self.fix}") from None
            try:  # the file we locked may have been removed by a run releasing it meanwhile: lock the one there now
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if self.shared:  # the same words from every holder
            os.pwrite(fd, f"{SHARED_HOLDER}\n".encode(), 0)
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if self.shared:  # the last of its holders removes it: the others may still hold it
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return
        self.path.unlink(missing_ok=True)  # while still held: a run that opens it next finds it gone and retries
        os.close(fd)

    def __enter__(self) -> "HeldLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def failed_writes_as_os_errors(path: str | os.PathLike):
    """Re-raise a failed save inside the block as the OSError behind it (`write_failure`), naming `path`."""
    try:
        yield
    except BaseException as e:
        failure = write_failure(e, path)
        if failure is not None and failure is not e:
            raise failure from e
        raise


# safetensors reports a failed write as `SafetensorError(... (os error 28))`, torch.save as a RuntimeError from its
# zip writer without any errno; both mean the same to a user as an OSError from open().write()
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITER = ("PytorchStreamWriter", "file write failed", "unexpected pos")  # not its reader's errors
LOW_SPACE_BYTES = 64 << 20


def write_failure(exc: BaseException, path: str | os.PathLike | None = None) -> OSError | None:
    """The OSError behind a failed save, or None when `exc` is not one. An OSError without a file name gets `path`;
    torch's writer error, which carries no errno, counts as a full disk when `path`'s disk has little space left."""
    if isinstance(exc, OSError):
        if exc.filename is None and exc.errno is not None and path is not None:
            exc.filename = str(path)
        return exc
    text = str(exc)
    code = None
    if type(exc).__name__ == "SafetensorError" and (m := _RUST_OS_ERROR.search(text)):
        code = int(m.group(1))
    elif isinstance(exc, RuntimeError) and any(w in text for w in _TORCH_WRITER):
        low = path is not None and free_bytes(path) < LOW_SPACE_BYTES
        code = errno.ENOSPC if low else errno.EFBIG if _file_size_limited() else errno.EIO
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(path) if path is not None else None)


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "a table of settings", "list[int]": "a list of integers"}


def _is_kind(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "list[int]":
        return isinstance(value, (list, tuple)) and all(_is_kind(i, "int") for i in value)
    return True  # a type this check does not know: left to the caller's own checks


def wrong_field_type(obj) -> str | None:
    """`key=value must be ...` for the first field of a dataclass (annotations as strings) whose value is not of its
    declared type, else None: configs read from hand-editable JSON fail naming the key, not deep in the code."""
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        if any(_is_kind(value, k) for k in kinds if k != "None"):
            continue
        wanted = " or ".join(_KIND_WORDS.get(k, k) for k in kinds if k != "None")
        return f"{f.name}={value!r} must be {wanted}" + (" (or null)" if "None" in kinds else "")
    return None


def _file_size_limited() -> bool:
    """Whether this process runs under a file-size limit (`ulimit -f`), the other cause of a failed write."""
    try:
        import resource
    except ImportError:  # Windows
        return False
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return soft != resource.RLIM_INFINITY


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds `path` (or would hold it: its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def disk_space_line(path: str | os.PathLike, need: int, what: str) -> str | None:
    """A line saying that `path`'s disk lacks the `need` more bytes that `what` writes there; None when it has them."""
    free = free_bytes(path)
    if need <= free:
        return None
    return f"{path}: its disk has {free / 2**20:,.0f} MiB free, and {what} writes about {need / 2**20:,.0f} MiB more"


def usual_permissions(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the permissions a plain mkdir / open would have: temporary folders
    start private (0700), and transformers writes model.safetensors as 0600."""
    mask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with failed_writes_as_os_errors(path):
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name, flag: str = "--device", allow_meta: bool = False) -> str | None:
    """A --device value checked before any work: None stays None (each command's default), else cpu or an
    existing CUDA device (or meta, for shapes only, where allowed), as a string. `flag` names it in the error: a
    command's flag (`--device cuda:3: ...`) or a Python argument (`device='cuda:3': ...`)."""
    from .errors import ConfigError

    if name is None:
        return None
    what = f"{flag} {name}" if flag.startswith("-") else f"{flag}={name!r}"
    fix = (lambda d: f"{flag} {d}") if flag.startswith("-") else (lambda d: f"{flag}='{d}'")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{what} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "mps":
        raise ConfigError(f"{what}: thinkfast runs on cpu or cuda, not yet on Apple's MPS; on a Mac use {fix('cpu')}")
    if dev.type not in ("cpu", "cuda") + (("meta",) if allow_meta else ()):
        raise ConfigError(f"{what}: thinkfast runs on cpu or cuda; use one of those")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}: no CUDA device here; use {fix('cpu')}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{what}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}")
    return str(dev)


def check_out_path(path, flag: str = "--out", folder: bool = True, marker: str | None = None) -> None:
    """Refuse an output path that cannot work before any work is done: a file where a folder goes (or the
    reverse), a parent that cannot be written, or (with `marker`) an existing folder that is not one of ours
    and whose files would be replaced."""
    import os
    from pathlib import Path

    from .errors import ConfigError

    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise ConfigError(f"{flag} {p}: a file is there, and this writes a folder; choose another {flag}")
        if not folder and p.is_dir():
            raise ConfigError(f"{flag} {p}: a folder is there, and this writes a file; give a file path")
        if marker and p.is_dir() and any(p.iterdir()) and not (p / marker).is_file():
            raise ConfigError(f"{flag} {p} holds other files (no {marker}), which writing here would replace; "
                              f"choose a new {flag} or empty it")
    parent = p if p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {p}: cannot write in {parent}; choose a writable place")
    try:  # os.access says yes to root everywhere, /proc and full or odd file systems included: try it
        os.rmdir(tempfile.mkdtemp(prefix=".thinkfast-probe-", dir=parent))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError(f"{flag} {p}: no space left on its disk; free some space or choose another {flag}") from None
        raise ConfigError(f"{flag} {p}: cannot write in {parent} ({e.strerror}); choose a writable place") from None


def check_run_out(out, resume: bool, command: str | None = None) -> None:
    """Cheap checks of a training run's --out before any model loads (distill, sft, train-teacher): --resume
    needs a run there (run.json), a new run must not land on one, nor a `command` run on another command's. The
    library checks again, with the settings."""
    from .errors import CheckpointError

    out = Path(out)
    check_out_path(out)
    if command is not None and (out / "run.json").is_file():
        try:
            theirs = json.loads((out / "run.json").read_text()).get("command")
        except (OSError, ValueError, AttributeError):
            theirs = None  # a damaged run.json: the library's check names it
        if theirs and theirs != command:
            raise CheckpointError(f"{out} holds a `thinkfast {theirs}` run, not a `thinkfast {command}` one; choose a new --out")
    if resume and not out.exists():
        raise CheckpointError(f"--resume: nothing to resume at {out} (no such folder); drop --resume to start a run there")
    if resume and not (out / "run.json").is_file():
        raise CheckpointError(f"--resume: {out} holds no run to resume (no run.json); drop --resume to start one")
    if not resume and (out / "run.json").is_file():
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it, or choose a new --out")


def parse_dtype(name: str | None, device: torch.device | None = None) -> torch.dtype:
    """'auto' -> bf16 on GPU, fp32 on CPU."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name in (None, "auto"):
        return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if name not in table:
        from .errors import ConfigError

        raise ConfigError(f"dtype {name!r}: use one of auto, {', '.join(table)}")
    return table[name]


def progress_bar(total: int, desc: str, unit: str, **kwargs):
    """A tqdm bar on stderr; when stderr is not a terminal (a log file, CI) it updates every 30 s, not many
    times a second, so logs stay readable."""
    from tqdm.auto import tqdm

    stream = kwargs.pop("file", sys.stderr)
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                mininterval=0.1 if interactive else 30.0, maxinterval=10.0 if interactive else 60.0, **kwargs)
