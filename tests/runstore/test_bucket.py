"""runstore.bucket and runstore.filesystem against real servers on localhost: an S3-compatible one
(tests/s3.py), a GCS-compatible one (tests/gcs.py), Azurite (tests/azure.py) and an SFTP server
(tests/sftp.py), the last through fsspec with a coordinator in place of conditional writes. Every
test of a bucket runs on all four but the 4.5 s watch of a renewed lease (S3 and SFTP)."""

from __future__ import annotations

import threading
import time

import pytest

from runstore.bucket import (
    AzureAccount,
    AzureBucket,
    Bucket,
    BucketError,
    BucketUri,
    GcsBucket,
    Lease,
    Mirror,
)
from runstore.filesystem import Coordinator, FilesystemBucket, digest
from tests import azure, gcs, sftp
from tests.s3 import new_bucket, start_server


@pytest.fixture(params=["s3", "gs", "az", "sftp"])
def bucket(request):
    if request.param == "sftp":
        return Bucket(sftp.new_folder(request.getfixturevalue("sftp_server"), "exp"))
    if request.param == "s3":
        request.getfixturevalue("s3_server")
        return Bucket(f"s3://{new_bucket()}/experiments/exp")
    if request.param == "az":
        request.getfixturevalue("azurite")
        return Bucket(f"az://{azure.new_container()}/experiments/exp")
    request.getfixturevalue("gcs_server")
    return Bucket(f"gs://{gcs.new_bucket()}/experiments/exp")


def test_uri_parsing_and_refusals():
    uri = BucketUri.parse("s3://my-bucket/a/b/")
    assert (uri.bucket, uri.prefix, uri.name, str(uri)) == (
        "my-bucket",
        "a/b",
        "b",
        "s3://my-bucket/a/b",
    )
    assert uri.child("exp").key("runs/x") == "a/b/exp/runs/x"
    assert BucketUri.parse("s3://my-bucket").key("x") == "x"
    gs = BucketUri.parse("gs://my_bucket/a/")
    assert (gs.bucket, gs.prefix, str(gs.child("exp"))) == (
        "my_bucket",
        "a",
        "gs://my_bucket/a/exp",
    )
    assert isinstance(Bucket(gs), GcsBucket) and type(Bucket("s3://my-bucket")) is Bucket
    other = BucketUri.parse("sftp://me@lab-storage:2222/data/experiments/")
    assert (other.scheme, other.bucket, other.prefix) == (
        "sftp://",
        "me@lab-storage:2222",
        "data/experiments",
    )
    assert isinstance(Bucket(other), FilesystemBucket)
    az = BucketUri.parse("az://my-container/a/b")
    assert (az.bucket, az.prefix, az.scheme) == ("my-container", "a/b", "az://")
    assert isinstance(Bucket(az), AzureBucket)
    for bad, words in [
        ("s3://", "not a bucket name"),
        ("s3://UPPER/x", "not a bucket name"),
        ("s3://under_score", "not a bucket name"),  # S3 names have no '_'; GCS names may
        ("gs://UPPER/x", "not a bucket name"),
        ("s3://ok-bucket/a//b", "empty"),
        ("gs://ok-bucket/a/../b", "'..'"),
        ("az://my_container", "not an Azure container name"),  # no '_' in containers
        ("az://my--container", "no '--'"),
        ("experiments/x", "expected s3://BUCKET.*gs://BUCKET.*az://CONTAINER.*fsspec"),
        ("file:///data/x", "a folder: give its path"),
        ("memory://x/y", "inside one process"),
        ("gcs://b/x", "use gs://"),
        ("nosuch://host/x", "fsspec knows no file system 'nosuch'"),
        ("sftp:///data/x", "no host"),
        ("sftp://me:secret@host/x", "FSSPEC_SFTP_PASSWORD"),
    ]:
        with pytest.raises(BucketError, match=words):
            BucketUri.parse(bad)


def test_a_missing_bucket_is_named(s3_server):
    with pytest.raises(BucketError, match="'no-such-bucket' does not exist.*") as caught:
        Bucket("s3://no-such-bucket/x").check()
    assert s3_server in str(caught.value)  # the endpoint is named


def test_a_missing_gcs_bucket_is_named(gcs_server):
    with pytest.raises(BucketError, match="'no-such-bucket' does not exist.*gcloud") as caught:
        Bucket("gs://no-such-bucket/x").check()
    assert gcs_server in str(caught.value)  # the endpoint is named


