"""Paths that may be Cloud Storage URLs: every file a user names goes through `etils.epath`.

epath is the path layer orbax and TFDS use: local paths through `os`, `gs://` URLs through
TensorFlow's GCS file system, or through fsspec/gcsfs with `EPATH_USE_TF=false`
(docs/cloud_storage.md). An object store is not a disk in three ways that matter here:
- an object appears whole when its upload completes, so a write needs no temporary file and
  rename (on Cloud Storage a rename is a copy and a delete per object), where a local file does;
- objects cannot be appended to (gcsfs silently overwrites in mode "a"), so appending rewrites;
- folders are only name prefixes: creating one under a missing bucket creates the bucket (gcsfs).
"""

import contextlib
import io
import os
import tempfile
import urllib.parse
from typing import IO, Iterator

from etils import epath

from big_transfer.errors import UserError


def path(name: epath.PathLike) -> epath.Path:
  """`name` as an epath: `~` expanded, a local path made absolute (orbax requires it)."""
  resolved = epath.Path(name).expanduser()
  return resolved if is_remote(resolved) else resolved.absolute()


def is_remote(name: epath.PathLike) -> bool:
  """Whether `name` is an object-store URL (gs://, s3://...), not a local path."""
  return "://" in os.fspath(name)


def check_bucket(name: epath.PathLike) -> None:
  """UserError when the bucket of a remote `name` does not exist (rather than creating it)."""
  if not is_remote(name):
    return
  url = urllib.parse.urlparse(os.fspath(name))
  bucket = epath.Path(f"{url.scheme}://{url.netloc}")
  try:
    exists = bucket.exists()
  except OSError as e:
    raise UserError(f"Cannot reach {bucket} ({e}); check the URL and your credentials.") from None
  if not exists:
    raise UserError(f"Bucket {bucket} does not exist; create it (gcloud storage buckets create "
                    f"{bucket}) or fix the path {os.fspath(name)}.")


@contextlib.contextmanager
def atomic_writer(name: epath.PathLike, mode: str = "w") -> Iterator[IO]:
  """A file to write `name` through: readers see the old content or the whole new one, never a
  part, and an exception leaves the old content. Locally a temporary file in the same folder,
  flushed to disk and renamed over `name`; remotely the upload happens when the block ends."""
  target = path(name)
  if is_remote(target):
    buffer = io.BytesIO() if "b" in mode else io.StringIO()
    yield buffer
    with target.open(mode) as f:
      f.write(buffer.getvalue())
    return
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o644)  # Readable like any saved file, not mkstemp's private 0600.
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    os.unlink(tmp)
    raise
  folder = os.open(target.parent, os.O_RDONLY)  # Makes the rename itself durable.
  try:
    os.fsync(folder)
  finally:
    os.close(folder)


def write_atomic(name: epath.PathLike, data: str | bytes) -> None:
  with atomic_writer(name, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def save_figure(figure, name: epath.PathLike, **savefig_kwargs) -> None:
  """Matplotlib's `figure.savefig` to `name`, in the format its extension names."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format=path(name).suffix.lstrip(".") or None, **savefig_kwargs)
  write_atomic(name, buffer.getvalue())


def append_text(name: epath.PathLike, text: str) -> None:
  """Appends `text` to `name` (created if missing); remotely the object is rewritten whole."""
  target = path(name)
  if not is_remote(target):
    with target.open("a") as f:
      f.write(text)
    return
  old = target.read_text() if target.exists() else ""
  target.write_text(old + text)


def move_folder(source: epath.PathLike, destination: epath.PathLike) -> None:
  """Moves a folder; `destination`'s parent is created. Remotely each object is copied, then the
  source deleted (what a rename is on an object store)."""
  source, destination = path(source), path(destination)
  destination.parent.mkdir(parents=True, exist_ok=True)
  if not is_remote(source):
    source.rename(destination)
    return
  for folder, _, names in source.walk():
    for name in names:
      (folder / name).copy(destination / (folder / name).relative_to(source))
  source.rmtree()
