"""The Ray cluster launcher configs: cluster/aws.yaml against Ray's own schema, aws.yaml and onprem.yaml
running the same cluster/node.sh commands, and onprem.yaml really run: `ray up` over ssh to this
machine (installing the wheel from `make wheel` into a fresh venv), `ray job submit` of a debug
pretraining job, `ray down`."""
from __future__ import annotations

import copy
import getpass
import hashlib
import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)

CLUSTER = REPO / "cluster"
AWS, ONPREM = CLUSTER / "aws.yaml", CLUSTER / "onprem.yaml"
COMMANDS = ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
MOUNTS = ("~/t3d/node.sh", "~/t3d/dist", "~/.ray/auth_token")


def _launcher_yamls() -> list[Path]:
    return [p for p in sorted(CLUSTER.glob("*.yaml")) if "provider" in (yaml.safe_load(p.read_text()) or {})]


def _validate(cfg: dict) -> dict:
    """What `ray up` does before any cloud call: fill Ray's defaults, then check Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cfg))
    validate_config(cfg)
    return cfg


def test_aws_yaml_validates():
    import jsonschema

    cfg = yaml.safe_load(AWS.read_text())
    full = _validate(cfg)
    assert full["provider"]["type"] == "aws"
    assert "gpu_worker" in full["available_node_types"] and full["head_node_type"] == "head"
    for name, nt in full["available_node_types"].items():
        ami = nt["node_config"]["ImageId"]
        assert ami.startswith("resolve:ssm:/aws/service/deeplearning/") or re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), \
            f"{AWS}: available_node_types.{name}.node_config.ImageId = {ami!r}"
    # Ray's AWS default head_setup_commands pip-install boto3 into the system python; the head's
    # autoscaler runs in node.sh's venv, where boto3 must come with t3d's own dependencies
    assert full["head_setup_commands"] == cfg["setup_commands"], f"{AWS}: head_setup_commands"
    deps = importlib.metadata.requires("t3d") or []
    assert any(re.match(r"boto3\b", d) for d in deps), "pyproject.toml: boto3 (the AWS autoscaler's) not a dependency"
    # and the validation can fail: an unknown key, a wrong type
    typo = copy.deepcopy(cfg)
    typo["setup_comands"] = typo.pop("setup_commands")
    wrong_type = copy.deepcopy(cfg)
    wrong_type["auth"]["ssh_user"] = 22
    for bad, what in ((typo, "setup_comands"), (wrong_type, "22")):
        with pytest.raises(jsonschema.ValidationError, match=what):
            _validate(bad)


def test_launcher_configs_share_commands():
    aws, onprem = (yaml.safe_load(p.read_text()) for p in (AWS, ONPREM))
    for key in COMMANDS:
        assert aws[key] and aws[key] == onprem[key], f"{key}: {AWS.name} and {ONPREM.name} differ"
        assert all("node.sh" in c for c in aws[key]), f"{AWS}: {key} does not go through cluster/node.sh"
    assert onprem["provider"]["type"] == "local" and onprem["provider"]["head_ip"] == "127.0.0.1"
    _validate(onprem)
    token_file = Path.home() / ".ray" / "auth_token"
    token = token_file.read_text().strip() if token_file.is_file() else None
    assert {AWS, ONPREM} <= set(_launcher_yamls())
    for path in _launcher_yamls():
        text = path.read_text()
        cfg = yaml.safe_load(text)
        assert "==" not in text, f"{path}: a version pin; versions come from dist/constraints.txt"
        assert set(MOUNTS) <= set(cfg["file_mounts"]), f"{path}: file_mounts lack {set(MOUNTS) - set(cfg['file_mounts'])}"
        assert "RAY_AUTH_TOKEN=" not in text and not re.search(r"\b[0-9a-f]{32,}\b", text), f"{path}: holds a token"
        assert not token or token not in text, f"{path}: holds this machine's Ray token"


def test_constraints_from_freeze():
    from cluster.wheel import constraints

    freeze = "# a comment\nray==2.60.0\ntorch==2.13.0+cpu\nt3d==0.1.0\nPyYAML==6.0.3\n"
    assert constraints(freeze) == ["ray==2.60.0", "torch==2.13.0", "PyYAML==6.0.3"]
    with pytest.raises(ValueError, match="foo @ file:///x"):
        constraints("foo @ file:///x\n")


def test_node_start_retries_a_failed_ray_start(tmp_path):
    """Ray waits a fixed 30 s for a new raylet: node.sh stops what a failed `ray start` left and tries
    again, and gives up after T3D_START_TRIES with an error saying so."""
    home, venv = tmp_path / "home", tmp_path / "venv"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("x" * 32)
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = venv / "bin" / "ray"            # fails its first FAILS `ray start`s, records every call
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
if [[ $1 == start ]]; then
  n=$(grep -c '^start' {calls})
  ((n > FAILS)) || {{ echo "The current node timed out during startup." >&2; exit 1; }}
fi
""")
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "T3D_VENV": str(venv), "T3D_START_TRIES": "3", "T3D_START_PAUSE": "0"}

    def start(fails: int) -> subprocess.CompletedProcess:
        calls.write_text("")
        return subprocess.run(["bash", str(CLUSTER / "node.sh"), "start-head", "--num-cpus=1"], text=True,
                              capture_output=True, env={**env, "FAILS": str(fails)}, timeout=60)

    r = start(2)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    assert [x.split()[0] for x in lines] == ["stop", "start", "stop", "start", "stop", "start"], lines
    assert lines[2] == "stop --force" and "--head" in lines[-1] and lines[-1].endswith("--num-cpus=1")
    assert r.stderr.count("retrying") == 2
    r = start(3)
    assert r.returncode == 1 and "ray start failed 3 times" in r.stderr, r.stderr