def test_a_gcs_bucket_without_credentials_is_named(tmp_path, monkeypatch):
    # Google Cloud itself (no emulator), with credentials that are not there: refused before any
    # request leaves the machine.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(BucketError, match="gs://some-bucket/x: no Google Cloud credentials"):
        Bucket("gs://some-bucket/x").check()


def test_a_missing_azure_container_is_named(azurite):
    with pytest.raises(BucketError, match="container 'no-such-container' does not exist") as caught:
        Bucket("az://no-such-container/x").check()
    assert f"account {azure.ACCOUNT}, endpoint {azurite}" in str(caught.value)


def test_an_azure_account_that_denies_access_is_named(azurite, monkeypatch):
    container = azure.new_container()
    wrong_key = azure.KEY[:-8] + "AAAAAAA="
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", azure.connection_string(azurite, wrong_key)
    )
    with pytest.raises(BucketError, match=f"access to the container '{container}' is denied"):
        Bucket(f"az://{container}/x").check()


def test_an_azure_location_without_an_account_is_named(monkeypatch):
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BucketError, match="az:// storage needs a storage account"):
        Bucket("az://some-container/x").check()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=x;AccountKey")
    with pytest.raises(BucketError, match="'AccountKey' is not a Key=Value part"):
        Bucket("az://some-container/x").check()


def test_azure_accounts_from_the_environment(monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "lab")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "c2VjcmV0")
    assert AzureAccount.from_environment() == AzureAccount(
        "lab", "https://lab.blob.core.windows.net", key="c2VjcmV0"
    )
    sovereign = AzureAccount.parse(
        "DefaultEndpointsProtocol=https;AccountName=lab;AccountKey=c2VjcmV0;"
        "EndpointSuffix=core.usgovcloudapi.net"
    )
    assert sovereign.blob_endpoint == "https://lab.blob.core.usgovcloudapi.net"
    signed = AzureAccount.parse(
        "BlobEndpoint=https://lab.blob.core.windows.net/;SharedAccessSignature=sv=1&sig=x"
    )
    assert (signed.name, signed.sas, signed.key) == ("lab", "sv=1&sig=x", None)
    # What Ray Tune's pyarrow client gets: the authority without the account, or a local server's
    # host and port; without a key or SAS, the identity azure-identity would use.
    assert sovereign.pyarrow_options()["blob_storage_authority"] == ".blob.core.usgovcloudapi.net"
    local = AzureAccount("devstoreaccount1", "http://127.0.0.1:10000/devstoreaccount1", key="k")
    assert local.pyarrow_options() == {
        "account_name": "devstoreaccount1",
        "account_key": "k",
        "blob_storage_authority": "127.0.0.1:10000",
        "dfs_storage_authority": "127.0.0.1:10000",
        "blob_storage_scheme": "http",
        "dfs_storage_scheme": "http",
    }
    monkeypatch.setenv("AZURE_CLIENT_ID", "identity-of-the-vm")
    keyless = AzureAccount("lab", "https://lab.blob.core.windows.net")
    assert keyless.pyarrow_options()["client_id"] == "identity-of-the-vm"
    assert "account_key" not in keyless.pyarrow_options()


def test_a_bucket_that_denies_access_is_named(tmp_path):
    for _ in start_server(tmp_path, require_auth=True):
        with pytest.raises(BucketError, match="access to the bucket 'any-bucket' is denied"):
            Bucket("s3://any-bucket/x").check()


def test_check_passes_and_leaves_nothing(bucket):
    bucket.check()
    assert bucket.listing() == {}


