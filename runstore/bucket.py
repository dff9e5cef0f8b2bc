"""Experiments in a bucket (S3, Google Cloud Storage or Azure Blob Storage): the folder layout as
objects, local mirrors, leases.

An experiment stored at ``s3://BUCKET/PREFIX/<name>/`` (or ``gs://...``, ``az://...``) holds
exactly the files of an experiment folder (:mod:`runstore`), each as one object under the same
relative path.
Nothing reads or writes the bucket object by object while it trains: every process works in a
local folder, a :class:`Mirror` of (part of) the experiment, with the ordinary atomic file writes,
and

* :meth:`Mirror.pull` downloads what changed in the bucket (size or ETag) under a path;
* :meth:`Mirror.push` uploads what changed locally since the last pull or push, metrics before
  checkpoints and ``status.json`` last, so the bucket never holds a checkpoint newer than the
  metrics beside it (the trainer drops metric records newer than the checkpoint it resumes).

An S3 PUT replaces an object whole, so a reader never sees half a checkpoint. A :class:`Lease`
is an object created with ``If-None-Match: *`` (only one creator wins) and renewed with
``If-Match: <etag>``; a holder that stops renewing (killed, lost node) loses it after ``ttl``
seconds of the server's clock, when the next asker replaces it (again ``If-Match``, so only one
taker wins). AWS S3 and the S3-compatible servers (MinIO, Ceph, moto) honour both conditions.

The endpoint is AWS's, or an S3-compatible server's named by ``$AWS_ENDPOINT_URL`` (or
``$AWS_ENDPOINT_URL_S3``), which boto3 here and pyarrow in Ray Tune both read; credentials come
from the usual chain (``$AWS_ACCESS_KEY_ID``, ``$AWS_PROFILE``, an instance role).

A ``gs://`` bucket (:class:`GcsBucket`) works the same way through Google's own client: a lease
is created with ``ifGenerationMatch=0`` and renewed with ``ifGenerationMatch=<generation>``, the
object's generation standing in for the ETag. Credentials come from Application Default
Credentials; ``$STORAGE_EMULATOR_HOST`` names a GCS-compatible server (anonymous access), as
Google's client libraries read it.

An ``az://CONTAINER/PREFIX`` location (:class:`AzureBucket`) is a container of the storage account
that ``$AZURE_STORAGE_CONNECTION_STRING`` names (an account key or SAS; Azurite's connection
string for a local server), or ``$AZURE_STORAGE_ACCOUNT_NAME`` with ``$AZURE_STORAGE_ACCOUNT_KEY``
or, without a key, the credential chain of azure-identity (``az login``, a managed identity).
Blob Storage takes ``If-None-Match: *`` and ``If-Match: <etag>`` as S3 does.

Any other ``protocol://`` that fsspec opens (``sftp://HOST/PATH``, ``hdfs://``, ``ftp://``...)
is a :class:`runstore.filesystem.FilesystemBucket`: the same methods through fsspec, with a
coordinator in place of the conditional writes such stores lack.

This module imports the standard library only; boto3, google-cloud-storage, azure-storage-blob or
fsspec loads when a bucket is first used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runstore import (
    CHECKPOINT_DIR,
    EXPERIMENT,
    PLAN,
    RUNS_DIR,
    STAGE1_DIR,
    STATUS,
    STUDY_COPY,
    TENSORBOARD_DIR,
    StoreError,
    atomic_write,
    is_temporary,
)

__all__ = [
    "AZURE_SCHEME",
    "AzureAccount",
    "AzureBucket",
    "GCS_SCHEME",
    "SCHEME",
    "SCHEMES",
    "Bucket",
    "BucketError",
    "BucketUri",
    "GcsBucket",
    "MARKER",
    "Lease",
    "Mirror",
    "is_bucket_uri",
    "pull_metadata",
    "pull_results",
    "scratch_folder",
]

#: The S3 scheme (AWS, MinIO, Ceph, moto).
SCHEME = "s3://"

#: Google Cloud Storage.
GCS_SCHEME = "gs://"

#: Azure Blob Storage: ``az://CONTAINER/PREFIX`` in the account the environment names.
AZURE_SCHEME = "az://"

#: Every object-store scheme experiments can live in.
SCHEMES = (SCHEME, GCS_SCHEME, AZURE_SCHEME)

#: The file that marks a local folder as a mirror (it names the bucket location); never pushed.
MARKER = ".bucket.json"

#: Folders a reader of results never needs: checkpoints (the bulk of an experiment) and
#: TensorBoard's event files. Ray Tune's own files are never pulled either (see
#: :func:`pull_results`).
HEAVY_PARTS = (f"{CHECKPOINT_DIR}/", f"{TENSORBOARD_DIR}/")

_BUCKET_NAME = {
    SCHEME: re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]"),
    GCS_SCHEME: re.compile(r"[a-z0-9][a-z0-9._\-]{1,61}[a-z0-9]"),
    # Container names: no two hyphens in a row.
    AZURE_SCHEME: re.compile(r"(?!.*--)[a-z0-9][a-z0-9\-]{1,61}[a-z0-9]"),
}

#: Parallel requests for one large object's parts (boto3's transfers use 10 by default).
TRANSFER_THREADS = 4

_ALLOWED_IN_NAMES = {SCHEME: "'.' or '-'", GCS_SCHEME: "'.', '_' or '-'", AZURE_SCHEME: "'-'"}


class BucketError(StoreError):
    """The bucket cannot be used: missing, denied, unreachable, or a malformed URI."""


#: ``protocol://`` at the start of a storage argument: a URI, not a folder.
_URI_START = re.compile(r"([a-z][a-z0-9+.\-]*)://", re.IGNORECASE)

#: Schemes that name no store of their own, and what to give instead.
_REFUSED_SCHEMES = {
    "file": "a folder: give its path",
    "local": "a folder: give its path",
    "memory": "a store inside one process, which other processes (trials) cannot see",
    "http": "read-only (HTTP)",
    "https": "read-only (HTTP)",
    "s3a": "S3 under another name: use s3://",
    "gcs": "Google Cloud Storage under another name: use gs://",
    "abfs": "Azure Blob Storage under another name: use az://CONTAINER/PREFIX",
    "abfss": "Azure Blob Storage under another name: use az://CONTAINER/PREFIX",
}


def is_bucket_uri(text: object) -> bool:
    """Whether a storage argument names a location in a store (``s3://``, ``gs://``,
    ``az://``, or any other ``protocol://`` that fsspec opens), not a folder (a path, or a
    ``file://`` URI)."""
    if not isinstance(text, str):
        return False
    found = _URI_START.match(text)
    return found is not None and found.group(1).lower() != "file"


@dataclass(frozen=True)
class BucketUri:
    """``s3://bucket/prefix`` (or ``gs://``, ``az://``): a bucket (an Azure container) and a key
    prefix (no leading or trailing ``/``)."""

    bucket: str
    prefix: str = ""
    scheme: str = SCHEME

    @classmethod
    def parse(cls, text: str) -> BucketUri:
        found = _URI_START.match(text)
        if found is None:
            raise BucketError(
                f"{text!r}: expected s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX], "
                "az://CONTAINER[/PREFIX] or another fsspec URI (e.g. sftp://HOST/PATH)"
            )
        scheme = found.group(0).lower()
        bucket, _, prefix = text[len(scheme) :].partition("/")
        if scheme not in SCHEMES:
            _check_other_store(text, scheme, bucket)
        elif not _BUCKET_NAME[scheme].fullmatch(bucket):
            what = "an Azure container" if scheme == AZURE_SCHEME else "a bucket"
            raise BucketError(
                f"{text}: {bucket!r} is not {what} name (3-63 lower-case letters, digits, "
                f"{_ALLOWED_IN_NAMES[scheme]}"
                + (", no '--'" if scheme == AZURE_SCHEME else "")
                + ")"
            )
        prefix = prefix.strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise BucketError(f"{text}: the prefix {prefix!r} has an empty, '.' or '..' part")
        return cls(bucket, prefix, scheme)

    def child(self, name: str) -> BucketUri:
        return BucketUri(self.bucket, f"{self.prefix}/{name}" if self.prefix else name, self.scheme)

    @property
    def name(self) -> str:
        """The last part of the prefix (an experiment's name)."""
        return self.prefix.rsplit("/", 1)[-1]

    def key(self, relative: str = "") -> str:
        relative = relative.strip("/")
        if not self.prefix:
            return relative
        return f"{self.prefix}/{relative}" if relative else self.prefix

    def __str__(self) -> str:
        root = f"{self.scheme}{self.bucket}"
        return f"{root}/{self.prefix}" if self.prefix else root


def _check_other_store(text: str, scheme: str, host: str) -> None:
    """Refuse a URI of a scheme other than S3's, GCS's and Azure's that fsspec cannot open, or
    that names no shared store (see :mod:`runstore.filesystem`)."""
    protocol = scheme[: -len("://")]
    if protocol in _REFUSED_SCHEMES:
        raise BucketError(f"{text}: {scheme} is {_REFUSED_SCHEMES[protocol]}")
    from fsspec.registry import known_implementations, registry

    if protocol not in known_implementations and protocol not in registry:
        raise BucketError(
            f"{text}: fsspec knows no file system {protocol!r}; expected s3://, gs://, az:// "
            "or a protocol fsspec opens (sftp://, ftp://, hdfs://, webdav://, smb://...)"
        )
    if not host:
        raise BucketError(f"{text}: expected {scheme}HOST/PATH (no host)")
    if ":" in host.partition("@")[0] and "@" in host:
        raise BucketError(
            f"{text}: a password in the URI would be written into experiment.json and every "
            f"message that names the location; set FSSPEC_{protocol.upper()}_PASSWORD instead"
        )


@dataclass(frozen=True)
class RemoteObject:
    """What a listing says of one object: its size, ETag (quotes removed) and modification
    time (seconds since the epoch)."""

    size: int
    etag: str
    modified: float


class Bucket:
    """The objects under one :class:`BucketUri`, addressed by paths relative to its prefix.

    ``Bucket(uri)`` of a ``gs://`` location is a :class:`GcsBucket`, of an ``az://`` one an
    :class:`AzureBucket`: the same methods through Google's or Microsoft's client.
    """

    def __new__(cls, uri: BucketUri | str):
        if cls is Bucket:
            parsed = uri if isinstance(uri, BucketUri) else BucketUri.parse(uri)
            if parsed.scheme in SCHEMES:
                cls = {GCS_SCHEME: GcsBucket, AZURE_SCHEME: AzureBucket}.get(parsed.scheme, Bucket)
            else:
                from runstore.filesystem import FilesystemBucket

                cls = FilesystemBucket
        return super().__new__(cls)

    def __init__(self, uri: BucketUri | str):
        self.uri = uri if isinstance(uri, BucketUri) else BucketUri.parse(uri)
        self._client = None

    def child(self, name: str) -> Bucket:
        child = Bucket(self.uri.child(name))
        child._client = self._client
        return child

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                config=Config(
                    retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=120,
                ),
            )
        return self._client

    def where(self) -> str:
        """The URI and, when not AWS's default, the endpoint: for error messages."""
        url = self.client.meta.endpoint_url
        return f"{self.uri} (endpoint {url})"

    # -------------------------------------------------------------------------------- checks

    #: What the store calls its top level, how to create one, what to check when denied.
    NOUN = "bucket"
    CREATE_HINT = "aws s3 mb s3://BUCKET"
    DENIED_HINT = "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket policy"

    def check(self) -> None:
        """Refuse a bucket that does not exist, cannot be reached, or cannot be written: one
        listing request, then a probe object written and deleted.

        Raises:
            BucketError: naming the bucket, the endpoint and what failed.
        """
        name = self._top()
        try:
            self._ask_for_one_object()
        except Exception as error:
            failure = self._failure(error)
            if failure is None:
                raise
            kind, reason = failure
            message = {
                "missing": f"the {self.NOUN} {name} does not exist; create it first "
                f"({self.CREATE_HINT}) or check the name",
                "denied": f"access to the {self.NOUN} {name} is denied ({reason}); "
                f"{self.DENIED_HINT}",
                "unreachable": f"cannot reach the storage ({reason})",
            }.get(kind, reason)
            raise BucketError(f"{self.where()}: {message}") from None
        probe = f".diffcom-probe-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        try:
            self.write(probe, b"write check\n")
            self.delete(probe)
        except Exception as error:
            failure = self._failure(error)
            if failure is None or failure[0] == "unreachable":
                raise
            raise BucketError(
                f"{self.where()}: cannot write to the {self.NOUN} ({failure[1]}): experiments "
                "need read and write access"
            ) from None

    def _top(self) -> str:
        """The bucket (container, folder) that :meth:`check` names, quoted."""
        return repr(self.uri.bucket)

    def _ask_for_one_object(self) -> None:
        """The cheapest request that fails for a missing, denied or unreachable bucket."""
        self.client.head_bucket(Bucket=self.uri.bucket)

    def _failure(self, error: Exception) -> tuple[str, str] | None:
        """``(kind, reason)`` of a client's error: kind ``missing``, ``denied``,
        ``unreachable`` or ``other`` (the reason is then the whole message); ``None`` for an
        error that is not the store's (a bug: raised as it is)."""
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError):
            code = _code(error)
            if code in ("404", "NoSuchBucket", "NotFound"):
                return "missing", code
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId"):
                return "denied", code
            return "other", str(error)
        if isinstance(error, BotoCoreError):
            return "unreachable", str(error)
        return None

    # ------------------------------------------------------------------------------- objects

    def listing(self, under: str = "") -> dict[str, RemoteObject]:
        """Every object under ``under`` (a relative folder, ``""`` for all), by relative path."""
        prefix = self.uri.key(under)
        prefix = f"{prefix}/" if prefix else ""
        found: dict[str, RemoteObject] = {}
        pages = self.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.uri.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(self.uri.key()) :].lstrip("/")
                found[relative] = RemoteObject(
                    item["Size"], item["ETag"].strip('"'), item["LastModified"].timestamp()
                )
        return found

    def exists(self, relative: str) -> bool:
        return self.head(relative) is not None

    def head(self, relative: str) -> tuple[str, float, float] | None:
        """``(etag, last modified, server's now)`` in server seconds, or ``None`` if absent."""
        answer = self._unless_missing(self.client.head_object, relative)
        if answer is None:
            return None
        return answer["ETag"].strip('"'), answer["LastModified"].timestamp(), _server_now(answer)

    def read(self, relative: str) -> tuple[bytes, str, float] | None:
        """An object's bytes, ETag and modification time, or ``None`` if absent."""
        answer = self._unless_missing(self.client.get_object, relative)
        if answer is None:
            return None
        return answer["Body"].read(), answer["ETag"].strip('"'), answer["LastModified"].timestamp()

    def _unless_missing(self, request, relative: str) -> dict | None:
        """``request(Bucket=..., Key=...)``'s answer for one object, ``None`` if it is absent."""
        from botocore.exceptions import ClientError

        try:
            return request(Bucket=self.uri.bucket, Key=self.uri.key(relative))
        except ClientError as error:
            if _code(error) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def download(self, relative: str, path: Path) -> None:
        """An object into ``path``, atomically (a reader of ``path`` never sees half of it)."""
        with atomic_write(path) as stream:
            self.client.download_fileobj(self.uri.bucket, self.uri.key(relative), stream)

    def upload(self, path: Path, relative: str) -> None:
        self.client.upload_file(str(path), self.uri.bucket, self.uri.key(relative))

    def write(self, relative: str, payload: bytes) -> str:
        answer = self.client.put_object(
            Bucket=self.uri.bucket, Key=self.uri.key(relative), Body=payload
        )
        return answer["ETag"].strip('"')

    def create(self, relative: str, payload: bytes) -> str | None:
        """Write an object only if none exists; its ETag, or ``None`` if one already did."""
        return self._conditional_put(relative, payload, IfNoneMatch="*")

    def replace(self, relative: str, payload: bytes, etag: str) -> str | None:
        """Overwrite an object only if its ETag is still ``etag``; the new ETag, or ``None``."""
        return self._conditional_put(relative, payload, IfMatch=f'"{etag}"')

    def delete(self, relative: str) -> None:
        self.client.delete_object(Bucket=self.uri.bucket, Key=self.uri.key(relative))

    def _conditional_put(self, relative: str, payload: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.put_object(
                Bucket=self.uri.bucket, Key=self.uri.key(relative), Body=payload, **condition
            )
        except ClientError as error:
            # 409: a concurrent conditional write to the same key is in flight (AWS asks to retry).
            if _code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return None
            if _code(error) in ("404", "NoSuchKey") and "IfMatch" in condition:
                return None  # deleted meanwhile: the caller's ETag no longer names it
            raise
        return answer["ETag"].strip('"')


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _server_now(answer: dict) -> float:
    """The server's clock from a response's ``Date`` header (the local clock if missing)."""
    from email.utils import parsedate_to_datetime

    date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return parsedate_to_datetime(date).timestamp() if date else time.time()


class GcsBucket(Bucket):
    """A ``gs://`` location through google-cloud-storage. An object's generation is its ETag:
    every write makes a new one, and ``ifGenerationMatch`` makes :meth:`create` (generation 0:
    no object) and :meth:`replace` conditional, as S3's ``If-None-Match`` and ``If-Match`` do."""

    CREATE_HINT = "gcloud storage buckets create gs://BUCKET"
    DENIED_HINT = "check the credentials and the bucket's IAM roles"

    @property
    def client(self):
        if self._client is None:
            from google.cloud import storage

            if os.environ.get("STORAGE_EMULATOR_HOST"):
                # A GCS-compatible server (fake-gcs-server): no Google credentials to look for.
                from google.auth.credentials import AnonymousCredentials

                project = os.environ.get("GOOGLE_CLOUD_PROJECT", "diffcom")
                self._client = storage.Client(project=project, credentials=AnonymousCredentials())
            else:
                self._client = storage.Client()
        return self._client

    def where(self) -> str:
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        return f"{self.uri} (endpoint {emulator})" if emulator else str(self.uri)

    def _ask_for_one_object(self) -> None:
        # Listing needs only object permissions (roles/storage.objectAdmin has them, and not the
        # bucket's own metadata, which get_bucket would read).
        list(self.client.list_blobs(self.uri.bucket, prefix=self.uri.key(), max_results=1))

    def _failure(self, error: Exception) -> tuple[str, str] | None:
        from google.api_core import exceptions as google
        from google.auth.exceptions import DefaultCredentialsError

        if isinstance(error, DefaultCredentialsError):
            return "other", (
                f"no Google Cloud credentials ({error}); run `gcloud auth application-default "
                "login` or set GOOGLE_APPLICATION_CREDENTIALS"
            )
        if isinstance(error, google.NotFound):
            return "missing", str(error.code)
        if isinstance(error, (google.Forbidden, google.Unauthorized)):
            return "denied", str(error.code)
        # A refused connection, a DNS failure, a server error.
        return "unreachable", str(error)

    def _blob(self, relative: str):
        return self.client.bucket(self.uri.bucket).blob(self.uri.key(relative))

    def listing(self, under: str = "") -> dict[str, RemoteObject]:
        prefix = self.uri.key(under)
        prefix = f"{prefix}/" if prefix else ""
        found: dict[str, RemoteObject] = {}
        for blob in self.client.list_blobs(self.uri.bucket, prefix=prefix):
            relative = blob.name[len(self.uri.key()) :].lstrip("/")
            found[relative] = RemoteObject(
                int(blob.size or 0), str(blob.generation), blob.updated.timestamp()
            )
        return found

    def head(self, relative: str) -> tuple[str, float, float] | None:
        """``(generation, last modified, server's now)`` in server seconds, or ``None``.

        One metadata request through the client's own authorised session, for the ``Date``
        header beside the metadata: the lease's clock is the server's, as with S3.
        """
        from datetime import datetime
        from email.utils import parsedate_to_datetime
        from urllib.parse import quote

        from google.api_core import exceptions as google

        path = f"/b/{quote(self.uri.bucket, safe='')}/o/{quote(self.uri.key(relative), safe='')}"
        response = self.client._http.get(self.client._connection.build_api_url(path))
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise google.from_http_response(response)
        metadata = response.json()
        modified = datetime.fromisoformat(metadata["updated"].replace("Z", "+00:00")).timestamp()
        date = response.headers.get("Date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return str(metadata["generation"]), modified, now

    def read(self, relative: str) -> tuple[bytes, str, float] | None:
        from google.api_core import exceptions as google

        for _ in range(5):  # the object may be replaced between its metadata and its bytes
            blob = self.client.bucket(self.uri.bucket).get_blob(self.uri.key(relative))
            if blob is None:
                return None
            try:
                payload = blob.download_as_bytes(if_generation_match=blob.generation)
            except google.PreconditionFailed:
                continue
            except google.NotFound:
                return None
            return payload, str(blob.generation), blob.updated.timestamp()
        raise BucketError(f"{self.where()}: {relative} changed at every one of 5 reads")

    def download(self, relative: str, path: Path) -> None:
        with atomic_write(path) as stream:
            self._blob(relative).download_to_file(stream)

    def upload(self, path: Path, relative: str) -> None:
        self._blob(relative).upload_from_filename(str(path))

    def write(self, relative: str, payload: bytes) -> str:
        blob = self._blob(relative)
        blob.upload_from_string(payload)
        return str(blob.generation)

    def create(self, relative: str, payload: bytes) -> str | None:
        return self._conditional_write(relative, payload, 0)

    def replace(self, relative: str, payload: bytes, etag: str) -> str | None:
        if not etag.isdigit():
            return None  # not a generation: no object has it
        return self._conditional_write(relative, payload, int(etag))

    def delete(self, relative: str) -> None:
        from google.api_core import exceptions as google

        with contextlib.suppress(google.NotFound):  # as S3's delete: gone either way
            self._blob(relative).delete()

    def _conditional_write(self, relative: str, payload: bytes, generation: int) -> str | None:
        """Write only if the object's generation is ``generation`` (0: no object). Leases and
        claims are small: a single-request upload, where the server checks the condition."""
        from google.api_core import exceptions as google

        blob = self._blob(relative)
        try:
            blob.upload_from_string(payload, if_generation_match=generation)
        except (google.PreconditionFailed, google.NotFound):
            return None
        return str(blob.generation)


# ------------------------------------------------------------------------------------ Azure


@dataclass(frozen=True)
class AzureAccount:
    """The storage account that ``az://`` locations live in, as the environment names it.

    Attributes:
        name: the account's name.
        blob_endpoint: its Blob service, e.g. ``https://NAME.blob.core.windows.net`` or a local
            server's ``http://127.0.0.1:10000/devstoreaccount1``.
        key: the account key, if one is given (else a SAS, else azure-identity's chain).
        sas: a shared access signature, if one is given.
        connection_string: the connection string it came from, if any.
    """

    name: str
    blob_endpoint: str
    # Secrets: never in a repr (an error message, a log line).
    key: str | None = field(default=None, repr=False)
    sas: str | None = field(default=None, repr=False)
    connection_string: str | None = field(default=None, repr=False)

    @classmethod
    def from_environment(cls) -> AzureAccount:
        """From ``$AZURE_STORAGE_CONNECTION_STRING``, else ``$AZURE_STORAGE_ACCOUNT_NAME`` (with
        ``$AZURE_STORAGE_ACCOUNT_KEY`` when set).

        Raises:
            BucketError: neither is set, or the connection string is malformed.
        """
        text = os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
        if text:
            return cls.parse(text)
        name = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME", "").strip()
        if not name:
            raise BucketError(
                "az:// storage needs a storage account: set AZURE_STORAGE_CONNECTION_STRING, or "
                "AZURE_STORAGE_ACCOUNT_NAME (with AZURE_STORAGE_ACCOUNT_KEY, or signed in with "
                "`az login` or a managed identity)"
            )
        key = os.environ.get("AZURE_STORAGE_ACCOUNT_KEY", "").strip() or None
        return cls(name, f"https://{name}.blob.core.windows.net", key=key)

    @classmethod
    def parse(cls, text: str) -> AzureAccount:
        """An account from a connection string (``Key=Value`` parts separated by ``;``)."""
        where = "AZURE_STORAGE_CONNECTION_STRING"
        fields: dict[str, str] = {}
        for part in filter(None, (part.strip() for part in text.split(";"))):
            key, separator, value = part.partition("=")
            if not separator:
                raise BucketError(
                    f"{where}: {key!r} is not a Key=Value part (expected e.g. "
                    "'AccountName=...;AccountKey=...;BlobEndpoint=...')"
                )
            fields[key.strip().lower()] = value.strip()
        name, endpoint = fields.get("accountname"), fields.get("blobendpoint")
        if not endpoint and name:
            protocol = fields.get("defaultendpointsprotocol", "https")
            endpoint = (
                f"{protocol}://{name}.blob.{fields.get('endpointsuffix', 'core.windows.net')}"
            )
        if not endpoint:
            raise BucketError(f"{where}: names neither AccountName nor BlobEndpoint")
        if not name:  # a SAS-only string: the account is the endpoint's first label
            name = endpoint.split("://", 1)[-1].split(".", 1)[0]
        return cls(
            name,
            endpoint.rstrip("/"),
            key=fields.get("accountkey"),
            sas=fields.get("sharedaccesssignature"),
            connection_string=text,
        )

    def client(self):
        """A ``BlobServiceClient`` for the account: few, short retries (a refused connection
        fails a check in seconds, not minutes)."""
        from azure.storage.blob import BlobServiceClient, ExponentialRetry

        options = {
            "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=3, retry_total=3),
            "connection_timeout": 10,
            "read_timeout": 120,
        }
        if self.connection_string:
            return BlobServiceClient.from_connection_string(self.connection_string, **options)
        if self.key:
            credential = {"account_name": self.name, "account_key": self.key}
        else:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        return BlobServiceClient(self.blob_endpoint, credential=credential, **options)

    def pyarrow_options(self) -> dict[str, str]:
        """The arguments of ``pyarrow.fs.AzureFileSystem`` for the account.

        pyarrow wants the service's authority without the account: ``.blob.core.windows.net``
        after the account's name, or the ``host:port`` of a server that puts the account in the
        path (Azurite). Without a key or SAS, pyarrow's own default credential signs in; the
        ``$AZURE_CLIENT_ID``, ``$AZURE_TENANT_ID`` and ``$AZURE_CLIENT_SECRET`` that
        azure-identity reads (a user-assigned managed identity, a service principal) are passed
        to it as arguments, so both clients sign in as the same identity.
        """
        from urllib.parse import urlsplit

        url = urlsplit(self.blob_endpoint)
        host = url.netloc
        authority = host[len(self.name) :] if host.startswith(f"{self.name}.") else host
        options = {
            "account_name": self.name,
            "blob_storage_authority": authority,
            "dfs_storage_authority": authority.replace(".blob.", ".dfs.", 1),
            "blob_storage_scheme": url.scheme,
            "dfs_storage_scheme": url.scheme,
        }
        if self.key:
            options["account_key"] = self.key
        elif self.sas:
            options["sas_token"] = self.sas
        else:
            for option, variable in (
                ("client_id", "AZURE_CLIENT_ID"),
                ("tenant_id", "AZURE_TENANT_ID"),
                ("client_secret", "AZURE_CLIENT_SECRET"),
            ):
                if os.environ.get(variable):
                    options[option] = os.environ[variable]
        return options

    def pyarrow_filesystem(self):
        """The same account as a ``pyarrow.fs.AzureFileSystem`` (what Ray Tune writes through)."""
        import pyarrow.fs

        return pyarrow.fs.AzureFileSystem(**self.pyarrow_options())


class AzureBucket(Bucket):
    """An ``az://CONTAINER/PREFIX`` location through azure-storage-blob. Blob Storage's ETags
    and conditions are S3's: :meth:`create` sends ``If-None-Match: *``, :meth:`replace`
    ``If-Match``; a large upload is staged in blocks and committed whole, so a reader never sees
    half of it."""

    NOUN = "container"
    CREATE_HINT = "az storage container create --name CONTAINER"
    DENIED_HINT = "check the account key, SAS or role assignment"

    _account: AzureAccount | None = None

    @property
    def account(self) -> AzureAccount:
        """The storage account, read from the environment on first use."""
        if self._account is None:
            self._account = AzureAccount.from_environment()
        return self._account

    @property
    def client(self):
        """The container's client."""
        if self._client is None:
            self._client = self.account.client().get_container_client(self.uri.bucket)
        return self._client

    def where(self) -> str:
        try:
            account = self.account
        except BucketError:  # no account in the environment: the error says so
            return str(self.uri)
        return f"{self.uri} (account {account.name}, endpoint {account.blob_endpoint})"

    def child(self, name: str) -> Bucket:
        child = super().child(name)
        child._account = self._account
        return child

    def _ask_for_one_object(self) -> None:
        # Listing needs only data access (a SAS or the Storage Blob Data Contributor role), not
        # the container's own properties.
        pages = self.client.list_blobs(name_starts_with=self.uri.key(), results_per_page=1)
        next(iter(pages), None)

    def _failure(self, error: Exception) -> tuple[str, str] | None:
        from azure.core import exceptions as azure

        if isinstance(error, BucketError):
            return "other", str(error)  # no account in the environment
        if isinstance(error, azure.ResourceNotFoundError):
            return "missing", _azure_reason(error)
        if isinstance(error, azure.ClientAuthenticationError) or (
            isinstance(error, azure.HttpResponseError) and error.status_code in (401, 403)
        ):
            return "denied", _azure_reason(error)
        if isinstance(error, azure.HttpResponseError):
            return "other", _azure_reason(error)
        # A refused connection, a DNS failure, no credential found by azure-identity.
        return "unreachable", str(error)

    def _blob(self, relative: str):
        return self.client.get_blob_client(self.uri.key(relative))

    def listing(self, under: str = "") -> dict[str, RemoteObject]:
        prefix = self.uri.key(under)
        prefix = f"{prefix}/" if prefix else ""
        found: dict[str, RemoteObject] = {}
        for blob in self.client.list_blobs(name_starts_with=prefix or None):
            relative = blob.name[len(self.uri.key()) :].lstrip("/")
            found[relative] = RemoteObject(
                int(blob.size or 0), blob.etag.strip('"'), blob.last_modified.timestamp()
            )
        return found

    def head(self, relative: str) -> tuple[str, float, float] | None:
        from email.utils import parsedate_to_datetime

        from azure.core.exceptions import ResourceNotFoundError

        seen: dict[str, str | None] = {}
        try:
            properties = self._blob(relative).get_blob_properties(
                raw_response_hook=lambda answer: seen.update(
                    date=answer.http_response.headers.get("Date")
                )
            )
        except ResourceNotFoundError:
            return None
        date = seen.get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return properties.etag.strip('"'), properties.last_modified.timestamp(), now

    def read(self, relative: str) -> tuple[bytes, str, float] | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            # One object, one ETag: the client pins the ETag across a large blob's range reads.
            stream = self._blob(relative).download_blob()
            payload = stream.readall()
        except ResourceNotFoundError:
            return None
        properties = stream.properties
        return payload, properties.etag.strip('"'), properties.last_modified.timestamp()

    def download(self, relative: str, path: Path) -> None:
        with atomic_write(path) as stream:
            self._blob(relative).download_blob(max_concurrency=TRANSFER_THREADS).readinto(stream)

    def upload(self, path: Path, relative: str) -> None:
        with path.open("rb") as stream:
            # Past 64 MiB the client stages 4 MiB blocks, several at a time, and commits them as
            # one (a checkpoint at FB15k-237 size is about 800 MB).
            self._blob(relative).upload_blob(
                stream, overwrite=True, max_concurrency=TRANSFER_THREADS
            )

    def write(self, relative: str, payload: bytes) -> str:
        return self._blob(relative).upload_blob(payload, overwrite=True)["etag"].strip('"')

    def create(self, relative: str, payload: bytes) -> str | None:
        from azure.core.exceptions import ResourceExistsError

        try:
            # overwrite=False sends If-None-Match: *
            answer = self._blob(relative).upload_blob(payload, overwrite=False)
        except ResourceExistsError:
            return None
        return answer["etag"].strip('"')

    def replace(self, relative: str, payload: bytes, etag: str) -> str | None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        try:
            answer = self._blob(relative).upload_blob(
                payload,
                overwrite=True,
                etag=f'"{etag}"',
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            return None
        return answer["etag"].strip('"')

    def delete(self, relative: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):  # as S3's delete: gone either way
            self._blob(relative).delete_blob()


def _azure_reason(error) -> str:
    """An Azure error's status and code, without the SDK's multi-line message."""
    code = getattr(error, "error_code", None) or getattr(error, "reason", None) or ""
    status = getattr(error, "status_code", None)
    return " ".join(str(part) for part in (status, code) if part) or type(error).__name__


# ---------------------------------------------------------------------------------- mirrors


def scratch_folder(uri: BucketUri, role: str) -> Path:
    """A new local folder for a mirror of ``uri``: ``$DIFFCOM_SCRATCH`` (default: the system's
    temporary folder) ``/diffcom-<hash of the URI>/<role>-<unique>``."""
    base = Path(os.environ.get("DIFFCOM_SCRATCH") or tempfile.gettempdir())
    digest = hashlib.sha256(str(uri).encode()).hexdigest()[:12]
    parent = base / f"diffcom-{digest}"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{role}-", dir=parent))


class Mirror:
    """A local folder that mirrors (part of) one bucket location.

    Args:
        bucket: the location (an experiment's ``s3://.../<name>``).
        local: the local folder (created).
        read_only: a mirror that only pulls (a parent experiment's shared stage 1, a report's
            copy): :meth:`push` refuses.
    """

    def __init__(self, bucket: Bucket, local: Path, *, read_only: bool = False):
        self.bucket = bucket
        self.local = Path(local)
        self.local.mkdir(parents=True, exist_ok=True)
        (self.local / MARKER).write_text(json.dumps({"uri": str(bucket.uri)}) + "\n")
        self.read_only = read_only
        # relative path -> (remote etag, local size, local mtime_ns) as last pulled or pushed
        self._known: dict[str, tuple[str, int, int]] = {}
        self._lock = threading.Lock()
        self.uploaded_bytes = 0
        self.uploaded_files = 0

    def pull(self, under: str = "", *, skip: tuple[str, ...] = ()) -> int:
        """Download every object under ``under`` whose ETag changed since this mirror last saw
        it; files whose relative path contains one of ``skip`` (e.g. :data:`HEAVY_PARTS`) are
        left out. Local files this process changed and has not pushed are kept. Returns how many
        files were downloaded."""
        downloaded = 0
        with self._lock:
            for relative, item in sorted(self.bucket.listing(under).items()):
                if any(part in relative for part in skip) or not _mirrored(relative):
                    continue
                path = self.local / relative
                known = self._known.get(relative)
                if known is not None and path.is_file():
                    if known[0] == item.etag:
                        continue
                    if _stat(path) != known[1:]:
                        continue  # changed here since: this process owns the newer version
                    if not known[0] and known[1] == item.size:
                        # Pushed from here (an upload's ETag is not returned): the same file.
                        self._known[relative] = (item.etag, *known[1:])
                        continue
                self.bucket.download(relative, path)
                self._known[relative] = (item.etag, *_dated(path, item.modified))
                downloaded += 1
        return downloaded

    def pull_file(self, relative: str) -> bool:
        """Download one object if it changed; whether it exists in the bucket."""
        with self._lock:
            found = self.bucket.read(relative)
            if found is None:
                return False
            payload, etag, modified = found
            known = self._known.get(relative)
            path = self.local / relative
            if known is None or known[0] != etag or not path.is_file():
                with atomic_write(path) as stream:
                    stream.write(payload)
                self._known[relative] = (etag, *_dated(path, modified))
            return True

    def push(
        self, under: str = "", *, names: tuple[str, ...] = (), skip: tuple[str, ...] = ()
    ) -> int:
        """Upload every file under ``under`` (only those named ``names``, when given; none whose
        relative path contains one of ``skip``) that changed locally since the last pull or push:
        checkpoints after the other files, ``status.json`` files last. Returns the count."""
        if self.read_only:
            raise BucketError(f"{self.bucket.uri}: this mirror is read-only")
        with self._lock:
            root = self.local / under if under else self.local
            changed = []
            for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
                relative = path.relative_to(self.local).as_posix()
                if not path.is_file() or not _mirrored(relative):
                    continue
                if names and path.name not in names:
                    continue
                if any(part in relative for part in skip):
                    continue
                known = self._known.get(relative)
                if known is None or known[1:] != _stat(path):
                    changed.append(relative)

            def order(relative: str) -> int:
                if Path(relative).name == STATUS.file:
                    return 2
                return 1 if f"{CHECKPOINT_DIR}/" in relative else 0

            for relative in sorted(changed, key=order):
                path = self.local / relative
                before = _stat(path)
                self.bucket.upload(path, relative)
                # The ETag is not known without another request; an upload's own ETag is only
                # needed to skip downloading it again, and a fresh listing gives it then.
                self._known[relative] = ("", *before)
                self.uploaded_bytes += before[0]
                self.uploaded_files += 1
            return len(changed)


def _mirrored(relative: str) -> bool:
    """Whether a file belongs in the bucket: not the marker, not a write in flight."""
    name = relative.rsplit("/", 1)[-1]
    return relative != MARKER and not is_temporary(name)


def _dated(path: Path, modified: float) -> tuple[int, int]:
    """Give a downloaded file the object's modification time (readers date heartbeats by it);
    its size and new mtime."""
    os.utime(path, (modified, modified))
    return _stat(path)


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


# ----------------------------------------------------------------------------------- leases


class Lease:
    """An exclusive, expiring lease on one key, held in the bucket (see the module docstring).

    Used as a context manager: entering waits until the lease is held (``poll`` seconds between
    tries), leaving releases it. While held, a thread renews it every ``ttl / 4`` seconds. A lease
    whose object the server has not seen renewed for ``ttl`` seconds belongs to a dead holder and
    is taken over.

    Args:
        bucket: where the lease object lives.
        relative: its path (e.g. ``stage1/<key>.lease``).
        holder: who asks (written into the object; shown to whoever waits).
        ttl: seconds without renewal after which the lease is taken over.
        poll: seconds between two tries while another holder has it.
        on_wait: called with the holder's record each time this one waits on it.
    """

    def __init__(
        self,
        bucket: Bucket,
        relative: str,
        holder: str,
        *,
        ttl: float = 120.0,
        poll: float = 2.0,
        on_wait=None,
    ):
        self.bucket, self.relative, self.holder = bucket, relative, holder
        self.ttl, self.poll, self.on_wait = ttl, poll, on_wait
        self.took_over: dict | None = None
        self.lost = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> bytes:
        record = {
            "holder": self.holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ttl": self.ttl,
            "renewed": time.time(),
        }
        return json.dumps(record).encode()

    def acquire(self) -> None:
        while True:
            etag = self.bucket.create(self.relative, self._record())
            if etag is not None:
                break
            found = self.bucket.head(self.relative)
            if found is None:
                continue  # released between the two requests
            current, modified, server_now = found
            held_by = self._read_holder()
            if server_now - modified > self.ttl:
                etag = self.bucket.replace(self.relative, self._record(), current)
                if etag is not None:
                    self.took_over = held_by
                    break
                continue  # another asker took it over first
            if self.on_wait is not None:
                self.on_wait(held_by)
            time.sleep(self.poll)
        self._etag = etag
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._renewer.start()

    def _read_holder(self) -> dict:
        found = self.bucket.read(self.relative)
        if found is None:
            return {}
        with contextlib.suppress(ValueError):
            record = json.loads(found[0])
            if isinstance(record, dict):
                return record
        return {}

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                etag = self.bucket.replace(self.relative, self._record(), self._etag)
            except Exception:  # a network error: try again at the next beat
                continue
            if etag is None:
                self.lost = True  # taken over: this holder looked dead to another asker
                return
            self._etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if not self.lost:
            found = self.bucket.head(self.relative)
            if found is not None and found[0] == self._etag:
                self.bucket.delete(self.relative)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def pull_metadata(mirror: Mirror) -> None:
    """An experiment's own files into its mirror: ``experiment.json``, ``plan.json``, the study
    copy (changed ones only)."""
    for name in (EXPERIMENT.file, PLAN.file, STUDY_COPY):
        mirror.pull_file(name)


def pull_results(mirror: Mirror) -> Mirror:
    """Bring a mirror of an experiment up to date for reading its results (``status``,
    ``watch``, ``report``): its own files, runs and shared stage-1 runs, without
    :data:`HEAVY_PARTS`; changed files only."""
    pull_metadata(mirror)
    for under in (RUNS_DIR, STAGE1_DIR):
        mirror.pull(under, skip=HEAVY_PARTS)
    return mirror
