"""Where the system's files live: a local path or an object-store URI, behind one small API.

Every path the system takes (ingest ``--out``, ``data.shards``, ``train.output_dir``, checkpoints,
exports, the evaluator's ledger, sweeps) goes through this module, so ``s3://bucket/prefix`` works
wherever ``/mnt/shared/prefix`` does. Filesystems are pyarrow's (``pyarrow.fs``), the ones Ray Train
takes as ``RunConfig(storage_filesystem=...)``; any scheme pyarrow knows (``s3://``, ``gs://``,
``hdfs://``) works, ``file://`` and plain paths are local.

S3 endpoint and credentials come from the standard AWS environment and profile only
(``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_REGION``, an instance role), never from a config file: the filesystem is built
without keys, so the AWS SDK finds them, and a pickled filesystem (sent to Ray workers) carries none.

Writes are whole-object: ``write_bytes`` and ``output`` are atomic on both sides (a temp file
renamed locally; one PUT or a completed multipart upload on an object store), so a reader never
sees half a file. ``append_text`` on an object store is read-modify-write: one writer per file.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import posixpath
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import IO, Iterator

CACHE_ENV = "T3D_CACHE_DIR"


class StorageError(OSError):
    """A URI that cannot be used: missing bucket, refused credentials, unreachable endpoint."""


def is_remote(path: str | Path) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def normalize(path: str | Path) -> str:
    """A URI as given (trailing slash dropped), or an absolute local path."""
    s = str(path)
    if is_remote(s):
        return s.rstrip("/")
    if s.startswith("file://"):
        s = s[len("file://"):]
    return str(Path(s).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    b = str(base)
    return posixpath.join(b.rstrip("/"), *parts) if is_remote(b) else str(Path(b, *parts))


def name(path: str | Path) -> str:
    return posixpath.basename(str(path).rstrip("/"))


def parent(path: str | Path) -> str:
    s = str(path).rstrip("/")
    return s.rsplit("/", 1)[0] if is_remote(s) else str(Path(s).parent)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3(endpoint: str | None, region: str | None):
    # one filesystem per endpoint, region and credentials in the environment (a test may change them)
    creds = tuple(os.environ.get(k, "") for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"))
    return _s3_cached(endpoint, region, hashlib.sha256(repr(creds).encode()).hexdigest())


@lru_cache(maxsize=8)
def _s3_cached(endpoint: str | None, region: str | None, _creds: str):
    from pyarrow import fs

    kw = {"region": region or "us-east-1", "connect_timeout": 5, "request_timeout": 60,
          "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=3)}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return fs.S3FileSystem(**kw)


def filesystem(path: str | Path):
    """(pyarrow filesystem, the path inside it) for a local path or a URI."""
    from pyarrow import fs

    s = normalize(path)
    if not is_remote(s):
        return fs.LocalFileSystem(), s
    scheme, rest = s.split("://", 1)
    if scheme in ("s3", "s3a"):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(_endpoint(), region), rest
    try:
        return fs.FileSystem.from_uri(s)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / ArrowNotImplementedError
        raise StorageError(f"{s}: no filesystem for scheme {scheme!r} ({e})") from e


def ray_storage(path: str | Path):
    """``(storage_path, storage_filesystem)`` for Ray Train/Tune's ``RunConfig``."""
    fs, p = filesystem(path)
    return (p, fs) if is_remote(path) else (p, None)


def _info(path: str | Path):
    fs, p = filesystem(path)
    return fs.get_file_info(p)


def exists(path: str | Path) -> bool:
    from pyarrow import fs

    return _info(path).type != fs.FileType.NotFound


def isfile(path: str | Path) -> bool:
    from pyarrow import fs

    return _info(path).type == fs.FileType.File


def isdir(path: str | Path) -> bool:
    """A folder; on an object store, a prefix with at least one object under it."""
    from pyarrow import fs

    if not is_remote(path):
        return Path(normalize(path)).is_dir()
    return _info(path).type == fs.FileType.Directory or bool(listdir(path))


def size(path: str | Path) -> int:
    return _info(path).size


