"""pyarrow over an fsspec file system for Ray Tune (:meth:`runstore.filesystem.FilesystemBucket.
pyarrow_filesystem`); a module of its own so that pyarrow loads only for such a store, and Ray can
send the handler to trials by reference."""

from __future__ import annotations

import pyarrow.fs

__all__ = ["StoreHandler"]


class StoreHandler(pyarrow.fs.FSSpecHandler):
    """pyarrow's handler of the fsspec file system of one store (``protocol://host``).

    * Each thread gets its own file system (:attr:`fs`): pyarrow copies files from several
      threads at once, and an SFTP session serving two of them deadlocks.
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

    def open_output_stream(self, path, metadata):
        from runstore.filesystem import make_folders

        make_folders(self.fs, self.fs._parent(path))
        return super().open_output_stream(path, metadata)