# ------------------------------------------------------------------ ray up / job submit / ray down

REAPER = "import os, time\nwhile True:\n    try: os.wait()\n    except ChildProcessError: time.sleep(0.5)"


def _ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


class Node:
    """A 'machine' for Ray's local provider: a PID namespace on this host, reached by ssh through
    ``sshd -i`` (the test's own sshd_config, host key and authorized key) started inside it for each
    connection by the config's ssh_proxy_command, so nothing listens for ssh. The launcher's bare
    `ray stop` (node.sh's and `ray down`'s) then sees only this node's processes, never another Ray on
    the host. Killing the namespace's init (``stop``) ends whatever is left."""

    def __init__(self, d: Path):
        self.home = d / "home"                      # the node's $HOME (sshd's SetEnv)
        self.home.mkdir(parents=True)
        self.key = d / "id_ed25519"
        for k in (self.key, d / "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        self.log = d / "sshd.log"
        self.sshd_config = d / "sshd_config"
        self.sshd_config.write_text(f"""\
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
AuthorizedKeysFile {d / 'authorized_keys'}
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile none
SetEnv HOME={self.home}
""")
        Path("/run/sshd").mkdir(exist_ok=True)      # sshd's privilege separation directory
        self.unshare = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                                         sys.executable, "-c", REAPER], start_new_session=True)
        import psutil

        deadline = time.time() + 10
        while not (kids := psutil.Process(self.unshare.pid).children()):
            assert time.time() < deadline and self.unshare.poll() is None, "unshare did not start its child"
            time.sleep(0.1)
        self.init = kids[0].pid
        self.ns = _ns(self.init)

    @property
    def proxy_command(self) -> str:
        return (f"nsenter --target {self.init} --pid --mount {shutil.which('sshd')} -i "
                f"-f {self.sshd_config} -E {self.log}")

    def procs(self) -> list:
        """This node's processes, its init left out."""
        import psutil

        return [p for p in psutil.process_iter(["pid", "name", "cmdline"])
                if p.pid != self.init and _ns(p.pid) == self.ns]

    def stop(self) -> None:
        os.killpg(self.unshare.pid, signal.SIGKILL)
        self.unshare.wait(10)