def listdir(path: str | Path) -> list[str]:
    """Names directly under ``path``, sorted; [] when it does not exist."""
    from pyarrow import fs

    f, p = filesystem(path)
    try:
        infos = f.get_file_info(fs.FileSelector(p, allow_not_found=True, recursive=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def glob(path: str | Path, pattern: str) -> list[str]:
    """Full paths of the names under ``path`` matching ``pattern`` (one level), sorted."""
    return [join(path, n) for n in listdir(path) if fnmatch.fnmatch(n, pattern)]


def walk_files(path: str | Path) -> list[str]:
    """Every file under ``path`` (recursive), as paths relative to it, sorted."""
    from pyarrow import fs

    f, p = filesystem(path)
    infos = f.get_file_info(fs.FileSelector(p, allow_not_found=True, recursive=True))
    base = p.rstrip("/") + "/"
    return sorted(i.path[len(base):] for i in infos if i.type == fs.FileType.File)


def makedirs(path: str | Path) -> None:
    if not is_remote(path):
        Path(normalize(path)).mkdir(parents=True, exist_ok=True)     # object stores have no folders


def read_bytes(path: str | Path) -> bytes:
    f, p = filesystem(path)
    with f.open_input_stream(p) as s:
        return s.read()


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def read_range(path: str | Path, offset: int, nbytes: int) -> bytes:
    """``nbytes`` from ``offset``: a ranged GET on an object store, a seek locally."""
    f, p = filesystem(path)
    with f.open_input_file(p) as s:
        return s.read_at(nbytes, offset)


def open_input(path: str | Path):
    """A seekable binary file (pyarrow's, Python-file compatible) for readers like ``tarfile``."""
    f, p = filesystem(path)
    return f.open_input_file(p)


@contextlib.contextmanager
def output(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary stream whose content appears at ``path`` only when the block exits cleanly."""
    f, p = filesystem(path)
    if not is_remote(path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        tmp = p + f".tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as s:
                yield s
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    buf = tempfile.SpooledTemporaryFile(max_size=64 << 20, dir=scratch_dir())
    try:
        yield buf                      # buffered, then one upload: a failed block leaves nothing behind
        buf.seek(0)
        with f.open_output_stream(p, metadata={}) as s:
            shutil.copyfileobj(buf, s, 8 << 20)
    finally:
        buf.close()


def write_bytes(path: str | Path, data: bytes) -> None:
    with output(path) as s:
        s.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str | Path, text: str) -> None:
    if not is_remote(path):
        with open(normalize(path), "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return
    old = read_bytes(path) if isfile(path) else b""
    write_bytes(path, old + text.encode("utf-8"))


def remove(path: str | Path) -> None:
    f, p = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        f.delete_file(p)


def rmtree(path: str | Path) -> None:
    f, p = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        f.delete_dir(p)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    f, p = filesystem(path)
    with f.open_input_stream(p) as s:
        while chunk := s.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def upload_dir(local: str | Path, dest: str | Path) -> None:
    from pyarrow import fs

    f, p = filesystem(dest)
    fs.copy_files(str(local), p, source_filesystem=fs.LocalFileSystem(), destination_filesystem=f)


def download_dir(src: str | Path, local: str | Path) -> Path:
    from pyarrow import fs

    f, p = filesystem(src)
    Path(local).mkdir(parents=True, exist_ok=True)
    fs.copy_files(p, str(local), source_filesystem=f, destination_filesystem=fs.LocalFileSystem())
    return Path(local)


# ------------------------------------------------------------------------------ the local cache
def cache_root() -> Path:
    """This machine's cache of remote things (``$T3D_CACHE_DIR``, default ``~/.cache/t3d``): shard
    copies (``data.cache_dir`` overrides), materialised tokenizers and exports, upload staging."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "t3d").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def scratch_dir() -> str:
    """Where checkpoints are staged before Ray uploads them (and buffered uploads spill): the cache."""
    d = cache_root() / "scratch"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def _key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def local_dir(path: str | Path) -> Path:
    """A local folder with the content of ``path``: itself when local, else a copy in the cache,
    made once per URI (a folder that is written once, as a tokenizer or an export is). Safe across
    processes (the ranks of a node fetch the same tokenizer at once): each downloads into a folder
    of its own and renames it into place; one that finds a complete copy already there discards its
    own, so a copy another process is reading is never removed."""
    s = normalize(path)
    if not is_remote(s):
        return Path(s)
    dest = cache_root() / "dirs" / f"{_key(s)}-{name(s)}"
    if not (dest / ".complete").is_file():
        if not walk_files(s):
            raise FileNotFoundError(f"{s}: no such folder (or it is empty)")
        tmp = Path(tempfile.mkdtemp(dir=_mk(dest.parent)))
        download_dir(s, tmp)
        (tmp / ".complete").write_text(s)
        try:
            os.replace(tmp, dest)                 # onto nothing (or an empty folder): atomic
        except OSError:                           # a non-empty folder is there
            if (dest / ".complete").is_file():    # another process's complete copy: use it
                shutil.rmtree(tmp, ignore_errors=True)
            else:                                 # what an interrupted older copy left
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
    return dest


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def local_state_dir(run_dir: str | Path) -> Path:
    """A local folder for a run's per-machine files (MLflow spool, sample logs): the run folder
    itself when local, else a folder in the cache named after its URI."""
    s = normalize(run_dir)
    return Path(s) if not is_remote(s) else _mk(cache_root() / "runs" / f"{_key(s)}-{name(s)}")


class FileCache:
    """Whole remote files kept in a local folder, bounded to ``limit_mb`` (least recently used
    files go first). Safe across processes: files arrive by rename, eviction only unlinks (a
    reader holding one open keeps reading)."""

    def __init__(self, folder: str | Path, limit_mb: int):
        self.dir, self.limit = _mk(Path(folder).expanduser()), limit_mb * 2**20

    def get(self, uri: str) -> Path:
        p = self.dir / f"{_key(uri)}-{name(uri)}"
        if p.is_file():
            os.utime(p)
            return p
        tmp = self.dir / f".{p.name}.{os.getpid()}.part"
        f, src = filesystem(uri)
        with f.open_input_stream(src) as s, open(tmp, "wb") as out:
            shutil.copyfileobj(s, out, 8 << 20)
        os.replace(tmp, p)
        self.evict(keep=p)
        return p

    def evict(self, keep: Path | None = None) -> None:
        files = sorted((q for q in self.dir.iterdir() if q.is_file() and not q.name.startswith(".")),
                       key=lambda q: q.stat().st_mtime)
        total = sum(q.stat().st_size for q in files)
        for q in files:
            if total <= self.limit:
                break
            if q != keep:
                total -= q.stat().st_size
                with contextlib.suppress(FileNotFoundError):
                    q.unlink()


# ------------------------------------------------------------------------------------ preflight
def check(path: str | Path, write: bool = False) -> None:
    """Fail now, with the URI in the message, when ``path`` cannot be used: an object store that
    does not answer, a bucket that does not exist, keys it refuses. ``write``: also prove a write
    (a small probe object, removed again). Local paths: the folder is made when ``write``."""
    s = normalize(path)
    if not is_remote(s):
        if write:
            Path(s).mkdir(parents=True, exist_ok=True)
        return
    f, p = filesystem(s)
    bucket = p.split("/", 1)[0]
    where = f" at {_endpoint()}" if _endpoint() else ""
    try:
        from pyarrow import fs

        if f.get_file_info(bucket).type == fs.FileType.NotFound:
            raise StorageError(f"{s}: bucket {bucket!r} does not exist{where}")
        f.get_file_info(fs.FileSelector(p, allow_not_found=True, recursive=False))
        if write:
            probe = join(s, f".t3d-write-probe-{os.getpid()}")
            write_bytes(probe, b"ok")
            remove(probe)
    except StorageError:
        raise
    except OSError as e:
        msg = str(e)
        why = ("the credentials were refused (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)"
               if any(w in msg for w in ("AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                         "403", "Forbidden"))
               else "the endpoint did not answer (AWS_ENDPOINT_URL)" if any(
                   w in msg for w in ("connect", "Connect", "resolve", "timed out", "Timeout", "curlCode"))
               else "it cannot be read")
        raise StorageError(f"{s}: {why}{where}: {msg.splitlines()[0][:300]}") from e