def test_push_uploads_what_changed_and_pull_downloads_what_changed(bucket, tmp_path):
    writer = Mirror(bucket, tmp_path / "writer")
    run = writer.local / "runs" / "a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run / "checkpoints" / "last.pt").write_bytes(b"x" * 1000)
    (run / "status.json").write_text("{}")
    (run / ".status.json.1.0123456789ab.tmp").write_text("half")  # a write in flight: never sent
    assert writer.push() == 3
    assert writer.push() == 0
    assert set(bucket.listing()) == {
        "runs/a/metrics.jsonl",
        "runs/a/checkpoints/last.pt",
        "runs/a/status.json",
    }

    reader = Mirror(bucket, tmp_path / "reader", read_only=True)
    assert reader.pull(skip=("checkpoints/",)) == 2
    assert not (reader.local / "runs/a/checkpoints/last.pt").exists()
    assert reader.pull(skip=("checkpoints/",)) == 0
    time.sleep(0.01)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert writer.push() == 1
    assert reader.pull("runs/a", skip=("checkpoints/",)) == 1
    assert (reader.local / "runs/a/metrics.jsonl").read_text().count("epoch") == 2
    assert reader.pull("runs/a") == 1  # the checkpoint, now that it is asked for
    assert writer.pull() == 0  # its own uploads are not downloaded back
    with pytest.raises(BucketError, match="read-only"):
        reader.push()


def test_pull_keeps_a_file_changed_here_and_not_yet_pushed(bucket, tmp_path):
    first, second = Mirror(bucket, tmp_path / "1"), Mirror(bucket, tmp_path / "2")
    (first.local / "f").write_text("one")
    first.push()
    second.pull()
    (second.local / "f").write_text("mine")
    (first.local / "f").write_text("theirs!")
    first.push()
    second.pull()
    assert (second.local / "f").read_text() == "mine"


def test_a_checkpoint_larger_than_one_request_goes_up_and_down_whole(bucket, tmp_path):
    # 65 MiB: past the size each client sends in one request (S3 and GCS 8 MiB, Azure 64 MiB),
    # so the upload is multipart, resumable or staged blocks, and the download ranged.
    payload = bytes(range(256)) * (65 * 4096)
    writer = Mirror(bucket, tmp_path / "writer")
    checkpoint = writer.local / "runs" / "a" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(payload)
    assert writer.push() == 1
    assert bucket.listing()["runs/a/checkpoints/last.pt"].size == len(payload)
    reader = Mirror(bucket, tmp_path / "reader")
    assert reader.pull() == 1
    assert (reader.local / "runs" / "a" / "checkpoints" / "last.pt").read_bytes() == payload


def test_conditional_writes(bucket):
    etag = bucket.create("lease", b"a")
    assert etag and bucket.create("lease", b"b") is None
    assert bucket.replace("lease", b"c", "wrong") is None
    new = bucket.replace("lease", b"c", etag)
    assert new and bucket.read("lease")[:2] == (b"c", new)