def _run(cmd: list[str], log: Path, timeout: float, env: dict) -> subprocess.CompletedProcess:
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    log.write_text(r.stdout)
    r.seconds = time.time() - t0
    print(f"{' '.join(cmd[:3])}: {r.seconds:.0f} s (rc {r.returncode}, log {log})")
    return r


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ray_up_submit_down(tmp_path):
    missing = [b for b in ("sshd", "ssh", "rsync", "unshare", "nsenter") if not shutil.which(b)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: `make test` installs openssh-server and rsync "
                    "(apt-get install -y openssh-server rsync)")
    if os.geteuid() != 0:
        pytest.skip("needs root: sshd -i and a PID namespace (unshare --pid) for the launcher's node")
    import psutil

    from cluster import local, wheel

    venv_bin = Path(sys.executable).parent
    dist, _ = wheel.build(tmp_path / "dist")
    dist = dist.parent
    client_home, client_tmp = tmp_path / "client", tmp_path / "tmp"
    client_tmp.mkdir()
    # HOME: where `ray get-auth-token` writes; TMPDIR: where `ray up` keeps its config cache and the
    # local provider's cluster state (/tmp otherwise)
    env = {**os.environ, "HOME": str(client_home), "TMPDIR": str(client_tmp), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(venv_bin / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    token_file = client_home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert token

    node = Node(tmp_path / "node")
    name = f"t3d-test-{uuid.uuid4().hex[:8]}"
    ray_tmp = Path("/tmp") / f"t3d-{name[-8:]}"           # unix socket paths must stay short
    gcs, dash = local._free_ports(2)
    ray_args = ["--num-cpus=8",                              # more than cores: docs/notes, Ray Data's budget
                f"--object-store-memory={400 * 2**20}", f"--temp-dir={ray_tmp}",
                *local._port_flags(["dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
                                    "metrics-export", "ray-client-server"], avoid={gcs, dash})]
    # site settings (cluster/node.sh): the node's pip sees this machine's pip setup, as a site's
    # node.env would name its package mirror
    pip = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    user_conf = [c for c in (Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf") if c.is_file()]
    if user_conf and "PIP_CONFIG_FILE" not in pip:                 # read from $HOME, which the node lacks
        pip["PIP_CONFIG_FILE"] = str(user_conf[0])
    # and, as a site would to save time on many nodes: no .pyc compiling at install (pip's boolean is
    # inverted: PIP_NO_COMPILE=0 is --no-compile; imports compile what they use). (Not the host's torch
    # extension cache: the node's paths differ, so sharing it makes both sides rebuild DeepSpeed's op.)
    pip["PIP_NO_COMPILE"] = "0"
    node_env = tmp_path / "node.env"
    node_env.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in pip.items()) + f"""\
T3D_PYTHON={getattr(sys, '_base_executable', '') or 'python3'}
T3D_RAY_PORT={gcs}
T3D_DASHBOARD_PORT={dash}
T3D_RAY_ARGS="{' '.join(ray_args)}"
""")
    cfg = yaml.safe_load(ONPREM.read_text())
    mounts = cfg["file_mounts"]
    assert set(MOUNTS) <= set(mounts) and {"ssh_user", "ssh_private_key"} <= set(cfg["auth"]), \
        f"{ONPREM}: the placeholders this test fills (file_mounts, auth) moved"
    cfg["cluster_name"] = name
    cfg["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(node.key),
                   "ssh_proxy_command": node.proxy_command}
    mounts.update({"~/t3d/node.sh": str(REPO / mounts["~/t3d/node.sh"]), "~/t3d/dist": str(dist),
                   "~/.ray/auth_token": str(token_file), "~/t3d/node.env": str(node_env)})
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ray = str(venv_bin / "ray")
    times = {}
    try:
        r = _run([ray, "up", "-y", str(config)], tmp_path / "up.log", 900, env)
        times["ray up"] = r.seconds
        assert r.returncode == 0, f"ray up failed:\n{r.stdout[-4000:]}"
        assert (node.home / ".ray" / "auth_token").read_text().strip() == token   # the file mount
        # a tiny pretraining job: phantoms, ingest, 2 steps; only configs/ in the working dir, so the
        # code is the wheel's, installed on the node
        job_dir = tmp_path / "job"
        shutil.copytree(REPO / "configs", job_dir / "configs")
        data, out = tmp_path / "data", tmp_path / "runs"
        steps = " && ".join([
            "python -c 'import trainer; print(\"t3d from\", trainer.__file__)'",
            f"python -m data_service.synth --out {data}/raw --n 10 --seed 0",
            f"python -m data_service.ingest --source ctrate --input {data}/raw --out {data}/shards "
            "--config configs/debug.yaml --no-progress",
            f"python -m trainer.pretrain --config configs/debug.yaml --set data.shards={data}/shards "
            f"--set train.output_dir={out} --set train.run_name=launcher --set train.steps=2 "
            "--set train.batch_size=2 --set train.checkpoint_every=2 --set train.log_every=1 "
            "--set train.warmup_steps=1 --set ray.num_workers=2"])
        job_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        address = f"http://127.0.0.1:{dash}"
        r = _run([ray, "job", "submit", "--address", address, "--submission-id", "launcher-job",
                  "--working-dir", str(job_dir), "--", "bash", "-c", steps], tmp_path / "job.log", 900, job_env)
        times["ray job submit"] = r.seconds
        status = subprocess.run([ray, "job", "status", "--address", address, "launcher-job"], env=job_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60).stdout
        assert r.returncode == 0 and "Job 'launcher-job' succeeded" in status, \
            f"job failed:\n{status}\n{r.stdout[-4000:]}"
        assert f"t3d from {node.home}/t3d/venv/" in r.stdout, "the job did not run the node venv's t3d"
        assert (out / "launcher" / "step_0000002" / "export").is_dir(), "no checkpoint at step 2"
        # the dashboard (and its job server) listens on loopback only. (Ray 2.60's GCS, raylet and agents
        # listen on all interfaces whatever --node-ip-address says; token auth guards them.)
        pids = {p.pid for p in node.procs()}
        on_dash = {c.laddr.ip for c in psutil.net_connections("inet")
                   if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.port == dash}
        assert on_dash == {"127.0.0.1"}, f"the dashboard listens on {on_dash}"
        assert any("raylet" in (p.info["name"] or "") for p in node.procs()), "no raylet on the node"

        r = _run([ray, "down", "-y", str(config)], tmp_path / "down.log", 300, env)
        times["ray down"] = r.seconds
        assert r.returncode == 0, f"ray down failed:\n{r.stdout[-4000:]}"
        # nothing of the cluster is left: `ray down`'s `ray stop` ended every Ray process on the node
        # (the sshd sessions of ssh's ControlPersist end by themselves, within 10 s)
        deadline = time.time() + 60
        while node.procs() and time.time() < deadline:
            time.sleep(1)
        left = [f"{p.pid} {' '.join(p.info['cmdline'] or [p.info['name'] or ''])[:120]}" for p in node.procs()]
        assert not left, "left on the node after ray down:\n" + "\n".join(left)
        assert not [p for p in psutil.process_iter(["cmdline"]) if str(ray_tmp) in " ".join(p.info["cmdline"] or [])]
        print("wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    finally:
        node.stop()
        from ray.autoscaler._private.local.config import get_lock_path, get_state_path

        for f in (get_state_path(name), get_lock_path(name)):    # the head's autoscaler's (in /tmp/ray)
            Path(f).unlink(missing_ok=True)
        h = lambda x: hashlib.sha256(x.encode()).hexdigest()[:10]  # noqa: E731 - ssh ControlPath, as Ray names it
        shutil.rmtree(f"/tmp/ray_ssh_{h(getpass.getuser())}/{h(name)}", ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
