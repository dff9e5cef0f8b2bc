"""cluster.yaml, the Ray cluster launcher file, and the variants kept in its comments (on
premises, AWS with an S3 bucket, Google Cloud with a GCS bucket, Azure with a Blob Storage
container).

All are checked offline against the JSON schema that ships inside the ray package
(`ray/autoscaler/ray-schema.json`, what `ray up` validates against) and by the launcher's own
preparation step. Nothing starts Ray and nothing reaches the network.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_FILE = REPO / "cluster.yaml"
# The on-premises variant is the commented block between these two lines of cluster.yaml.
LOCAL_START = "# --- on-premises variant ---"
LOCAL_END = "# --- end ---"
# The bucket variant (experiments in S3, no EFS) is the commented block between these two.
BUCKET_START = "# --- bucket variant ---"
BUCKET_END = "# --- end of bucket variant ---"
# The Google Cloud variant (experiments in GCS) is the commented block between these two.
GCP_START = "# --- gcp variant ---"
GCP_END = "# --- end of gcp variant ---"
# The Azure variant (experiments in Blob Storage) is the commented block between these two.
AZURE_START = "# --- azure variant ---"
AZURE_END = "# --- end of azure variant ---"

LAUNCH = re.compile(
    r"diffcom sweep launch (?P<study>\S+) --address auto --storage (?P<storage>\S+)"
)


def ray_schema_path() -> Path:
    spec = importlib.util.find_spec("ray")  # finds the package without importing it
    assert spec is not None and spec.origin, "ray is not installed"
    path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"no launcher schema at {path}"
    return path


def comment_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.lstrip().startswith("#")]


def local_variant_text(text: str, start_line: str = LOCAL_START, end_line: str = LOCAL_END) -> str:
    """The on-premises block (or another variant's, between ``start_line`` and ``end_line``) with
    one comment marker ('#' and an optional space) removed per line."""
    lines = text.splitlines()
    assert lines.count(start_line) == 1, f"expected one line {start_line!r}"
    assert lines.count(end_line) == 1, f"expected one line {end_line!r}"
    start, end = lines.index(start_line), lines.index(end_line)
    assert start < end
    block = lines[start + 1 : end]
    assert block, "the on-premises block is empty"
    uncommented = [line for line in block if not line.startswith("#")]
    assert not uncommented, f"lines inside the on-premises block must be comments: {uncommented}"
    return "\n".join(re.sub(r"^# ?", "", line) for line in block) + "\n"


def all_commands(config: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands"]
    keys += ["worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    return [command for key in keys for command in config.get(key, [])]


def pinned_ray_version() -> str:
    pins = (REPO / "constraints.txt").read_text()
    match = re.search(r"^ray==(\S+)", pins, flags=re.MULTILINE)
    assert match, "constraints.txt pins no ray version"
    return match.group(1)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(ray_schema_path().read_text())


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_FILE.read_text()


@pytest.fixture
def config(text) -> dict:
    return yaml.safe_load(text)


@pytest.fixture
def local_config(text) -> dict:
    return yaml.safe_load(local_variant_text(text))


@pytest.fixture
def bucket_config(text) -> dict:
    return yaml.safe_load(local_variant_text(text, BUCKET_START, BUCKET_END))


@pytest.fixture
def gcp_config(text) -> dict:
    return yaml.safe_load(local_variant_text(text, GCP_START, GCP_END))


@pytest.fixture
def azure_config(text) -> dict:
    return yaml.safe_load(local_variant_text(text, AZURE_START, AZURE_END))


@pytest.fixture(params=["aws", "on-premises", "bucket", "gcp", "azure"])
def any_config(request, text) -> dict:
    if request.param == "bucket":
        return yaml.safe_load(local_variant_text(text, BUCKET_START, BUCKET_END))
    if request.param == "gcp":
        return yaml.safe_load(local_variant_text(text, GCP_START, GCP_END))
    if request.param == "azure":
        return yaml.safe_load(local_variant_text(text, AZURE_START, AZURE_END))
    return yaml.safe_load(text if request.param == "aws" else local_variant_text(text))


def test_cluster_file_is_valid_for_the_ray_schema(config, schema):
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"  # the checks below for the AWS variant apply


def test_on_premises_variant_is_valid_for_the_ray_schema(local_config, schema):
    jsonschema.validate(local_config, schema)
    provider = local_config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"]
    assert provider["worker_ips"] and all(isinstance(ip, str) for ip in provider["worker_ips"])
    # The local provider builds its single node type itself and refuses a config that has one.
    assert "available_node_types" not in local_config
    assert "head_node_type" not in local_config


@pytest.mark.parametrize(
    ("where", "key", "misspelt"),
    [
        ("aws", "setup_commands", "setup_comands"),
        ("aws", "max_workers", "max_worker"),
        ("node type", "min_workers", "min_worker"),
        ("on-premises", "file_mounts", "file_mount"),
    ],
)
def test_a_misspelt_key_fails_validation(config, local_config, schema, where, key, misspelt):
    """Proves the schema check bites: the top level and node types allow no unknown keys."""
    document = copy.deepcopy(local_config if where == "on-premises" else config)
    jsonschema.validate(document, schema)
    target = document
    if where == "node type":
        target = next(t for t in document["available_node_types"].values() if key in t)
    target[misspelt] = target.pop(key)
    with pytest.raises(jsonschema.ValidationError, match=misspelt):
        jsonschema.validate(document, schema)


def test_ray_launcher_prepares_and_accepts_both_configs(config, local_config):
    """The checks `ray up` runs before it contacts a provider: defaults merged, node types
    filled in, head type known, sum of min_workers within max_workers (Ray pinned in
    constraints.txt; these helpers are not public API)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    for raw in (config, local_config):
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
        assert prepared["head_node_type"] in prepared["available_node_types"]


def test_there_is_a_gpu_worker_type_and_a_cpu_head(config):
    node_types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in node_types
    assert node_types[head]["resources"].get("GPU", 0) == 0, "the head node type is a CPU type"
    gpu_types = {
        name: node_type
        for name, node_type in node_types.items()
        if name != head and node_type["resources"].get("GPU", 0) >= 1
    }
    assert gpu_types, "no worker node type advertises a GPU"
    for name, node_type in gpu_types.items():
        assert node_type["resources"].get("CPU", 0) >= 1, name
        assert node_type["node_config"].get("InstanceType"), name
        assert 0 <= node_type.get("min_workers", 0) <= node_type["max_workers"], name
        assert 1 <= node_type["max_workers"] <= config["max_workers"], name


def project_mount(config: dict) -> str:
    """The remote path that file_mounts fills with this repository (run from its root)."""
    remote = [
        remote
        for remote, local in config.get("file_mounts", {}).items()
        if (REPO / Path(local).expanduser()).resolve() == REPO
    ]
    assert len(remote) == 1, (
        f"file_mounts must sync the project folder once: {config['file_mounts']}"
    )
    return remote[0]


def test_file_mounts_sync_the_project(any_config):
    remote = project_mount(any_config)
    assert remote.startswith(("/", "~/"))
    # The local .venv holds the CPU build of torch: it must never reach a node.
    assert ".venv" in any_config.get("rsync_exclude", [])
    assert ".gitignore" in any_config.get("rsync_filter", [])


def test_setup_commands_install_the_synced_project(any_config):
    remote = project_mount(any_config)
    installs = [
        command
        for command in any_config["setup_commands"]
        if "pip install" in command and re.search(rf"-e {re.escape(remote)}/?(\s|$)", command)
    ]
    assert installs, f"no setup command runs `pip install -e {remote}`"
    for command in all_commands(any_config):
        # GPU nodes keep the CUDA torch they have: the CPU constraints file never applies there.
        assert "constraints" not in command, command
        for pip_args in command.split("pip install")[1:]:
            assert not re.search(r"\s(-c|--constraint)[\s=]", pip_args), command
    ray_pins = [
        match.group(1)
        for command in any_config["setup_commands"]
        for match in re.finditer(r"ray\[[^\]]*\]==(\S+?)[\"'\s]", command + " ")
    ]
    assert ray_pins == [pinned_ray_version()], "nodes must run the Ray that constraints.txt pins"


def test_aws_head_installs_boto3_for_the_autoscaler(config):
    assert any("boto3" in command for command in config["head_setup_commands"])


def test_comments_launch_a_study_on_the_mounted_efs_storage(text, config):
    mounts = [
        match.group(1)
        for command in all_commands(config)
        if (match := re.search(r"mount -t nfs4 .*\.efs\.[^ ]+:/ (/\S+)", command))
    ]
    assert mounts, "the AWS variant mounts no EFS file system"
    launches = [m for line in comment_lines(text) if (m := LAUNCH.search(line))]
    assert launches
    on_efs = [m for m in launches if m["storage"].startswith(mounts[0].rstrip("/") + "/")]
    assert on_efs, f"no `diffcom sweep launch ... --storage` under the EFS mount {mounts}"
    assert all((REPO / m["study"]).is_file() for m in on_efs)


def test_comments_launch_the_on_premises_variant_on_nfs(text, local_config):
    mounts = [
        match.group(1)
        for command in all_commands(local_config)
        if (match := re.search(r"mount -t nfs\S* \S+ (/\S+)", command))
    ]
    assert mounts, "the on-premises variant mounts no NFS export"
    launches = [m for line in comment_lines(text) if (m := LAUNCH.search(line))]
    on_nfs = [
        m
        for m in launches
        if any(
            m["storage"] == mount or m["storage"].startswith(mount.rstrip("/") + "/")
            for mount in mounts
        )
    ]
    assert on_nfs, f"no `diffcom sweep launch ... --storage` under the NFS mount {mounts}"
    assert all((REPO / m["study"]).is_file() for m in on_nfs)


def check_bucket_variant(
    text: str, config: dict, schema: dict, provider: str, scheme: str, top: str
) -> list[dict]:
    """What every variant with its experiments in an object store shares: valid for the schema and
    the launcher, no file system mounted (the bucket is the shared storage), a comment launching a
    study into ``scheme`` (``top``: the bucket's placeholder there). Returns the worker types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    from runstore.bucket import BucketUri

    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == provider
    assert not [c for c in all_commands(config) if "mount" in c]
    launches = [m for line in comment_lines(text) if (m := LAUNCH.search(line))]
    in_store = [m for m in launches if m["storage"].startswith(scheme)]
    assert in_store, (
        f"no `diffcom sweep launch ... --storage {scheme}...` for the {provider} variant"
    )
    assert all((REPO / m["study"]).is_file() for m in in_store)
    assert all(BucketUri.parse(m["storage"].replace(top, "my-store")) for m in in_store)
    head = config["head_node_type"]
    workers = [t for name, t in config["available_node_types"].items() if name != head]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    return workers


def test_bucket_variant_is_valid_and_launches_into_a_bucket_the_workers_can_reach(
    text, bucket_config, schema
):
    workers = check_bucket_variant(text, bucket_config, schema, "aws", "s3://", "BUCKET")
    assert all(
        t["node_config"]["IamInstanceProfile"]["Arn"].endswith("instance-profile/ray-autoscaler-v1")
        for t in workers
    ), "trials run on the workers, which need the bucket's credentials"


def test_gcp_variant_is_valid_and_launches_into_a_gcs_bucket_the_workers_can_write(
    text, gcp_config, schema
):
    workers = check_bucket_variant(text, gcp_config, schema, "gcp", "gs://", "BUCKET")
    assert gcp_config["available_node_types"][gcp_config["head_node_type"]]["resources"] == {
        "CPU": 0
    }
    for worker in workers:
        node = worker["node_config"]
        # The account `ray up` makes for the head (roles/storage.objectAdmin among its roles),
        # with a scope that lets those roles apply: the trials write the bucket.
        (account,) = node["serviceAccounts"]
        assert account["email"] == "ray-autoscaler-sa-v1@PROJECT_ID.iam.gserviceaccount.com"
        assert account["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"]
        assert {"onHostMaintenance": "TERMINATE"} in node["scheduling"]  # a GPU VM cannot migrate
        assert {"key": "install-nvidia-driver", "value": "True"} in node["metadata"]["items"]
    assert any("google-api-python-client" in c for c in gcp_config["head_setup_commands"])


def test_azure_variant_is_valid_and_gives_every_node_the_account_and_its_identity(
    text, azure_config, schema
):
    check_bucket_variant(text, azure_config, schema, "azure", "az://", "CONTAINER")
    provider = azure_config["provider"]
    # One identity made beforehand with the storage data role, shared by every node.
    assert provider["msi_name"] and provider["msi_resource_group"]
    assert "Storage Blob Data Contributor" in text
    # What runstore.bucket.AzureAccount reads, where `ray start` (bash -i) and the driver read it.
    exports = [c for c in azure_config["setup_commands"] if "~/.bashrc" in c and "AZURE_" in c]
    assert exports and all(
        name in exports[0] for name in ("AZURE_STORAGE_ACCOUNT_NAME=", "AZURE_CLIENT_ID=")
    )