def test_a_lease_is_held_by_one_holder_at_a_time(bucket):
    inside, overlaps, order = [], [], []

    def hold(name: str) -> None:
        with Lease(bucket, "stage1/k.lease", name, ttl=30, poll=0.05):
            inside.append(name)
            if len(inside) > 1:
                overlaps.append(list(inside))
            order.append(name)
            time.sleep(0.3)
            inside.remove(name)

    threads = [threading.Thread(target=hold, args=(f"t{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(order) == ["t0", "t1", "t2"] and overlaps == []
    assert not bucket.exists("stage1/k.lease")  # released by the last holder


@pytest.mark.parametrize("bucket", ["s3", "sftp"], indirect=True)
def test_a_renewed_lease_is_not_taken_over(bucket):
    # Renewal is Lease's own code over the stores' conditional writes, which every store's tests
    # cover; S3 dates objects on the server, the SFTP store on its coordinator's clock.
    waits = []
    holder = Lease(bucket, "l", "alive", ttl=2.0)
    holder.acquire()
    try:
        asker = Lease(bucket, "l", "asker", ttl=2.0, poll=0.2, on_wait=waits.append)
        got = threading.Event()
        thread = threading.Thread(target=lambda: (asker.acquire(), got.set()), daemon=True)
        thread.start()
        # Unrenewed, the lease would go at ttl plus the servers' 1 s timestamps: 3 s at most.
        assert not got.wait(4.5)  # renewals kept it
        assert waits and waits[-1]["holder"] == "alive"
    finally:
        holder.release()
    assert got.wait(60) and asker.took_over is None and not holder.lost
    asker.release()


def test_a_dead_holders_lease_is_taken_over(bucket):
    dead = Lease(bucket, "l", "dead-trial", ttl=1.0)
    assert bucket.create("l", dead._record())  # created, then never renewed: its holder died
    deadline = time.monotonic() + 120
    taker = Lease(bucket, "l", "taker", ttl=1.0, poll=0.2)
    taker.acquire()
    try:
        assert time.monotonic() < deadline
        assert taker.took_over["holder"] == "dead-trial"
        # The dead holder, were it to come back, finds the lease gone from it.
        assert bucket.replace("l", b"x", "stale-etag") is None
    finally:
        taker.release()


# ----------------------------------------------------------------- stores fsspec opens (SFTP)


def test_an_sftp_store_is_created_and_a_blocked_denied_or_unreachable_one_named(
    sftp_server, monkeypatch
):
    there = sftp.new_folder(sftp_server)
    Bucket(f"{there}/new/experiments").check()  # created, as a local --storage folder is
    assert Bucket(there).listing() == {}
    Bucket(there).write("blocker", b"a file")
    with pytest.raises(BucketError, match="cannot use it .*/blocker is a file, not a folder"):
        Bucket(f"{there}/blocker/x").check()
    monkeypatch.setenv("FSSPEC_SFTP_PASSWORD", "wrong")
    with pytest.raises(BucketError, match="access to the folder .* is denied.*Authentication"):
        Bucket(there).check()
    with pytest.raises(BucketError, match="sftp://tester@127.0.0.1:1/x: cannot reach the storage"):
        Bucket("sftp://tester@127.0.0.1:1/x").check()


def test_ray_tunes_pyarrow_view_of_an_sftp_store_is_safe_under_many_threads(sftp_server, tmp_path):
    # What Ray Tune does with its state and a trial's files: pyarrow copies a folder with
    # several threads at once. One SFTP session shared between them deadlocked.
    import pyarrow.fs

    bucket = Bucket(sftp.new_folder(sftp_server))
    source = tmp_path / "trial"
    for index in range(24):
        (source / f"sub-{index % 3}").mkdir(parents=True, exist_ok=True)
        (source / f"sub-{index % 3}" / f"file-{index}").write_bytes(bytes([index]) * 100_000)
    filesystem, path = bucket.pyarrow_filesystem()
    done, failed = threading.Event(), []

    def copy() -> None:
        try:
            pyarrow.fs.copy_files(
                str(source),
                f"{path}/deep/trial",
                destination_filesystem=filesystem,
                use_threads=True,
            )
        except Exception as error:
            failed.append(error)
        done.set()

    threading.Thread(target=copy, daemon=True).start()
    assert done.wait(300), "pyarrow's threaded copy into the SFTP store did not finish"
    assert not failed, failed
    listing = bucket.listing("deep/trial")
    assert len(listing) == 24 and {item.size for item in listing.values()} == {100_000}

    # A stream opened in one thread and closed in another, while the first goes on using the
    # store: what pyarrow's threads do, and what deadlocked a shared SFTP session.
    stream = filesystem.open_output_stream(f"{path}/state/experiment_state.json")
    stream.write(b"{}" * 50_000)
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    for _ in range(20):
        filesystem.get_file_info(f"{path}/deep/trial/sub-0/file-0")
    closer.join(timeout=300)
    assert not closer.is_alive(), "closing the stream in another thread did not finish"
    with filesystem.open_input_stream(f"{path}/state/experiment_state.json") as reader:
        assert reader.read() == b"{}" * 50_000
    assert "state/experiment_state.json" in bucket.listing("state")  # no temporary left beside
    assert len(bucket.listing("state")) == 1


def test_a_coordinator_dates_a_file_it_never_saw_from_its_first_look(sftp_server):
    # A coordinator that restarted (its node lost) knows no lease: each counts as renewed at the
    # first look, so a dead holder's lease goes one TTL later, never early.
    location = sftp.new_folder(sftp_server)
    Bucket(location).write("l", b'{"holder": "before the restart"}')
    coordinator = Coordinator()
    version, changed, now = coordinator.head(location, "l")
    assert changed == now and version == digest(b'{"holder": "before the restart"}')
    time.sleep(0.05)
    assert coordinator.head(location, "l")[1] == changed  # unchanged since: the same time
    assert coordinator.replace(location, "l", b"new", "stale") is None
    renewed = coordinator.replace(location, "l", b"new", version)
    assert renewed == digest(b"new") and coordinator.head(location, "l")[1] > changed
    assert coordinator.create(location, "l", b"other") is None
    Bucket(location).delete("l")
    assert coordinator.head(location, "l") is None and coordinator.create(location, "l", b"x")
