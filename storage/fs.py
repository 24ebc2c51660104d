"""Where CAST reads and writes: a local path, or an object-store URL (`s3://bucket/prefix`;
`gs://`, `az://` where the matching fsspec package is installed).

Every stage opens its paths with `as_path`: a local path stays a `pathlib.Path` (the code,
bytes and hashes are exactly those of a local run), a URL becomes a `RemotePath` with the
part of pathlib's API the stages use (`/`, name, exists, read/write, iterdir, glob). What
cannot go through that API goes through one helper here:

    write       storage.files.atomic_path(final) stages the file or directory on local disk
                (libraries such as zarr, pyarrow, safetensors and PEFT write there), then
                `upload` commits it: debris at `final` removed, files put, top-level JSON last
    read        zarr_store(p) for zarr/dask, arrow_source(p) for Parquet, local_copy(p) for
                what only reads local directories (PEFT adapters, a bridged artifact)

Credentials are never ours: fsspec and its backends read them from the environment
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL, an instance or
pod role, FSSPEC_S3_* config). Nothing here takes, stores or prints one; a location is
only ever recorded as its URL. Commit protocol on object storage: docs/design.md#commit-protocol.
"""
from __future__ import annotations

import atexit
import fnmatch
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from storage.layout import StoreError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
# Scheme -> the pip extra of this project that brings its fsspec backend.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
BACKENDS = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}
# Schemes that name something other than storage (a Ray or dashboard --address), or local files.
NOT_STORAGE = {"file", "http", "https", "ray", "ray+http", "ws", "wss", "grpc"}
_FILESYSTEMS: dict[str, object] = {}
_CHECKED: set[str] = set()
os.register_at_fork(after_in_child=_FILESYSTEMS.clear)  # a forked child must not reuse the IO loop


def is_url(p) -> bool:
    """Whether `p` names an object-store location (file:// URLs are local paths; http:// and
    ray:// are cluster addresses, never storage)."""
    if isinstance(p, Path):
        return False
    m = _URL.match(str(p))
    return bool(m) and m.group(1).lower() not in NOT_STORAGE


def as_path(p) -> "Path | RemotePath":
    """A local Path (exactly as before) or a RemotePath for an object-store URL."""
    if isinstance(p, (Path, RemotePath)):
        return p
    s = str(p)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return RemotePath(s) if is_url(s) else Path(s)


def filesystem(protocol: str, url: str = ""):
    """The fsspec filesystem for `protocol`, one per process. Listings are never cached:
    other processes (Ray workers) commit units while this one reads."""
    protocol = protocol.lower()
    if protocol not in _FILESYSTEMS:
        import fsspec

        extra = EXTRAS.get(protocol)
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except ImportError:
            pkg = BACKENDS.get(extra, f"the fsspec backend for {protocol}://")
            raise StoreError(f"{url or protocol + '://'}: {protocol}:// needs the {pkg} package, which is not "
                             f"installed here; install it with `pip install 'cast-transfer[{extra}]'` "
                             f"(or `pip install {pkg}`) on every machine that reads or writes it") from None
        except ValueError:
            raise StoreError(f"{url or protocol + '://'}: unknown storage scheme {protocol}://; use a local "
                             f"path or s3://, gs://, az://") from None
        # Our own instance (not fsspec's shared cache), made with the environment of now.
        _FILESYSTEMS[protocol] = cls(use_listings_cache=False, skip_instance_cache=True)
    return _FILESYSTEMS[protocol]


