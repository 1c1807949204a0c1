"""Where a run's files live: a local folder, a shared filesystem path, or object storage (s3://, gs://, ...).

One `storage` location per run, the idea of Ray Train's `storage_path`: the driver writes the run log there,
every learner rank writes its own checkpoint shard there, and `--resume` reads from there. Everything goes
through `pyarrow.fs`, so a local path and an `s3://bucket/run` URI take the same code. Programs that need a
real folder (DeepSpeed's save/load_checkpoint, TensorBoard) get one from `writable_dir` / `readable_dir`: the
folder itself on a filesystem path, or a temporary local copy that is uploaded / was downloaded on object storage.

On a multi-node cluster a plain path must be on a filesystem every node mounts (NFS, EFS, Lustre ...):
a path on one node's own disk is not storage the other nodes can reach.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location


def check_location(location: str, flag: str, cluster: bool) -> None:
    """A relative path means 'this process's working directory': under `ray job submit` that is a per-job
    temporary copy on the head node, gone when the job ends, and no other node sees it."""
    if not location:
        raise ValueError(f"{flag} is empty. Fix: give a folder, or an s3:// or gs:// URI.")
    if cluster and not is_uri(location) and not os.path.isabs(os.path.expanduser(location)):
        raise ValueError(f"{flag} {location!r} is a relative path, but this run is on a Ray cluster: it would land in "
                         f"the job's temporary working directory on the head node, which other nodes cannot reach "
                         f"and which is deleted when the job ends. Fix: an absolute path on storage every node "
                         f"mounts (e.g. {flag} /mnt/shared/runs/NAME), or object storage ({flag} s3://BUCKET/runs/NAME).")


class Storage:
    """A folder on some filesystem, addressed by paths relative to it ('' is the folder itself)."""

    def __init__(self, location: str):
        if is_uri(location):
            self.fs, self.root = pafs.FileSystem.from_uri(location)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
        self.location = location if is_uri(location) else self.root
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, relative: str = "") -> str:
        return f"{self.root.rstrip('/')}/{relative}".rstrip("/") if relative else self.root

    def location_of(self, relative: str) -> str:
        """`relative` as a location another job or Storage can open: a path, or a URI with this one's query."""
        if not is_uri(self.location):
            return self.path(relative)
        base, _, query = self.location.partition("?")
        return f"{base.rstrip('/')}/{relative}" + (f"?{query}" if query else "")

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def listdir(self, relative: str = "") -> list[str]:
        """Names directly inside a folder ([] if it does not exist)."""
        if not self.exists(relative):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(relative)))
        return sorted(os.path.basename(info.path) for info in infos)

    def read_text(self, relative: str) -> str:
        with self.fs.open_input_stream(self.path(relative)) as fh:
            return fh.read().decode()

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Atomic: a reader sees the old file or the whole new one (write a temporary name, then move it)."""
        final = self.path(relative)
        self.fs.create_dir(os.path.dirname(final), recursive=True)
        staging = f"{os.path.dirname(final)}/.{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(staging) as fh:
            fh.write(data)
        self.fs.move(staging, final)

    def delete_dir(self, relative: str) -> None:
        """Remove a folder and everything in it; nothing happens if it does not exist."""
        if self.exists(relative):
            self.fs.delete_dir(self.path(relative))

    def upload(self, local_dir: str, relative: str) -> None:
        self.fs.create_dir(self.path(relative), recursive=True)
        pafs.copy_files(local_dir, self.path(relative), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, relative: str, local_dir: str) -> None:
        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(self.path(relative), local_dir, source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())

    @contextmanager
    def writable_dir(self, relative: str):
        """A local folder whose contents end up at `relative`: the folder itself on a filesystem path,
        else a temporary folder uploaded when the block ends without error."""
        if self.is_local:
            os.makedirs(self.path(relative), exist_ok=True)
            yield self.path(relative)
            return
        staging = tempfile.mkdtemp(prefix="endorl-upload-")
        try:
            yield staging
            self.upload(staging, relative)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def readable_dir(self, relative: str):
        """A local folder holding the contents of `relative` (a temporary download on object storage)."""
        if self.is_local:
            yield self.path(relative)
            return
        staging = tempfile.mkdtemp(prefix="endorl-download-")
        try:
            self.download(relative, staging)
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
