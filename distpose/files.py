"""Files on local disk or object storage, written so that readers never see half of one.

A location is a local path or a URI. `s3://bucket/prefix` goes through pyarrow's filesystems, which Ray
Train uses for its own storage, so both read and write the same objects with the same credentials (the
standard AWS environment variables; AWS_ENDPOINT_URL for an S3-compatible store). `http(s)://` locations
are read only (shards served by a web server or a CDN).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.fs


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename over it (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


HTTP_TIMEOUT_S = 60.0  # per connection attempt and per read
READ_BUFFER_BYTES = 4 << 20


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def is_http(location: str | Path) -> bool:
    return str(location).startswith(("http://", "https://"))


def join(location: str | Path, *parts: str) -> str:
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location).joinpath(*parts))


def within(directory: str | Path, *parts: str) -> str | Path:
    """A location under `directory`, of the same kind: a Path under a local Path, a URI under a URI."""
    return Path(directory).joinpath(*parts) if isinstance(directory, Path) else join(directory, *parts)


def filesystem(location: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem holding `location`, and the path within it."""
    import pyarrow.fs

    if is_uri(location):
        return pyarrow.fs.FileSystem.from_uri(str(location))
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def open_input(location: str | Path, offset: int = 0) -> IO[bytes]:
    """A binary stream reading `location` from byte `offset`; FileNotFoundError when there is nothing there."""
    if is_http(location):
        request = urllib.request.Request(str(location), headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{location}: HTTP 404") from None
            raise OSError(f"{location}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise OSError(f"{location}: {exc.reason}") from None
        if offset and response.status != 206:  # a server that ignores ranges sends it all
            response.read(offset)
        return response
    if not is_uri(location):
        stream = open(location, "rb")  # noqa: SIM115 (the caller closes it)
        stream.seek(offset)
        return stream
    fs, path = filesystem(location)
    # Unbuffered, pyarrow sends a ranged GET per read() call, and a tar reader makes many small reads.
    # And no compression guessed from the name: the bytes read are the bytes stored, as for a local file.
    if not offset:
        return fs.open_input_stream(path, compression=None, buffer_size=READ_BUFFER_BYTES)
    import pyarrow

    whole = fs.open_input_file(path)
    whole.seek(offset)
    return pyarrow.BufferedInputStream(whole, READ_BUFFER_BYTES)


def read_bytes(location: str | Path) -> bytes:
    """The whole file; FileNotFoundError when there is none."""
    with open_input(location) as stream:
        return stream.read()


def write_bytes(location: str | Path, data: bytes) -> None:
    """Atomically: a local file is renamed into place, an object store makes an object visible whole."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(location), data)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def append_bytes(location: str | Path, data: bytes) -> None:
    """Add `data` at the end of a file (creating it). An object cannot grow: it is rewritten whole, so keep
    such files small and written by one process at a time."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        with open(location, "ab") as out:
            out.write(data)
        return
    try:
        before = read_bytes(location)
    except FileNotFoundError:
        before = b""
    write_bytes(location, before + data)


def upload(local: Path, location: str | Path) -> None:
    """Copy the local file to `location` (an object appears whole; a local copy is renamed into place)."""
    if not is_uri(location):
        write_bytes(location, Path(local).read_bytes())
        return
    fs, path = filesystem(location)
    with open(local, "rb") as source, fs.open_output_stream(path) as target:
        for block in iter(lambda: source.read(1 << 24), b""):
            target.write(block)


def remove_file(location: str | Path) -> None:
    fs, path = filesystem(location)
    if exists(location):
        fs.delete_file(path)


def exists(location: str | Path) -> bool:
    import pyarrow.fs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def file_sizes(location: str | Path, recursive: bool = True) -> dict[str, int]:
    """Every file under the directory `location` (none if it does not exist), by path relative to it, with
    its size."""
    import pyarrow.fs

    fs, root = filesystem(location)
    selector = pyarrow.fs.FileSelector(root, recursive=recursive, allow_not_found=True)
    return {info.path[len(root):].lstrip("/"): info.size for info in fs.get_file_info(selector)
            if info.type == pyarrow.fs.FileType.File}


def holds_anything(location: str | Path) -> bool:
    """Whether the directory `location` exists and has a file or directory in it."""
    import pyarrow.fs

    fs, root = filesystem(location)
    return bool(fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)))


def subdirectories(location: str | Path) -> list[str]:
    """The names of the directories directly under `location` (none if it does not exist)."""
    import pyarrow.fs

    fs, root = filesystem(location)
    selector = pyarrow.fs.FileSelector(root, allow_not_found=True)
    return sorted(info.base_name for info in fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.Directory)


def remove_tree(location: str | Path) -> None:
    fs, path = filesystem(location)
    if exists(location):
        fs.delete_dir(path)