class RemotePath:
    """An object-store location, with the part of pathlib.Path's API the stages use.
    Object stores have no directories: a "directory" is a key prefix, it exists once an
    object lies under it, and mkdir does nothing."""

    def __init__(self, url: str):
        m = _URL.match(url)
        if not m:
            raise StoreError(f"{url!r} is not an object-store URL")
        self.protocol, self.key = m.group(1).lower(), m.group(2).strip("/")
        if not self.key:
            raise StoreError(f"{url}: name a bucket, e.g. {self.protocol}://my-bucket/runs")
        filesystem(self.protocol, url)  # a missing backend fails here, naming the URL

    @property
    def fs(self):
        return filesystem(self.protocol, str(self))

    @property
    def bucket(self) -> str:
        return self.key.split("/")[0]

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, other) -> "RemotePath":
        return RemotePath(f"{self}/{str(other).strip('/')}")

    def __reduce__(self):  # pickled for Ray as its URL; the filesystem is made where it is used
        return RemotePath, (str(self),)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(f"{self.protocol}://{self.key.rsplit('/', 1)[0]}") if "/" in self.key else self

    def relative_to(self, other) -> Path:
        return Path(self.key[len(as_path(other).key):].lstrip("/"))

    def resolve(self) -> "RemotePath":
        return self

    expanduser = absolute = resolve

    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    def iterdir(self):
        """Entries right under this prefix (none if nothing lies under it)."""
        try:
            names = self.fs.ls(self.key, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter(sorted(RemotePath(f"{self.protocol}://{n.rstrip('/')}") for n in names
                           if n.rstrip("/") != self.key))

    def glob(self, pattern: str):
        """One-level patterns only (`u*.parquet`), as the stages use them."""
        return iter([p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)])

    def rglob(self, pattern: str = "*"):
        files = self.fs.find(self.key) if self.exists() else []
        return iter(sorted(RemotePath(f"{self.protocol}://{f}") for f in files
                           if fnmatch.fnmatchcase(f.rsplit("/", 1)[-1], pattern)))

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        self.fs.pipe_file(self.key, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb", **kwargs):
        return self.fs.open(self.key, mode, **kwargs)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        pass  # prefixes need no creating

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise


def check_location(p) -> None:
    """Fail at once, naming the URL and the fix, when `p` is an object-store URL whose
    backend is not installed or whose bucket does not exist (or cannot be reached with the
    credentials in the environment). Local paths pass; each bucket is checked once."""
    if not is_url(p):
        return
    rp = RemotePath(str(p))
    where = f"{rp.protocol}://{rp.bucket}"
    if where in _CHECKED:
        return
    try:
        found = _bucket_exists(rp)
    except Exception as e:  # noqa: BLE001 - botocore's and the others' errors differ; sorted out here
        raise StoreError(f"{p}: {_why_unreachable(rp, e)}") from None
    if not found:
        raise StoreError(f"{p}: bucket {rp.bucket!r} does not exist (or these credentials cannot see it); create it "
                         f"first (e.g. `aws s3 mb {where}`) or fix the URL")
    _CHECKED.add(where)


def _bucket_exists(rp: RemotePath) -> bool:
    """Whether the bucket is there. For S3 one HEAD request whose error is kept: s3fs's
    exists() turns a refused connection or missing credentials into "no such bucket"."""
    if rp.protocol not in ("s3", "s3a"):
        return rp.fs.exists(rp.bucket)
    try:
        rp.fs.call_s3("head_bucket", Bucket=rp.bucket)
    except FileNotFoundError:
        return False
    return True


def _why_unreachable(rp: RemotePath, e: Exception) -> str:
    """Which of endpoint, credentials or bucket failed, and how to check it; never a secret."""
    kind = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    probe = f"aws s3 ls {rp.protocol}://{rp.bucket}" + (f" --endpoint-url {endpoint}" if endpoint else "")
    names = " ".join(c.__name__ for c in type(e).__mro__)
    if "Credentials" in names or "credentials" in str(e).lower() and "unable to locate" in str(e).lower():
        return (f"no credentials for bucket {rp.bucket!r} ({kind}): none found in the environment; set "
                f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or use an instance role) and check "
                f"with `aws sts get-caller-identity`")
    if isinstance(e, PermissionError) or "AccessDenied" in str(e) or "InvalidAccessKeyId" in str(e):
        return (f"the credentials in the environment may not read bucket {rp.bucket!r} ({kind}); check them "
                f"with `{probe}`")
    if "Connect" in names or "Timeout" in names or isinstance(e, OSError):
        where = f"endpoint {endpoint}" if endpoint else "the default endpoint of the scheme"
        return (f"cannot reach {where} ({kind}); check AWS_ENDPOINT_URL and the network, e.g. `{probe}`")
    return (f"cannot reach bucket {rp.bucket!r} ({kind}). Check the credentials in the environment "
            f"(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role) and the endpoint "
            f"(AWS_ENDPOINT_URL for an S3-compatible store), e.g. `{probe}`")


