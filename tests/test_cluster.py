"""cluster.yaml and the `ray job submit` workflow, checked on this machine.

- cluster.yaml passes Ray's own launcher validation (prepare_config + validate_config), offline.
- A local head with Ray token authentication: a data job and a tiny training job submitted through
  `ray job submit` / JobSubmissionClient succeed and their logs are readable; clients without the
  token (HTTP and gRPC) are refused.
- Ray's fake_multinode provider: a training job that needs more workers than the head has makes the
  autoscaler add nodes, and the job completes.

Every cluster here is started by the test with `ray start` in its own process session, its own short
temp dir and free ports, and torn down by killing exactly that session's processes (not `ray stop`,
which kills every Ray process on the machine, other people's clusters included).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
SMALL_YAML = REPO / "examples" / "cluster" / "cluster-small.yaml"
PY = sys.executable
RAY_BIN = str(Path(PY).with_name("ray"))


# --------------------------------------------------------------------------------------------------
# cluster.yaml (no Ray cluster, no cloud credentials)
# --------------------------------------------------------------------------------------------------


def _prepared_cluster_yaml(path: Path = CLUSTER_YAML) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    config = prepare_config(raw)
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_validation() -> None:
    config = _prepared_cluster_yaml()
    assert config["provider"]["type"] == "aws"
    assert set(config["available_node_types"]) == {"head", "gpu_8x", "cpu_32"}
    assert config["head_node_type"] == "head"
    small = _prepared_cluster_yaml(SMALL_YAML)
    assert set(small["available_node_types"]) == {"head", "gpu_8x"} and small["max_workers"] == 1


def _aquila3_plan(cluster: dict[str, Any]) -> dict[str, Any]:
    from aquila_ray.config.recipe import build_recipe_config
    from aquila_ray.pipeline.plan import plan_recipe

    return plan_recipe(build_recipe_config("aquila3-efficientscale", None, ["data_dir=/mnt/shared/data"]),
                       cluster=cluster)


def test_cluster_yaml_runs_the_recipe_as_shipped() -> None:
    """Every stage of the seed's recipe fits cluster.yaml: enough 8-GPU nodes within max_workers, the
    planned memory per GPU within the instance's GPU memory, host memory per node within the node's."""
    config = _prepared_cluster_yaml()
    plan = _aquila3_plan(config)
    fit = plan["cluster_fit"]
    assert {stage: f["fits"] for stage, f in fit.items()} == {"train_small": True, "train_large": True,
                                                              "train_moe": True}, fit
    gpu = config["available_node_types"]["gpu_8x"]
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= plan["train_moe"]["world_size"] == 256
    node = gpu["node_config"]
    assert node["InstanceType"] == "p5.48xlarge" and node["Placement"]["GroupName"]
    cards = node["NetworkInterfaces"]
    assert sorted(c["NetworkCardIndex"] for c in cards) == list(range(32))
    assert {c["InterfaceType"] for c in cards} == {"efa"} and len({c["SubnetId"] for c in cards}) == 1
    assert "," not in config["provider"]["availability_zone"]  # one zone: the placement group's
    # spot GPU nodes, so every stage restarts without limit
    assert node["InstanceMarketOptions"]["MarketType"] == "spot"
    assert [plan[s]["max_failures"] for s in ("train_small", "train_large", "train_moe")] == [-1, -1, -1]


def test_cluster_plan_table_is_the_plan() -> None:
    """docs/cluster.md prints the seed's recipe plan; every number in its table is the plan's."""
    plan = _aquila3_plan(_prepared_cluster_yaml())
    text = (REPO / "docs" / "cluster.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| train_")]
    assert [r.split("|")[1].strip() for r in rows] == ["train_small", "train_large", "train_moe"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        p = plan[cells[0]]
        ck = p["checkpoint"]
        expected = [f"{p['world_size']} ({p['nodes']})", str(p["memory_per_gpu_gib"]["total"]),
                    str(p["host_memory_per_node_gib"]), f"{ck['training_state_gib']} ({ck['per_node_gib']})",
                    str(ck["save_seconds"]), str(ck["model_export_gib"]), str(ck["export_seconds"]),
                    str(p["wall_clock_days"])]
        assert cells[2:] == expected, cells[0]


def test_cluster_fit_names_what_is_missing() -> None:
    config = _prepared_cluster_yaml()
    gpu = config["available_node_types"]["gpu_8x"]
    gpu["max_workers"] = 16
    gpu["node_config"]["InstanceType"] = "p4d.24xlarge"
    fit = _aquila3_plan(config)["cluster_fit"]
    assert not any(f["fits"] for f in fit.values())
    assert "gpu_8x: needs 32 nodes of 8 GPUs for 256 workers, max_workers allows 16" in fit["train_moe"]["problems"]
    assert any(re.match(r"gpu_8x: plans 4\d\.\d+ GiB per GPU, p4d.24xlarge has 40 GiB", p)
               for p in fit["train_small"]["problems"]), fit["train_small"]


def test_cluster_runtime_is_pinned() -> None:
    """Every node installs exact versions: the lock pins each of aquila-ray's runtime requirements (and
    boto3 for the autoscaler) with ==, and setup_commands install the lock, then the wheel without deps."""
    lock = {}
    for line in (REPO / "examples" / "cluster" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    runtime = [r for r in distribution("aquila-ray").requires or [] if "extra ==" not in r]
    assert any(r.startswith("deepspeed") for r in runtime)
    for text in [*runtime, "boto3"]:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{name} is not pinned in requirements.lock"
        assert req.specifier.contains(lock[name]), (name, lock[name], str(req.specifier))
    for path in (CLUSTER_YAML, SMALL_YAML):
        setup = " ".join(yaml.safe_load(path.read_text())["setup_commands"])
        assert "pip install -r ~/aquila-ray-requirements.lock" in setup
        assert "pip install --no-deps ~/aquila-ray-dist/aquila_ray-" in setup


def test_small_cluster_fits_the_demo_gpu_job() -> None:
    from aquila_ray.config.train import build_train_config
    from aquila_ray.plan import cluster_fit, stage_plan

    cfg = build_train_config(REPO / "examples" / "cluster" / "train_demo_gpu.yaml")
    s = cfg.scaling
    plan = stage_plan(cfg.model, cfg.steps * cfg.global_batch_tokens, s.num_workers, s.zero_stage, s.expert_parallel,
                      cfg.micro_batch_size, 256, cfg.activation_checkpointing)
    fit = cluster_fit(_prepared_cluster_yaml(SMALL_YAML), {"demo": plan})["demo"]
    assert fit == {"fits": True, "node_types": ["gpu_8x"], "problems": []}


def test_cluster_yaml_node_types() -> None:
    config = _prepared_cluster_yaml()
    types = config["available_node_types"]
    # Head: nothing that needs a CPU or GPU can be scheduled there.
    assert types["head"]["resources"]["CPU"] == 0 and types["head"]["resources"]["GPU"] == 0
    assert types["head"]["max_workers"] == 0
    # Every type spells out its resources (auto-fill would need AWS credentials).
    for name, t in types.items():
        assert {"CPU", "GPU", "memory"} <= set(t["resources"]), name
    gpu, cpu = types["gpu_8x"], types["cpu_32"]
    assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert cpu["resources"]["GPU"] == 0 and cpu["resources"]["CPU"] > 0 and cpu["min_workers"] == 0
    assert gpu["max_workers"] + cpu["max_workers"] <= config["max_workers"]


def test_cluster_yaml_security() -> None:
    config = _prepared_cluster_yaml()
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    # Dashboard / job API only on loopback, token auth on every node.
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--num-cpus=0" in head_start and "--num-gpus=0" in head_start
    # The token travels as a file from the user's machine, never written in the YAML.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Only SSH is opened from outside, and not to the whole internet.
    perms = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in perms] == [(22, 22)]
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in perms for r in p["IpRanges"])
    # No credentials anywhere in the file.
    text = CLUSTER_YAML.read_text()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"WANDB_API_KEY\s*[:=]\s*\S",
                    r"RAY_AUTH_TOKEN\s*[:=]"):
        assert not re.search(pattern, text, re.IGNORECASE), pattern
    # The project is installed on every node (setup_commands run on head and workers).
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        assert any("pip install" in c and "aquila" in c for c in commands)


# The data seq_len each example is written for (the prepare_data commands in its header).
_EXAMPLE_SEQ_LEN = {"train_7b_stage1.yaml": 4096, "train_tiny_cpu.yaml": 32, "train_demo_gpu.yaml": 256}


def test_cluster_example_train_configs_build() -> None:
    """The example job configs that docs/cluster.md submits are valid TrainConfigs whose batch divides
    into every worker count they allow (the trainer's own check, run offline)."""
    from aquila_ray.config.train import build_train_config

    paths = sorted((REPO / "examples" / "cluster").glob("train_*.yaml"))
    assert {p.name for p in paths} == set(_EXAMPLE_SEQ_LEN)
    for path in paths:
        cfg = build_train_config(path)
        assert cfg.data_dir.startswith("/mnt/shared/"), path.name  # EFS: the path every node sees
        assert cfg.batch_sequences(_EXAMPLE_SEQ_LEN[path.name]) > 0


# --------------------------------------------------------------------------------------------------
# Local clusters started by the tests
# --------------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free right now (bound then released)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _worker_port_range(width: int = 200) -> tuple[int, int]:
    """A window of ports for Ray's worker processes, all free now."""
    rng = secrets.SystemRandom()
    for _ in range(50):
        lo = rng.randrange(20000, 30000 - width)
        try:
            socks = []
            for p in range(lo, lo + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("", p))
            return lo, lo + width - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free window of worker ports")


def _cluster_pids(sid: int, root: Path) -> list[int]:
    """Processes of one test cluster: its `ray start` session, plus job drivers (which Ray starts in a
    session of their own) found by their working directory or command line under the cluster's root."""
    import psutil

    me, prefix, pids = os.getpid(), str(root), []
    for proc in psutil.process_iter():
        try:
            if proc.pid == me:
                continue
            if os.getsid(proc.pid) == sid or prefix in " ".join(proc.cmdline()) or proc.cwd().startswith(prefix):
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


def _kill_cluster(sid: int, root: Path, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, exactly the processes of one test cluster (never `ray stop`: it kills every
    Ray process on the machine, other people's clusters included)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in _cluster_pids(sid, root):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while _cluster_pids(sid, root) and time.time() < deadline:
            time.sleep(0.2)
        if not _cluster_pids(sid, root):
            return


def _client_env(token: str | None, home: Path) -> dict[str, str]:
    """Environment for a client process: with the token, or with no token source at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env["HOME"] = str(home)  # no ~/.ray/auth_token from whoever runs the tests
    env["WANDB_MODE"] = "disabled"
    if token is None:
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = token
    return env


@dataclass
class LocalHead:
    """A `ray start --head` cluster owned by one test class (class-scoped fixture)."""

    root: Path
    token: str | None
    gcs_address: str = ""
    dashboard_url: str = ""
    sid: int = 0
    home: Path = field(default_factory=Path)

    def env(self, with_token: bool = True) -> dict[str, str]:
        return _client_env(self.token if with_token else None, self.home)

    def ray(self, *args: str, with_token: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAY_BIN, *args], cwd=REPO, env=self.env(with_token), text=True,
                              capture_output=True, timeout=timeout)


def _start_head(root: Path, token: str | None, num_cpus: int, extra_env: dict[str, str] | None = None,
                extra_args: tuple[str, ...] = (), gcs_port: int | None = None) -> LocalHead:
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    head = LocalHead(root=root, token=token, home=home)
    gcs, dash, agent, agent_grpc, client, metrics, rt_env = _free_ports(7)
    gcs = gcs_port or gcs
    lo, hi = _worker_port_range()
    env = head.env(with_token=token is not None)
    env.update(extra_env or {})
    cmd = [RAY_BIN, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
           f"--min-worker-port={lo}", f"--max-worker-port={hi}", f"--num-cpus={num_cpus}", "--num-gpus=0",
           f"--temp-dir={root / 'r'}", "--object-store-memory=200000000", "--disable-usage-stats", *extra_args]
    # A new session: every Ray process of this cluster (and the fake nodes the autoscaler starts) is in it.
    proc = subprocess.Popen(cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    head.sid = proc.pid
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_cluster(head.sid, head.root)
        raise
    if proc.returncode != 0:
        _kill_cluster(head.sid, head.root)
        raise RuntimeError(f"ray start --head failed ({proc.returncode}):\n{out[-3000:]}")
    m = re.search(r"ray start --address='([^']+)'", out)
    head.gcs_address = m.group(1) if m else f"127.0.0.1:{gcs}"
    head.dashboard_url = f"http://127.0.0.1:{dash}"
    return head


@pytest.fixture(scope="module")
def short_root() -> Iterator[Path]:
    # Ray puts unix sockets under --temp-dir; keep the path short (socket paths are limited to 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="ar", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="class")
def auth_head(short_root: Path) -> Iterator[LocalHead]:
    head = _start_head(short_root / "auth", token=secrets.token_hex(24), num_cpus=3)
    try:
        yield head
    finally:
        _kill_cluster(head.sid, head.root)


def _job_status(head: LocalHead, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status.value)
        time.sleep(1.0)
    client.stop_job(job_id)
    return "TIMEOUT"


# --------------------------------------------------------------------------------------------------
# Token authentication
# --------------------------------------------------------------------------------------------------


@pytest.mark.ray
class TestTokenAuthJobs:
    """One head with token auth for these tests, stopped before the next class starts its cluster."""

    def test_client_without_token_is_refused(self, auth_head: LocalHead) -> None:
        import requests
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        # Raw HTTP: no token -> 401, wrong token -> 403, right token -> 200.
        url = f"{auth_head.dashboard_url}/api/jobs/"
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=10).status_code == 403
        assert requests.get(url, headers={"Authorization": f"Bearer {auth_head.token}"}, timeout=10).status_code == 200

        # The SDK: a wrong token raises Ray's AuthenticationError.
        with pytest.raises(AuthenticationError, match="invalid or incorrect"):
            JobSubmissionClient(auth_head.dashboard_url, headers={"Authorization": "Bearer not-the-token"}).list_jobs()

        # The CLI with no token anywhere (fresh HOME, no RAY_AUTH_TOKEN).
        r = auth_head.ray("job", "submit", "--address", auth_head.dashboard_url, "--", "echo", "hi",
                          with_token=False, timeout=60)
        assert r.returncode != 0
        assert "Unauthorized: Missing authentication token" in r.stdout + r.stderr

        # gRPC: a process without the token cannot talk to the GCS (what `ray.init(address=...)` does first;
        # ray.init itself retries for ~20 s before giving up with the same error).
        probe = ("from ray._raylet import GcsClient\n"
                 f"GcsClient(address='{auth_head.gcs_address}').internal_kv_get(b'x', None)\nprint('JOINED')")
        r = subprocess.run([PY, "-c", probe], env=auth_head.env(with_token=False), text=True, capture_output=True,
                           timeout=90)
        assert r.returncode != 0 and "JOINED" not in r.stdout, r.stdout[-2000:]
        assert "AuthenticationError" in r.stderr and "InvalidAuthToken" in r.stderr, r.stderr[-2000:]
        r = subprocess.run([PY, "-c", probe], env=auth_head.env(), text=True, capture_output=True, timeout=90)
        assert r.returncode == 0 and "JOINED" in r.stdout, r.stderr[-2000:]

    def test_submit_data_job(self, data_job: tuple[LocalHead, Path, str]) -> None:
        """`ray job submit --working-dir .` of the real data job on the bundled sample corpus."""
        auth_head, out, job_id = data_job
        logs = auth_head.ray("job", "logs", "--address", auth_head.dashboard_url, job_id, timeout=60)
        assert logs.returncode == 0, logs.stderr[-2000:]
        summary = json.loads(logs.stdout[logs.stdout.index("{\n"):logs.stdout.rindex("}") + 1])
        assert summary["output"] == str(out) and summary["total"]["kept"] > 0
        from aquila_ray.data.shards import read_manifest

        manifest = read_manifest(out)  # checks every listed shard exists
        assert manifest.seq_len == 32 and manifest.splits["train"].num_sequences > 0

    def test_submit_tiny_training_job(self, data_job: tuple[LocalHead, Path, str], short_root: Path) -> None:
        """JobSubmissionClient submits the real training job on the data job's token shards."""
        from ray.job_submission import JobSubmissionClient

        auth_head, data_dir, _ = data_job
        config = short_root / "train.yaml"
        config.write_text(yaml.safe_dump({
            "model": "tiny", "data_dir": str(data_dir), "steps": 2, "global_batch_tokens": 256,
            "micro_batch_size": 4, "checkpoint": {"every": 2}, "eval_every": 0,
            "scaling": {"num_workers": 1, "max_failures": 0}, "wandb": {"mode": "disabled"},
        }))
        storage = short_root / "runs"
        client = JobSubmissionClient(auth_head.dashboard_url, headers={"Authorization": f"Bearer {auth_head.token}"})
        job_id = client.submit_job(
            entrypoint=f"python -m jobs.train --config {config} --storage-path {storage} --run-name tiny",
            runtime_env={"working_dir": str(REPO), "env_vars": {"WANDB_MODE": "disabled"}},
        )
        status = _job_status(auth_head, job_id, timeout_s=240)
        logs = client.get_job_logs(job_id)
        assert status == "SUCCEEDED", logs[-4000:]
        summary = json.loads(logs[logs.rindex('{\n  "checkpoint"'):logs.rindex("}") + 1])
        assert summary["last_metrics"]["step"] == 2 and summary["checkpoint"]
        assert Path(summary["checkpoint"]).is_dir()
        status_cli = auth_head.ray("job", "status", "--address", auth_head.dashboard_url, job_id, timeout=60)
        assert status_cli.returncode == 0 and "succeeded" in (status_cli.stdout + status_cli.stderr).lower()


@pytest.fixture(scope="class")
def data_job(auth_head: LocalHead, short_root: Path) -> tuple[LocalHead, Path, str]:
    """The data job, submitted once with the CLI (`ray job submit --working-dir .`) and waited for."""
    out = short_root / "data"
    job_id = f"prepare-data-{secrets.token_hex(3)}"
    # vocab 512 matches the tiny model preset, so the training job can use these shards as they are.
    r = auth_head.ray("job", "submit", "--address", auth_head.dashboard_url, "--working-dir", ".",
                      "--submission-id", job_id, "--",
                      "python", "-m", "jobs.prepare_data", "--output", str(out),
                      "--set", "tokenizer.vocab_size=512", "--set", "pack.seq_len=32",
                      # near dedup's shuffles add half a minute and are tested in tests/test_data_pipeline.py
                      "--set", "dedup.fuzzy=false", "--set", "shuffle_partitions=2", timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert f"Job '{job_id}' succeeded" in r.stdout + r.stderr
    return auth_head, out, job_id


# --------------------------------------------------------------------------------------------------
# Autoscaling with Ray's fake_multinode provider
# --------------------------------------------------------------------------------------------------

# Stands in for the GPU worker type of cluster.yaml: a custom resource instead of GPU (the fake provider
# would not give a fake node real GPUs), one slot per node, min 0. The head has none, so only added
# nodes can host training workers.
_FAKE_CLUSTER: dict[str, Any] = {
    "cluster_name": "fake",
    "max_workers": 2,
    "upscaling_speed": 2.0,
    "idle_timeout_minutes": 1,
    "docker": {},
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {"ssh_user": "ubuntu"},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "train_worker": {"resources": {"CPU": 1, "train_slot": 1}, "node_config": {}, "min_workers": 0,
                         "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    **{k: {} for k in ("file_mounts",)},
    **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                       "setup_commands", "head_setup_commands", "worker_setup_commands",
                       "head_start_ray_commands", "worker_start_ray_commands")},
    "file_mounts_sync_continuously": False,
}

# A Ray Train job whose workers each need a `train_slot` (as real jobs need GPUs): 2 workers, 0 on the head.
_TRAIN_JOB = '''
import json, sys
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def loop(config):
    total = torch.ones(1)
    dist.all_reduce(total)  # gloo across the added nodes
    rank = ray.train.get_context().get_world_rank()
    node = ray.get_runtime_context().get_node_id()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"node": node, "world": int(total.item())}))
    ray.train.report({"world": int(total.item())})


out = sys.argv[1]
trainer = TorchTrainer(
    loop, train_loop_config={"out": out},
    scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1, "train_slot": 1}),
    run_config=RunConfig(name="fake-autoscale", storage_path=out),
)
result = trainer.fit()  # raises if training failed
print("TRAIN_RESULT", result.error)
'''


def _fake_cluster(root: Path, template: dict[str, Any], head_cpus: int) -> Iterator[LocalHead]:
    """A head started with RAY_FAKE_CLUSTER=1 and an autoscaling config for Ray's fake_multinode provider:
    every node it adds is a real raylet on this machine, in the head's process session."""
    from ray._private.services import get_node_ip_address

    root.mkdir()
    gcs_port = _free_ports(1)[0]
    config = json.loads(json.dumps(template))
    config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{gcs_port}"
    config_path = root / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head = _start_head(root, token=secrets.token_hex(24), num_cpus=head_cpus, extra_env={"RAY_FAKE_CLUSTER": "1"},
                       extra_args=(f"--autoscaling-config={config_path}",), gcs_port=gcs_port)
    try:
        assert head.gcs_address == config["provider"]["gcs_address"]
        yield head
    finally:
        _kill_cluster(head.sid, head.root)


@pytest.fixture(scope="class")
def fake_cluster(short_root: Path) -> Iterator[LocalHead]:
    yield from _fake_cluster(short_root / "fake", _FAKE_CLUSTER, head_cpus=1)


@pytest.mark.ray
class TestFakeMultinodeAutoscaling:
    """A job whose Ray Train workers fit only on nodes the autoscaler has yet to add."""

    def test_autoscaler_adds_nodes_for_training_job(self, fake_cluster: LocalHead) -> None:
        from ray.job_submission import JobSubmissionClient

        workdir = fake_cluster.root / "job"
        workdir.mkdir()
        (workdir / "train_job.py").write_text(_TRAIN_JOB)
        out = fake_cluster.root / "out"
        out.mkdir()
        client = JobSubmissionClient(fake_cluster.dashboard_url,
                                     headers={"Authorization": f"Bearer {fake_cluster.token}"})
        nodes_before = _alive_nodes(fake_cluster)
        assert nodes_before == 1  # the head only: min_workers 0
        job_id = client.submit_job(entrypoint=f"python train_job.py {out}", runtime_env={"working_dir": str(workdir)})
        status = _job_status(fake_cluster, job_id, timeout_s=120)
        logs = client.get_job_logs(job_id)
        assert status == "SUCCEEDED", logs[-4000:]
        assert "Adding" in logs and "train_worker" in logs  # the autoscaler's own event, streamed to the driver
        assert "TRAIN_RESULT" in logs
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert all(r["world"] == 2 for r in ranks)
        head_node = _head_node_id(fake_cluster)
        assert len({r["node"] for r in ranks}) == 2 and head_node not in {r["node"] for r in ranks}
        assert _alive_nodes(fake_cluster) == 3


def _cluster_query(head: LocalHead, code: str) -> Any:
    script = f"import json, ray\nray.init(address='{head.gcs_address}', log_to_driver=False)\n{code}"
    r = subprocess.run([PY, "-c", script], env=head.env(), text=True, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _alive_nodes(head: LocalHead) -> int:
    return int(_cluster_query(head, "print(sum(n['Alive'] for n in ray.nodes()))"))


def _head_node_id(head: LocalHead) -> str:
    code = "print(json.dumps([n['NodeID'] for n in ray.nodes() if 'node:__internal_head__' in n['Resources']][0]))"
    return str(_cluster_query(head, code))


# The cluster.yaml shape in miniature: a head with 0 CPUs (nothing trains there) and a CPU worker type
# with min 0; the real training job, elastic, must get its workers from nodes the autoscaler adds.
_FAKE_CLUSTER_ZERO_CPU_HEAD: dict[str, Any] = {
    **_FAKE_CLUSTER,
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
}


@pytest.fixture(scope="class")
def fake_cluster_zero_cpu_head(short_root: Path) -> Iterator[LocalHead]:
    yield from _fake_cluster(short_root / "fake0", _FAKE_CLUSTER_ZERO_CPU_HEAD, head_cpus=0)


@pytest.mark.ray
@pytest.mark.slow
class TestElasticTrainingJobAutoscaling:
    """`jobs.train` with `scaling: {num_workers: 2, min_workers: 1}` on a 0-CPU head (~1.5 min)."""

    def test_elastic_train_job_gets_nodes_from_autoscaler(self, fake_cluster_zero_cpu_head: LocalHead) -> None:
        from ray.job_submission import JobSubmissionClient

        from aquila_ray.data.synthetic import write_synthetic_shards
        from aquila_ray.train.metrics import read_metrics

        head = fake_cluster_zero_cpu_head
        data = write_synthetic_shards(head.root / "data")
        config = head.root / "train.yaml"
        config.write_text(yaml.safe_dump({
            "model": "tiny", "data_dir": str(data), "steps": 4, "global_batch_tokens": 256,
            "micro_batch_size": 4, "checkpoint": {"every": 2}, "eval_every": 0,
            "scaling": {"num_workers": 2, "min_workers": 1, "max_failures": 2}, "wandb": {"mode": "disabled"},
        }))
        assert _alive_nodes(head) == 1
        client = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})
        job_id = client.submit_job(
            entrypoint=f"python -m jobs.train --config {config} --storage-path {head.root / 'runs'} --run-name el",
            runtime_env={"working_dir": str(REPO), "env_vars": {"WANDB_MODE": "disabled"}},
        )
        status = _job_status(head, job_id, timeout_s=300)
        logs = client.get_job_logs(job_id)
        assert status == "SUCCEEDED", logs[-4000:]
        assert "Adding" in logs and "cpu_worker" in logs
        rows = read_metrics(head.root / "runs" / "el" / "metrics.jsonl")
        assert rows[-1]["step"] == 4 and {r["world_size"] for r in rows} <= {1, 2}
        assert _alive_nodes(head) >= 2  # the head alone has no CPU: every worker ran on an added node
