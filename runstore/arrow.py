"""pyarrow over an fsspec file system for Ray Tune (:meth:`runstore.filesystem.FilesystemBucket.
pyarrow_filesystem`); a module of its own so that pyarrow loads only for such a store, and Ray can
send the handler to trials by reference."""

from __future__ import annotations

import io
import shutil
import tempfile

import pyarrow
import pyarrow.fs

__all__ = ["StoreHandler"]

#: Bytes of a file Ray Tune writes that stay in memory before spilling to a local temporary file.
SPOOL_BYTES = 16 << 20


class StoreHandler(pyarrow.fs.FSSpecHandler):
    """pyarrow's handler of the fsspec file system of one store (``protocol://host``), safe
    under pyarrow's threads.

    * Each thread gets its own file system (:attr:`fs`), and no remote file stays open from one
      call to the next: pyarrow opens a stream in one thread and writes or closes it in another,
      and an SFTP session serving two threads at once deadlocks. A file to write is spooled
      locally and goes up when closed, under a temporary name renamed into place (a reader never
      sees half of it); a file to read comes down whole when opened (Ray Tune reads only its own
      small state files).
    * A file's folders are created before it is written: Ray Tune writes into folders it never
      created, which fsspec's SFTP and FTP file systems refuse. Several threads may create one
      folder at once (:func:`runstore.filesystem.make_folders`).
    """

    def __init__(self, store: str):  # no super().__init__: it would set fs
        self.store = store

    @property
    def fs(self):
        from runstore.bucket import Bucket

        # fsspec keeps one file system per protocol, options and thread.
        return Bucket(self.store).client

    def create_dir(self, path, recursive):
        from runstore.filesystem import make_folders

        if recursive:
            make_folders(self.fs, path)
        else:
            super().create_dir(path, recursive)

    def open_input_stream(self, path):
        if not self.fs.isfile(path):
            raise FileNotFoundError(path)
        return pyarrow.PythonFile(io.BytesIO(self.fs.cat_file(path)), mode="r")

    def open_input_file(self, path):
        return self.open_input_stream(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_UploadedOnClose(self.store, path), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError(f"{self.store}: appending to {path} is not supported")


class _UploadedOnClose(io.RawIOBase):
    """A file to write that goes up to ``store``'s ``path`` when closed, in the closing thread."""

    def __init__(self, store: str, path: str):
        super().__init__()
        self.store, self.path = store, path
        # Open as long as the stream is; closed by close().
        self._local = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._local.write(data)

    def tell(self) -> int:
        return self._local.tell()

    def close(self) -> None:
        if self.closed:
            return
        from runstore.bucket import Bucket
        from runstore.filesystem import renamed_into

        try:
            filesystem = Bucket(self.store).client
            self._local.seek(0)
            with (
                renamed_into(filesystem, self.path) as temporary,
                filesystem.open(temporary, "wb") as remote,
            ):
                shutil.copyfileobj(self._local, remote, 8 << 20)
        finally:
            self._local.close()
            super().close()
