"""cluster.yaml, the crontab and the Kubernetes manifests: valid for the tools that read them,
shaped the way the README says, and free of secrets.

cluster.yaml goes through what `ray up` runs before it touches AWS (Ray 2.60,
ray.autoscaler._private.commands._bootstrap_config): ``prepare_config`` (merge with the AWS
defaults, per-type worker bounds) then ``validate_config`` (the JSON schema
ray/autoscaler/ray-schema.json plus its own cross-checks).
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_FILE = ROOT / "cluster.yaml"
CRON_FILE = ROOT / "deploy" / "cron" / "medhier-score.cron"
K8S_DIR = ROOT / "deploy" / "k8s"
README_INSTALL = "python3 -m venv .venv && .venv/bin/pip install -e ."
# GPUs per instance type (AWS): what a node type must declare for the autoscaler to be right.
INSTANCE_GPUS = {"g5.12xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8}
INSTANCE_VCPUS = {"m7i.2xlarge": 8, "g5.12xlarge": 48, "g5.48xlarge": 192, "p4d.24xlarge": 96, "c7i.8xlarge": 32}


# -- secrets -------------------------------------------------------------------------------------

SECRET_KEY = re.compile(r"(secret|password|passwd|access_key|session_token|auth_token|api_key|private_key)", re.I)
SECRET_VALUE = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"(aws_secret_access_key|aws_session_token|RAY_AUTH_TOKEN)\s*[=:]\s*['\"]?[^\s'\"$]{8,}", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b[0-9a-f]{32,}\b"),  # a Ray token (`ray get-auth-token --generate` writes hex)
]
PATH_LIKE = re.compile(r"^(~|/|\$|\.)")  # a key that names a file, not a value: "~/.ray/auth_token"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def secret_findings(text: str, parsed: Any = None) -> list[str]:
    """Secret-looking things in a config: credentials in values (anywhere in the text, comments
    included), and keys named like secrets that hold a literal rather than a reference."""
    found = [f"{pattern.pattern!r} matches {m.group(0)[:24]}..." for pattern in SECRET_VALUE for m in pattern.finditer(text)]
    if isinstance(parsed, dict):
        for where, value in _walk(parsed):
            leaf = where.rsplit(".", 1)[-1]
            if isinstance(value, str) and SECRET_KEY.search(leaf) and not PATH_LIKE.match(value):
                found.append(f"{where} = {value[:24]}...")
        # Kubernetes env entries: a secret-named variable must come from valueFrom, never value
        for env in _k8s_env_entries(parsed):
            if SECRET_KEY.search(env.get("name", "")) or env.get("name") == "RAY_AUTH_TOKEN":
                if "value" in env:
                    found.append(f"env {env['name']} has an inline value")
        if parsed.get("kind") == "Secret" and (parsed.get("data") or parsed.get("stringData")):
            found.append("a Secret manifest with inline data")
    return found


def _k8s_env_entries(doc: Any) -> Iterator[dict]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "env" and isinstance(v, list):
                yield from (e for e in v if isinstance(e, dict))
            else:
                yield from _k8s_env_entries(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _k8s_env_entries(v)


@pytest.mark.parametrize(
    "text,leaks",
    [
        ("provider:\n  aws_access_key_id: AKIAABCDEFGHIJKLMNOP\n", True),
        ("provider:\n  aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n", True),
        ("setup_commands:\n  - export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENG\n", True),
        ("env:\n  - name: RAY_AUTH_TOKEN\n    value: hunter2hunter2\n", True),
        ("head_start_ray_commands:\n  - RAY_AUTH_TOKEN=3f2a9c4d5e6f7a8b9c0d1e2f3a4b5c6d ray start --head\n", True),
        ("apiVersion: v1\nkind: Secret\nstringData:\n  auth_token: abc\n", True),
        ("file_mounts:\n  '~/.ray/auth_token': '~/.ray/auth_token'\n", False),
        ("env:\n  - name: RAY_AUTH_TOKEN\n    valueFrom:\n      secretKeyRef: {name: t, key: auth_token}\n", False),
        ("node_config:\n  IamInstanceProfile:\n    Arn: arn:aws:iam::123456789012:instance-profile/x\n", False),
    ],
)
def test_secret_check_finds_what_it_must(text, leaks):
    assert bool(secret_findings(text, yaml.safe_load(text))) == leaks


# -- cluster.yaml --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_FILE.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` has it when it validates: merged with Ray's AWS defaults."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def _workers(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def test_cluster_yaml_passes_rays_own_validation(prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError when invalid
    assert prepared["provider"]["type"] == "aws"


def test_cluster_yaml_has_no_secrets(raw):
    text = CLUSTER_FILE.read_text()
    assert not secret_findings(text, raw)
    assert not re.search(r"aws_(access_key_id|secret_access_key|session_token)\s*:", text, re.I)
    # S3 from instance profiles: every node type has one, by ARN
    for name, node_type in raw["available_node_types"].items():
        arn = node_type["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@/-]+", arn), f"{name}: IamInstanceProfile.Arn {arn!r}"


def test_head_takes_no_tasks(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU") == 0
    assert head["max_workers"] == 0
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus=0" in start


def test_worker_types_for_gpus_and_decoding(prepared):
    workers = _workers(prepared)
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    cpu_types = {k: v for k, v in workers.items() if not v["resources"].get("GPU", 0)}
    assert {4, 8} <= {v["resources"]["GPU"] for v in gpu_types.values()}, "a 4-GPU and an 8-GPU node type"
    for name, node_type in gpu_types.items():
        instance = node_type["node_config"]["InstanceType"]
        assert INSTANCE_GPUS.get(instance) == node_type["resources"]["GPU"], f"{name}: {instance} has {INSTANCE_GPUS.get(instance)} GPUs"
    assert cpu_types, "a CPU-only node type for decoding"
    for name, node_type in workers.items():
        instance = node_type["node_config"]["InstanceType"]
        assert 0 < node_type["resources"]["CPU"] <= INSTANCE_VCPUS[instance], f"{name}: CPUs of {instance}"


def test_autoscaling_bounds(prepared):
    workers = _workers(prepared)
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        assert node_type["max_workers"] <= prepared["max_workers"], name
    assert sum(v["min_workers"] for v in workers.values()) <= prepared["max_workers"]
    assert 0 < prepared["idle_timeout_minutes"] <= 60


def test_nodes_install_medhier_as_the_readme_does(raw, prepared):
    readme = (ROOT / "README.md").read_text()
    assert README_INSTALL in readme, "the README's install command changed: update cluster.yaml's setup_commands"
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        commands = prepared[key]
        assert any(README_INSTALL in c for c in commands), f"{key} do not run {README_INSTALL!r}"
    # ... in ~/medhier, where file_mounts put what an install needs (and no .venv)
    mounts = raw["file_mounts"]
    for part in ("pyproject.toml", "README.md", "medhier", "jobs", "configs"):
        assert mounts.get(f"~/medhier/{part}") == f"./{part}", part
        assert (ROOT / part).exists(), part
    assert not any(local.rstrip("/") in (".", "./.venv") for local in mounts.values())
    assert any(c.startswith("cd ~/medhier && " + README_INSTALL) for c in raw["setup_commands"])
    excludes = set(yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())["excludes"])
    assert {".venv", ".git"} <= set(raw["rsync_exclude"]) and {".venv", ".git"} <= excludes


def test_every_node_starts_ray_from_the_venv_with_token_auth(raw):
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in raw[key] if "ray start" in c]
        assert len(start) == 1, key
        assert "RAY_AUTH_MODE=token" in start[0] and "medhier/.venv/bin" in start[0], key


# -- the crontab ---------------------------------------------------------------------------------


def read_crontab(path: Path) -> tuple[dict[str, str], list[tuple[list[str], str, str]]]:
    """A /etc/cron.d file -> (its variables, [(5 schedule fields, user, command)])."""
    env: dict[str, str] = {}
    jobs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        var = re.match(r"^([A-Za-z_]\w*)\s*=\s*(.*)$", line)
        if var:
            env[var.group(1)] = var.group(2).strip().strip("'\"")
            continue
        fields = line.split(None, 6)
        assert len(fields) == 7, f"not a cron.d job line (m h dom mon dow user command): {line}"
        jobs.append((fields[:5], fields[5], fields[6]))
    return env, jobs


def cron_command(command: str) -> str:
    """What cron hands to the shell: `\\%` becomes `%` (an unescaped `%` would end the command)."""
    assert not re.search(r"(?<!\\)%", command), "unescaped % in a crontab command"
    return command.replace("\\%", "%")


def _cron_field_ok(field: str, low: int, high: int) -> bool:
    for part in field.split(","):
        base, _, step = part.partition("/")
        if step and not step.isdigit():
            return False
        if base == "*":
            continue
        lo, _, hi = base.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return False
        if not (low <= int(lo) <= high and (not hi or low <= int(hi) <= high)):
            return False
    return True


def _score_args(argv: list[str]) -> list[str]:
    """The arguments of `python jobs/score.py` after `ray job submit ... --`."""
    sep = argv.index("--")
    assert argv[sep + 1 : sep + 3] == ["python", "jobs/score.py"], argv[sep:]
    args = argv[sep + 3 :]
    return args[: args.index(">>")] if ">>" in args else args


def _submit_options(argv: list[str]) -> dict[str, str]:
    i = argv.index("submit")
    sep = argv.index("--")
    assert argv[i - 2 : i] == ["ray", "job"], argv
    opts, rest = {}, argv[i + 1 : sep]
    for k, v in zip(rest[::2], rest[1::2]):
        assert k.startswith("--"), rest
        opts[k] = v
    return opts


def _check_score_args(args: list[str]) -> None:
    from medhier.cli import build_parser

    parsed = build_parser().parse_args(["score", *args])  # exits (SystemExit) on a bad argument
    assert parsed.archive and parsed.checkpoint and parsed.output
    assert not parsed.full, "nightly runs are incremental: no --full"


def test_crontab_submits_the_scoring_job_nightly():
    env, jobs = read_crontab(CRON_FILE)
    assert len(jobs) == 1
    schedule, user, command = jobs[0]
    for field, (low, high) in zip(schedule, [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]):
        assert _cron_field_ok(field, low, high), f"bad schedule field {field!r}"
    assert schedule[2:] == ["*", "*", "*"], "every day"
    assert user != "root"
    argv = shlex.split(cron_command(command))
    assert "RAY_AUTH_MODE=token" in argv
    opts = _submit_options(argv)
    assert opts["--address"] == "$RAY_HEAD" and re.fullmatch(r"https?://[\w.-]+:8265", env["RAY_HEAD"])
    assert opts["--working-dir"] == "." and opts["--runtime-env"] == "jobs/runtime_env.yaml"
    args = _score_args(argv)
    values = {k: env.get(v.lstrip("$"), v) for k, v in zip(args[::2], args[1::2])}
    _check_score_args([x for pair in values.items() for x in pair])
    assert values["--archive"].startswith("s3://") and values["--output"].startswith("s3://")
    # logs to a file, both streams
    assert argv[-3:] == [">>", "$MEDHIER_LOG", "2>&1"] and env["MEDHIER_LOG"].startswith("/var/log/")
    # the token is a file, never a value in the crontab
    assert env["RAY_AUTH_TOKEN_PATH"].startswith("/") and "RAY_AUTH_TOKEN" not in env
    assert not secret_findings(CRON_FILE.read_text())


# -- Kubernetes ----------------------------------------------------------------------------------


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str) -> dict:
    found = [d for d in _k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)} manifests"
    return found[0]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _token_from_secret(container: dict) -> bool:
    env = {e["name"]: e for e in container.get("env", [])}
    mode = env.get("RAY_AUTH_MODE", {}).get("value") == "token"
    token = env.get("RAY_AUTH_TOKEN", {})
    return mode and "value" not in token and bool(token.get("valueFrom", {}).get("secretKeyRef", {}).get("name"))


def test_k8s_manifests_parse_and_hold_no_secrets():
    for path in sorted(K8S_DIR.glob("*.yaml")):
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            assert not secret_findings("", doc), (path, secret_findings("", doc))
        assert not secret_findings(text), path


def test_k8s_cronjob_submits_the_scoring_job_to_the_rayclusters_head():
    cron = _one("CronJob")
    ray_cluster = _one("RayCluster")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(_cron_field_ok(f, lo, hi) for f, (lo, hi) in zip(fields, [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]))
    assert spec["concurrencyPolicy"] == "Forbid"
    (container,) = _containers(spec["jobTemplate"]["spec"]["template"])
    argv = [*container["command"], *container["args"]]
    assert argv[:3] == ["ray", "job", "submit"]
    opts = _submit_options(argv)
    name, ns = ray_cluster["metadata"]["name"], ray_cluster["metadata"]["namespace"]
    assert opts["--address"] == f"http://{name}-head-svc.{ns}.svc.cluster.local:8265"
    assert opts["--working-dir"] == "." and container["workingDir"] == "/app"
    assert opts["--runtime-env"] == "jobs/runtime_env.yaml"
    _check_score_args(_score_args(argv))
    assert _token_from_secret(container)
    assert container["image"] == _containers(ray_cluster["spec"]["headGroupSpec"]["template"])[0]["image"]


def test_k8s_raycluster_mirrors_cluster_yaml():
    ray_cluster = _one("RayCluster")
    spec = ray_cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"].get("num-gpus", "0") == "0"
    groups = spec["workerGroupSpecs"]
    gpus = {}
    for group in groups:
        (container,) = _containers(group["template"])
        limits = container["resources"]["limits"]
        gpus[group["groupName"]] = int(limits.get("nvidia.com/gpu", 0))
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], group["groupName"]
    assert {4, 8} <= set(gpus.values()) and 0 in gpus.values(), gpus
    # every Ray container: token auth from the Secret; S3 from the IRSA service account
    accounts = {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == "ServiceAccount"}
    for template in [head["template"], *(g["template"] for g in groups)]:
        for container in _containers(template):
            assert _token_from_secret(container), container["name"]
        account = accounts[template["spec"]["serviceAccountName"]]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])


# -- the job entrypoints -------------------------------------------------------------------------


def test_every_job_script_is_the_command_its_docstring_submits():
    """Each ``jobs/NAME.py`` runs the medhier command it is named for (``plaque_train_seg`` is
    ``medhier plaque train-seg``), and its docstring shows itself submitted with the cluster's
    runtime env. `python jobs/NAME.py --help` runs as the job's driver would (tests/test_cluster.py
    submits prepare, train, score and plaque_fit to a real cluster)."""
    import os
    import subprocess
    import sys

    scripts = sorted((ROOT / "jobs").glob("*.py"))
    assert {p.stem for p in scripts} >= {"prepare", "train", "tune", "score", "plaque_fit", "plaque_segment"}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {p: subprocess.Popen([sys.executable, str(p.relative_to(ROOT)), "--help"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in scripts}
    for path, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        command = path.stem.replace("plaque_", "plaque ", 1).replace("_", "-")
        assert proc.returncode == 0 and out.startswith(f"usage: medhier {command} "), (path.name, out[:200], err[-2000:])
        doc = " ".join(path.read_text().split('"""')[1].replace("\\\\", " ").split())  # one line, continuations gone
        assert ("RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml "
                f"-- python jobs/{path.stem}.py --") in doc, (path.name, doc)