def urls_in(values) -> list[str]:
    """Object-store URLs among command-line values (comma-separated lists included)."""
    out = []
    for v in values:
        if isinstance(v, str):
            out.extend(part.strip() for part in v.split(",") if is_url(part.strip()))
    return out


def rmtree(p) -> None:
    p = as_path(p)
    if isinstance(p, RemotePath):
        if p.fs.exists(p.key):
            p.fs.rm(p.key, recursive=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def upload(staged: Path, final: RemotePath, keep: str | None = None) -> bool:
    """Commit a fully written local file or directory to `final` on object storage, where
    there is no rename. A directory's files go first and its top-level *.json last: the
    marker a reader checks (align.json, index.json, manifest.json, a unit's zarr.json) is
    there only once everything it describes is. Whatever was under `final` (an uncommitted
    leftover, or what --force replaces) is removed first. A file is one PUT, which replaces
    the old object atomically. `keep`: see files.commit."""
    fs = final.fs
    if not staged.is_dir():
        fs.put_file(str(staged), final.key)
        return True
    if keep and fs.exists(f"{final.key}/{keep}"):
        return False
    rmtree(final)
    files = sorted(p for p in staged.rglob("*") if p.is_file())
    last = [p for p in files if p.parent == staged and p.suffix == ".json"]
    for batch in ([p for p in files if p not in last], last):
        if batch:
            fs.put([str(p) for p in batch], [f"{final.key}/{p.relative_to(staged).as_posix()}" for p in batch])
    return True


@contextmanager
def staged(final: RemotePath, keep: str | None = None):
    """A local temporary path named like `final`; uploaded onto it on normal exit."""
    d = Path(tempfile.mkdtemp(prefix="cast-stage-"))  # honours TMPDIR: put it on a roomy local disk
    try:
        yield d / final.name
        if (d / final.name).exists():
            upload(d / final.name, final, keep)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def writing(p):
    """Where a library that writes local files (matplotlib, PEFT) should write `p`: a local
    path itself, written in place as always; for a URL a staged local path of the same
    name, uploaded onto `p` on exit."""
    p = as_path(p)
    if isinstance(p, RemotePath):
        with staged(p) as tmp:
            yield tmp
    else:
        yield p


def zarr_store(p, read_only: bool = True):
    """What zarr.open_group takes for `p`: the path string for a local store (unchanged),
    an fsspec store for a URL."""
    p = as_path(p)
    if not isinstance(p, RemotePath):
        return str(p)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(p), read_only=read_only, storage_options={"use_listings_cache": False})


def arrow_source(p) -> tuple[str, object]:
    """(path, filesystem) for pyarrow.parquet: (str(p), None) locally."""
    p = as_path(p)
    return (p.key, p.fs) if isinstance(p, RemotePath) else (str(p), None)


def local_copy(p) -> Path:
    """A local directory or file with `p`'s content, for readers that only take local paths
    (PEFT, transformers). Local paths are returned as they are; a URL is downloaded (anew
    each time: it may have been replaced since) into a temporary directory removed at exit."""
    p = as_path(p)
    if not isinstance(p, RemotePath):
        return p
    d = Path(tempfile.mkdtemp(prefix="cast-fetch-"))
    atexit.register(shutil.rmtree, d, True)
    copy_to_local(p, d / p.name)
    return d / p.name


def copy_to_local(src, dst: Path) -> None:
    """Copy a file or directory (local or remote) to the local path `dst`."""
    src = as_path(src)
    if not isinstance(src, RemotePath):
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        return
    if src.is_dir():
        files = src.fs.find(src.key)
        dst.mkdir(parents=True, exist_ok=True)
        targets = [str(dst / f[len(src.key):].lstrip("/")) for f in files]
        for t in targets:
            Path(t).parent.mkdir(parents=True, exist_ok=True)
        if files:
            src.fs.get(files, targets)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.fs.get_file(src.key, str(dst))


def disk_usage(p) -> int:
    """Bytes stored under `p`."""
    p = as_path(p)
    if isinstance(p, RemotePath):
        return int(p.fs.du(p.key)) if p.exists() else 0
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
