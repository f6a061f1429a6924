"""Run outputs: config.json, metrics.jsonl, checkpoint.pt, summary.json, model.pt.

One process at a time uses a run directory (:func:`run_dir_lock`: an
exclusive ``flock`` on ``.fedmeta.lock``, taken before anything is written).
Files that mark a finished run (``summary.json``, ``model.pt``) are written
last and atomically (write to a temp file, fsync it, ``os.replace``, fsync
the directory), so neither a crash nor a power loss leaves a run that looks
finished; a full or read-only disk is one line saying from which round the
run is resumable. ``metrics.jsonl`` is appended and
flushed each round; on resume it is cut back to the checkpointed round.

Run directories are never overwritten silently (:func:`prepare_out_dir`), a
resumed run keeps its config except for the keys in :data:`RESUMABLE`
(:func:`check_resume`, shared by ``fedmeta simulate --resume`` and the
deployed ServerApp's ``output.resume``), and checkpoints hold plain data only
(tensors, numbers, strings, lists, dicts) and load with
``torch.load(weights_only=True)``: a hostile checkpoint cannot run code.
See docs/design.md, "Run directories and resume rules".
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import stat
import threading
import time
from contextlib import contextmanager
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: torch is imported where it is used (the CLI's first line must not wait)
    import torch


CONFIG, METRICS, SUMMARY, MODEL, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "model.pt", "checkpoint.pt"
META_STATE = "meta_state.pt"
CURVES = "curves.png"  # written by `fedmeta simulate` at the end (fedmeta/plot.py)
RELEASES = "releases.jsonl"  # a private run's released-theta digests: server-side only, 0600 (issue 17)
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, SUMMARY, MODEL, META_STATE, CURVES, RELEASES)  # everything a run writes (plus .NAME.tmp)

# Keys a resumed run may change, each with the reason it cannot change the maths
# of the rounds already taken (docs/design.md, "Run directories and resume rules").
RESUMABLE = {
    "simulation.rounds": "raised only: more rounds after the checkpoint (the beta schedule is stretched over the new total)",
    "simulation.round_timeout": "how long the server waits for replies; not part of the maths",
    "simulation.workers": "how many Ray actors run the vectorized cohort; the same maths (equal to float rounding)",
    "simulation.ray_address": "which Ray cluster runs the clients; not part of the maths",
    "output.checkpoint_every": "when checkpoints are written, not what they hold",
    "output.progress": "the console progress line only",
    "output.dir": "where the run lives; the run directory itself is what is resumed",
    "output.resume": "the resume switch of the deployed ServerApp itself",
}
_NOT_RECORDED = ("output.dir", "output.resume")  # how this invocation was started; config.json keeps its own


from fedmeta.errors import RunDirError  # noqa: E402,F401 - defined in fedmeta.errors


# -- one process per run directory --------------------------------------------------------------

LOCK = ".fedmeta.lock"  # held (fcntl.flock, exclusive) by the one process that uses the directory; holds its PID
_HELD: dict[str, list] = {}  # resolved run directory -> [fd, depth]: this process's locks (re-entrant)
_HELD_GUARD = threading.Lock()


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _acquire(d: Path, option: str, wait: bool) -> int:
    path = d / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RunDirError(f"{option} {d}: {LOCK} is a symbolic link, not a lock file; remove it") from None
            raise RunDirError(f"{option} {d}: cannot write there ({err.strerror or _first_line(err)})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RunDirError(f"{option} {d}: {LOCK} is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise RunDirError(
                    f"{option} {d}: in use by another fedmeta process ({_holder(fd)}); one process per run directory, "
                    "wait for it to finish or stop it"
                ) from None
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)  # the holder removed the file as it let go: lock the new one instead
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        except BaseException:
            os.close(fd)
            raise


@contextmanager
def run_dir_lock(out_dir: str | Path, option: str = "--out", create: bool = True, wait: bool = False):
    """Hold ``out_dir`` for this process: an exclusive ``fcntl.flock`` on ``out_dir/.fedmeta.lock``.

    Taken before anything is written to a run directory (fresh, resumed, or a
    protocol cache entry) and held until the run ends; the kernel releases it
    when the process dies, even by SIGKILL. Another process that holds it makes
    this raise :class:`RunDirError` naming its PID (or, with ``wait``, blocks
    until it lets go). Re-entrant within a process (the Flower engine's
    ServerApp thread runs inside the CLI's hold). ``create``: make the
    directory if missing (fresh runs); otherwise a missing one is refused.
    """
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise RunDirError(f"{option} {d}: is a file, not a directory")
    if not d.is_dir():
        if not create:
            raise RunDirError(f"{option} {d}: not a directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"{option} {d}: cannot write there ({err.strerror or _first_line(err)})") from None
    key = str(d.resolve())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None:
            held = _HELD[key] = [_acquire(d, option, wait), 0]
        held[1] += 1
    try:
        yield d
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                try:
                    os.unlink(d / LOCK)  # while still held: a waiter that opened this file retries (see _acquire)
                except OSError:
                    pass
                os.close(held[0])


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


_NDARRAY = "__fedmeta_ndarray__"


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with only what ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, lists, dicts.

    NumPy arrays and scalars become tagged tensors (:func:`from_plain` restores
    them with their dtype, bit for bit); anything else is a programming error
    and raises ``TypeError`` naming where it sits, so no checkpoint is written
    that could not be loaded back.
    """
    # torch on use only: the CLI's first line must not wait for its import
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"{where}: numpy dtype {arr.dtype} cannot be stored in a checkpoint")
        return {_NDARRAY: torch.from_numpy(np.array(arr, copy=True, order="C")), "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: key {k!r} ({type(k).__name__}) is not a string or int")
            out[k] = to_plain(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    for base in (bool, int, float, str):  # subclasses (IntEnum, a str Enum, ...) as their plain base value
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint (plain data only)")


def from_plain(obj: Any) -> Any:
    """Inverse of :func:`to_plain`."""
    # torch on use only: the CLI's first line must not wait for its import
    import torch

    if isinstance(obj, dict):
        if _NDARRAY in obj and isinstance(obj[_NDARRAY], torch.Tensor):
            arr = obj[_NDARRAY].numpy()
            return arr[()] if obj.get("scalar") else arr
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


def _load_error(err: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` objected to, in one short clause."""
    text = str(err)
    if "Weights only load failed" in text:  # a pickle that is not plain data (it may try to run code): refused unread
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        lines = [line.split("WeightsUnpickler error:", 1)[-1].strip() for line in lines[1:] if not line.startswith("Check the documentation")]
        detail = next((line for line in lines if line), "")
        return "holds more than plain data; refused without unpickling it" + (f": {detail[:120]}" if detail else "")
    first = text.strip().split(". ")[0].splitlines()[0] if text.strip() else ""
    return f"corrupt or truncated: {type(err).__name__}" + (f": {first[:120]}" if first else "")


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``path`` so that it is either the old file or the whole new one, also after a power loss:
    the temp file is fsync'd before ``os.replace`` and the directory after it (as databases do).
    On an ``OSError`` (disk full, read-only) the temp file is removed and the old file is untouched.
    ``mode`` (e.g. ``0o600``): the file's permissions from its creation on, whatever the umask."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if mode is not None:
            tmp.unlink(missing_ok=True)  # a leftover temp file keeps its old mode: start from a new one
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            os.chmod(tmp, mode)  # os.open's mode is masked by the umask; chmod is not
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path, mode: int | None = None) -> None:
    # torch on use only: the CLI's first line must not wait for its import
    import torch

    buf = io.BytesIO()  # serialised in memory: a full disk is then an OSError of our own write, not torch's
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue(), mode)


_WHAT = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
         errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EIO: "I/O error"}


def _regular(path: Path) -> bool:
    """Whether ``path`` exists; :class:`RunDirError` if it is there but not a regular file (a FIFO would hang a read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise RunDirError(f"{path}: cannot be read ({err.strerror or _first_line(err)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise RunDirError(f"{path}: not a regular file (a FIFO, device or directory); refused")
    return True


def _json(text: str) -> Any:
    """``json.loads``; nesting too deep for Python (a ``RecursionError``) is a ``ValueError`` like any bad JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


_WRITERS: "weakref.WeakSet[RunWriter]" = weakref.WeakSet()


def close_writers(out_dir: str | Path) -> None:
    """Make every existing :class:`RunWriter` of ``out_dir`` refuse further writes.

    Called when a run is interrupted: a server thread that is still running
    (Flower's ServerApp thread waiting for replies that will never come) can
    then neither log a failed round nor move the checkpoint past the last
    completed round. Writers created later are not affected.
    """
    target = Path(out_dir).resolve()
    for writer in list(_WRITERS):
        if writer.dir.resolve() == target:
            writer.closed = True


class RunWriter:
    """Owns one run directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.closed = False
        self.checkpoint_round: int | None = None  # the round of the checkpoint on disk (what a resume starts from)
        _WRITERS.add(self)

    @contextmanager
    def _writing(self, name: str):
        """An ``OSError`` writing ``name`` (disk full, read-only...) becomes one line saying what is resumable."""
        try:
            yield
        except OSError as err:
            what = _WHAT.get(err.errno, err.strerror or _first_line(err))
            if self.checkpoint_round is not None:
                after = f"the run is resumable from round {self.checkpoint_round} (fedmeta simulate --resume {self.dir})"
            else:
                after = "no checkpoint was written yet, so there is nothing to resume"
            raise RunDirError(f"{what} writing {self.dir / name}; {after}") from None

    def _check_open(self) -> None:
        if self.closed:
            raise RunDirError(f"{self.dir}: the run was interrupted; nothing more is written there")

    def is_finished(self) -> bool:
        return (self.dir / SUMMARY).exists()

    def write_config(self, config: dict[str, Any]) -> None:
        self._check_open()
        with self._writing(CONFIG):
            atomic_write_text(self.dir / CONFIG, json.dumps(config, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._check_open()
        _regular(self.dir / METRICS)  # opening a FIFO to append would block forever
        with self._writing(METRICS), open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append_release(self, record: dict[str, Any]) -> None:
        """Append one private release's digest to ``releases.jsonl`` (0600, fsync'd before theta is sent on)."""
        self._check_open()
        path = self.dir / RELEASES
        _regular(path)
        with self._writing(RELEASES):
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line (a crash mid-write): never sent, cut it
                tail = os.pread(fd, size, 0)
                os.ftruncate(fd, tail.rfind(b"\n") + 1)
            with os.fdopen(fd, "a") as f:
                os.fchmod(fd, 0o600)  # whatever the umask
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(fd)

    def read_releases(self) -> list[dict[str, Any]]:
        """The records of ``releases.jsonl`` in order ([] if none); a torn last line (a crash mid-write) was never sent."""
        path = self.dir / RELEASES
        if not _regular(path):
            return []
        lines = path.read_text().splitlines()
        out = []
        for i, line in enumerate(lines):
            try:
                rec = _json(line)
                ok = isinstance(rec, dict) and all(type(rec.get(k)) is int for k in ("round", "attempt")) \
                    and isinstance(rec.get("digest"), str)
            except ValueError:
                ok = False
            if not ok:
                if i == len(lines) - 1:
                    break
                raise RunDirError(f"{path}: line {i + 1} is not a release record (round, attempt, digest); refused")
            out.append(rec)
        return out

    def clear_releases(self) -> None:
        """A fresh run starts with no recorded releases."""
        (self.dir / RELEASES).unlink(missing_ok=True)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records; a torn last line (the process died while appending it) is dropped."""
        path = self.dir / METRICS
        if not _regular(path):
            return []
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise RunDirError(f"{path}: cannot be read ({_first_line(err)})") from None
        lines = [line for line in text.splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                record = _json(line)
            except ValueError:
                if i == len(lines) - 1:
                    break
                raise RunDirError(f"{path}: line {i + 1} is not JSON (the file is corrupt)") from None
            if not isinstance(record, dict):
                raise RunDirError(f"{path}: line {i + 1} is not a JSON object (the file is corrupt)")
            records.append(record)
        return records

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only records of rounds <= ``last_round`` (those a checkpoint covers)."""
        self._check_open()
        kept = [r for r in self.read_metrics() if isinstance(r.get("round", 0), int) and r.get("round", 0) <= last_round]
        with self._writing(METRICS):
            atomic_write_text(self.dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self._check_open()
        with self._writing(CHECKPOINT):
            # 0600: a private run's checkpoint holds the server's noise secret (docs/design.md, "Threat model")
            atomic_torch_save(to_plain(state), self.dir / CHECKPOINT, mode=0o600)
        if type(state.get("round")) is int:
            self.checkpoint_round = state["round"]

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint, or None if there is none; :class:`RunDirError` if it is unreadable or not a checkpoint."""
        ckpt = load_checkpoint(self.dir / CHECKPOINT)
        if ckpt is not None:
            self.checkpoint_round = ckpt["round"]
        return ckpt

    def save_model(self, state_dict: dict[str, torch.Tensor], meta_state: dict[str, torch.Tensor] | None = None) -> None:
        """``model.pt``: the model's meta-learned parameters; ``meta_state.pt``: the algorithm's extra meta-state, if any."""
        self._check_open()
        if meta_state:
            with self._writing(META_STATE):
                atomic_torch_save({k: v.detach().cpu() for k, v in meta_state.items()}, self.dir / META_STATE)
        with self._writing(MODEL):
            atomic_torch_save({k: v.detach().cpu() for k, v in state_dict.items()}, self.dir / MODEL)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._check_open()
        with self._writing(SUMMARY):
            atomic_write_text(self.dir / SUMMARY, json.dumps(_clean(summary), indent=2) + "\n")


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Load ``checkpoint.pt`` with ``weights_only=True`` (no code runs) and check its shape."""
    # torch on use only: the CLI's first line must not wait for its import
    import torch

    path = Path(path)
    if not _regular(path):  # torch.load of a FIFO would wait forever
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says enough
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, hostile: all one line
        raise RunDirError(f"{path}: not a loadable fedmeta checkpoint ({_load_error(err)})") from None
    server = state.get("server") if isinstance(state, dict) else None
    theta = server.get("theta") if isinstance(server, dict) else None
    rnd = state.get("round") if isinstance(state, dict) else None
    if (
        not isinstance(theta, dict)
        or not theta
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in theta.items())
        or type(rnd) is not int
        or rnd < 0
    ):
        raise RunDirError(f"{path}: not a fedmeta checkpoint (expected 'round' and 'server.theta' tensors)")
    return from_plain(state)


# -- run directories -----------------------------------------------------------


def run_files(out_dir: str | Path) -> list[str]:
    """The names of the run files present in ``out_dir`` (empty: no run lives there)."""
    d = Path(out_dir)
    return [name for name in RUN_FILES if (d / name).exists()]


def prepare_out_dir(out_dir: str | Path, overwrite: bool = False, option: str = "--out", hint: str | None = None) -> Path:
    """Check a *fresh* run's directory before anything starts; create it; with ``overwrite`` clear the old run.

    Refuses (``RunDirError``, one line naming ``option``) a path that is a file,
    cannot be created or written, or already holds a fedmeta run (unless
    ``overwrite``: then the old run's files, and their temporary files, are
    removed so that nothing stale can remain). Other files are left alone.
    """
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise RunDirError(f"{option} {d}: is a file, not a directory")
    found = run_files(d) if d.is_dir() else []
    if found and not overwrite:
        hint = hint or f"continue it with --resume {d}, or start over with --overwrite"
        raise RunDirError(f"{option} {d}: already holds a fedmeta run ({', '.join(found)}); {hint}")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".fedmeta-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"{option} {d}: cannot write there ({err.strerror or _first_line(err)})") from None
    if overwrite:
        for name in RUN_FILES:
            for path in (d / name, d / f".{name}.tmp"):
                if path.exists() or path.is_symlink():
                    path.unlink()
    return d


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def read_run_config(run_dir: str | Path, option: str = "--resume") -> dict[str, Any]:
    """``run_dir/config.json`` as a nested dict (one line naming the file if it is missing or not JSON)."""
    d = Path(run_dir)
    path = d / CONFIG
    if not d.is_dir():
        raise RunDirError(f"{option} {d}: not a directory")
    if not _regular(path):
        raise RunDirError(f"{option} {d}: no {CONFIG} there (not a fedmeta run directory)")
    try:
        data = _json(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
        raise RunDirError(f"{path}: not a readable JSON config ({_first_line(err)})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise RunDirError(f"{path}: not a fedmeta config (expected an object of sections)")
    return data


def _check_extension(d: Path, option: str, old_r: int, new_r: int) -> None:
    """A finished run continues only if it completed normally and ``simulation.rounds`` is raised."""
    try:
        status = json.loads((d / SUMMARY).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "stopped_early":
        raise RunDirError(f"{option} {d}: the run stopped early ({SUMMARY}: stopped_early); it cannot be extended")
    if new_r <= old_r:
        raise RunDirError(f"{option} {d}: the run already finished ({SUMMARY} exists); to extend it, raise simulation.rounds above {old_r}")


def check_resume(run_dir: str | Path, cfg: Any, checkpoint_round: int | None = None, option: str = "--resume") -> dict[str, Any]:
    """Check that ``cfg`` may continue the run in ``run_dir``; return the config to record in its ``config.json``.

    Every key must equal the one in ``run_dir/config.json`` except those in
    :data:`RESUMABLE`; ``simulation.rounds`` may only be raised. A finished run
    (``summary.json``) may continue only if it completed and ``simulation.rounds``
    is raised (extending it from its final checkpoint). The run must have a loadable checkpoint (loaded here unless
    ``checkpoint_round`` is given). Used by ``fedmeta simulate --resume``, by
    the ServerApp with ``output.resume = true`` and by the round loop itself.
    """
    from fedmeta.config import ConfigError, build_config

    d = Path(run_dir)
    raw = read_run_config(d, option)
    try:
        saved = build_config(raw).to_dict()
    except ConfigError as err:
        raise RunDirError(f"{d / CONFIG}: {err}") from None
    for name in RUN_FILES:
        _regular(d / name)  # a FIFO, device or directory in place of a run file is refused, never opened
    finished = (d / SUMMARY).exists()  # a finished run may be extended: simulation.rounds raised (checked below)
    if checkpoint_round is None:
        ckpt = load_checkpoint(d / CHECKPOINT)
        if ckpt is None:
            raise RunDirError(f"{option} {d}: no {CHECKPOINT} there (the run stopped before its first checkpoint); start it again with --overwrite")
        checkpoint_round = ckpt["round"]
    new = cfg.to_dict()
    old_flat, new_flat = _flat(saved), _flat(new)
    changed = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        what = ", ".join(f"{k} ({old_flat.get(k)!r} -> {new_flat.get(k)!r})" for k in refused)
        allowed = ", ".join(k for k in RESUMABLE if k not in _NOT_RECORDED)
        raise RunDirError(f"{option} {d}: {what} differ from {CONFIG}; a resumed run may change only {allowed}")
    old_r, new_r = old_flat["simulation.rounds"], new_flat["simulation.rounds"]
    if finished:
        _check_extension(d, option, old_r, new_r)
    if new_r < old_r:
        raise RunDirError(f"{option} {d}: simulation.rounds: may only be raised on resume ({CONFIG} has {old_r}, got {new_r})")
    if new_r < checkpoint_round:
        raise RunDirError(f"{option} {d}: simulation.rounds: must be >= the checkpointed round {checkpoint_round} (got {new_r})")
    record = {section: dict(values) for section, values in new.items()}
    for key in _NOT_RECORDED:
        section, name = key.split(".")
        record[section][name] = saved[section][name]
    return record
