"""The infra/ manifests parse, agree with each other and with the project, and every command
they (and infra/README.md) name exists and accepts the flags it is given."""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.cli import build_parser
from jobs.submit import load_runtime_env, normalise_stage, parse_stage_flags, stages

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def load(name: str):
    return yaml.safe_load((INFRA / name).read_text())


def pins() -> dict[str, str]:
    out = {}
    for line in (INFRA / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, eq, version = line.partition("==")
            assert eq, f"infra/requirements.txt: {line!r} is not pinned with =="
            out[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = version
    return out


# ----------------------------------------------------------------------------- commands


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)


def commands(script: str) -> list[list[str]]:
    """Simple commands of a shell snippet, with variables assigned in it expanded."""
    script = re.sub(r"\\\n", " ", script)
    lines = [re.sub(r"(^|\s)#.*$", "", line) for line in script.splitlines()]
    env: dict[str, str] = {}
    out = []
    for part in re.split(r"&&|\|\||;|\n", "\n".join(lines)):
        words = shlex.split(part)
        words = words[1:] if words[:1] == ["export"] else words
        if len(words) == 1 and (m := re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", words[0], flags=re.S)):
            env[m.group(1)] = m.group(2)  # NAME=value: used by the commands after it
            continue
        part = re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda v: env.get(v.group(1), v.group(0)), part)
        argv = shlex.split(part)
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value command
            argv.pop(0)
        if argv:
            out.append(argv)
    return out


def check_cast(argv: list[str]) -> str:
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`cast {shlex.join(argv)}` is refused by the cast parser") from None
    if ns.command == "submit":
        rest = ns.rest
        split = rest.index("--") if "--" in rest else len(rest)
        assert not ns.options.parse_known_args(rest[1:split], namespace=ns)[1], rest
        stage = normalise_stage(rest[0])
        parse_stage_flags(stage, rest[split + 1:])
        return f"cast submit {stage}"
    return f"cast {ns.command}"


def check_python_m(argv: list[str]) -> str:
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    assert module.startswith("jobs."), f"python -m {module}: not a job entrypoint"
    stage = module.removeprefix("jobs.").replace("_", "-")
    assert stage in stages(), f"{module} is not a stage entrypoint"
    parse_stage_flags(stage, argv[3:])
    return f"python -m {module}"


def check_ray(argv: list[str]) -> str:
    from ray.scripts.scripts import cli

    cmd = cli.commands.get(argv[1])
    assert cmd is not None, f"`ray {argv[1]}` is not a ray command"
    args = argv[2:]
    if hasattr(cmd, "commands"):  # ray job submit ...
        sub = cmd.commands.get(args[0])
        assert sub is not None, f"`ray {argv[1]} {args[0]}` is not a ray command"
        cmd, args = sub, args[1:]
    ctx = cmd.make_context(f"ray {argv[1]}", list(args))  # click parses and checks every option
    entry = ctx.params.get("entrypoint")
    if entry:  # ray job submit -- python -m jobs.<stage> ...
        check(list(entry))
    return f"ray {argv[1]}"


def check(argv: list[str]) -> str | None:
    if argv[0] == "cast":
        return check_cast(argv[1:])
    if argv[0] in ("python", "python3") and argv[1:2] == ["-m"]:
        return check_python_m(argv)
    if argv[0] == "ray":
        return check_ray(argv)
    return None  # docker, kubectl, mkdir, mount, ulimit: not ours


@pytest.mark.parametrize("source", ["cluster.yaml", "rayjob.yaml", "cluster-s3.yaml", "rayjob-s3.yaml", "README.md"])
def test_every_command_named_exists_and_takes_its_flags(source, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's relative paths (infra/cluster.yaml) are from the root
    if source == "README.md":
        snippets = bash_blocks((INFRA / source).read_text())
    elif source.startswith("cluster"):  # what the launcher runs on the nodes
        cfg = load(source)
        snippets = [c for key, value in cfg.items() if key.endswith("_commands") for c in strings(value)]
    else:  # what the RayJob submits
        snippets = [load(source)["spec"]["entrypoint"]]
    checked = [c for s in snippets for argv in commands(s) if (c := check(argv))]
    launcher = {"cast fetch-model", "cast fetch-corpus", "ray start", "ray stop"}
    rayjob = {"python -m jobs.extract", "python -m jobs.align", "python -m jobs.layermap", "python -m jobs.train_heads"}
    expected = {"cluster.yaml": launcher, "cluster-s3.yaml": launcher, "rayjob.yaml": rayjob, "rayjob-s3.yaml": rayjob,
                "README.md": {"cast submit extract", "cast submit align", "cast submit layermap",
                              "cast submit train-heads", "cast submit lora", "cast submit validate", "cast submit run",
                              "cast verify", "cast inspect", "ray up", "ray job"}}[source]
    assert expected <= set(checked), f"{source}: expected {expected - set(checked)} among {sorted(set(checked))}"


def test_commands_parser_sees_through_shell_syntax():
    got = commands('export R=/x\nS="--env A=1"\nA=2 cast submit align $S -- $R/a ${R}/b --out c \\\n  --force && '
                   'ulimit -n 1; ray stop  # comment')
    assert got == [["cast", "submit", "align", "--env", "A=1", "--", "/x/a", "/x/b", "--out", "c", "--force"],
                   ["ulimit", "-n", "1"], ["ray", "stop"]]
    with pytest.raises(AssertionError, match="refused by the cast parser"):
        check(["cast", "extract", "--modle", "m"])
    with pytest.raises(AssertionError, match="no such module"):
        check(["python", "-m", "jobs.no_such_stage"])


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-s3.yaml"])
def test_cluster_launcher_config_is_valid_for_ray(name):
    import jsonschema
    import ray.autoscaler

    cfg = load(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [k for k, v in workers.items() if v["node_config"]["InstanceType"].startswith(("g", "p"))]
    cpu = [k for k in workers if k not in gpu]
    assert gpu and cpu, "GPU workers for extraction and CPU workers for heads"
    assert "-e CAST_AUTOSCALING=1" in cfg["docker"]["run_options"]  # GPU workers scale from 0: actors wait for one
    for command in cfg["head_start_ray_commands"][-1:] + cfg["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    if name == "cluster.yaml":
        assert "-v /shared:/shared" in cfg["docker"]["run_options"]  # one shared filesystem on every node
    else:  # nothing shared but the bucket, reached through each node's instance role
        assert "/shared" not in json.dumps(cfg)
        assert all("IamInstanceProfile" in t["node_config"] for t in types.values())


def test_object_storage_launcher_mirrors_the_shared_disk_one():
    shared, s3 = load("cluster.yaml"), load("cluster-s3.yaml")
    assert shared["available_node_types"].keys() == s3["available_node_types"].keys()
    for name, t in shared["available_node_types"].items():
        other = s3["available_node_types"][name]
        assert other["node_config"]["InstanceType"] == t["node_config"]["InstanceType"]
        rest = lambda node_type: {k: v for k, v in node_type.items() if k != "node_config"}  # noqa: E731
        assert rest(other) == rest(t)
    for key in ("provider", "head_node_type", "max_workers", "head_start_ray_commands", "worker_start_ray_commands"):
        assert shared[key] == s3[key], key


def test_rayjob_manifest_is_a_rayjob_on_the_pinned_ray():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == pins()["ray"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["CAST_CACHE"].startswith("/shared")
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups}
    assert any("nvidia.com/gpu" in lim for lim in limits.values())
    assert any("nvidia.com/gpu" not in lim for lim in limits.values())
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:  # every node sees the same shared filesystem at /shared
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts["/shared"]] == "cast-shared"
        assert {"name": "CAST_AUTOSCALING", "value": "1"} in pod["containers"][0]["env"]
    assert "--gpus-per-worker 1" in " ".join(spec["entrypoint"].split())


def test_object_storage_rayjob_shares_only_the_bucket_with_secrets_and_token_auth():
    shared, job = load("rayjob.yaml")["spec"], load("rayjob-s3.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pins()["ray"]
    groups = cluster["workerGroupSpecs"]
    limits = lambda gs: {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"]  # noqa: E731
                         for g in gs}
    assert limits(groups) == limits(shared["rayClusterSpec"]["workerGroupSpecs"])  # the same machines
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    token = {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "cast-ray-token", "key": "token"}}}
    for pod in pods:
        c = pod["containers"][0]
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"])  # no shared disk at all
        assert c["envFrom"] == [{"secretRef": {"name": "cast-s3"}}]  # endpoint and credentials from the Secret
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"] and token in c["env"]
        assert {"name": "CAST_AUTOSCALING", "value": "1"} in c["env"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CAST_CACHE"] == "s3://your-bucket/cache"  # shared through the bucket,
        assert any(m["mountPath"] == env["CAST_LOCAL_CACHE"] for m in c["volumeMounts"])  # loaded locally
    submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in submitter["env"] and token in submitter["env"]
    # Every path a stage is given is in the bucket, and the resources come from the flags.
    argv = " ".join(spec["entrypoint"].split())
    paths = [w for w in argv.split() if "/runs/" in w]
    assert len(paths) == 14 and all(p.startswith("s3://your-bucket/runs/demo/") for p in paths), paths
    assert "--gpus-per-worker 1 --cpus-per-worker 4" in argv and "--cpus-per-head 1" in argv
    assert "/shared" not in json.dumps(job)


@pytest.mark.parametrize("name", ["cluster.yaml", "rayjob.yaml", "cluster-s3.yaml", "rayjob-s3.yaml",
                                  "runtime_env.yaml"])
def test_no_manifest_holds_a_credential(name):
    """Keys reach the nodes from a Secret or an instance role, never written in a manifest."""
    text = (INFRA / name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12,}", text)
    for node in [load(name)]:
        for s in strings(node):
            assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)=\S", s), s

    def env_entries(n):
        if isinstance(n, dict):
            if set(n) >= {"name"} and str(n["name"]).startswith(("AWS_", "RAY_AUTH_TOKEN")):
                yield n
            for v in n.values():
                yield from env_entries(v)
        elif isinstance(n, list):
            for v in n:
                yield from env_entries(v)

    assert all("value" not in e for e in env_entries(load(name)))


def test_runtime_env_example_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = load_runtime_env(str(INFRA / "runtime_env.yaml"))
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert "CAST_CACHE" in env["env_vars"]


def test_image_pins_every_dependency_and_the_same_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pinned = pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for req in project:
        name = re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pinned, f"infra/requirements.txt does not pin {name} (a dependency in pyproject.toml)"
    torch_pin = next(r for r in project if r.startswith("torch=="))
    assert pinned["torch"] == torch_pin.removeprefix("torch==")
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "COPY infra/requirements.txt" in dockerfile and f"torch=={pinned['torch']}" in dockerfile
    for module in re.findall(r"\bjobs\.\w+", dockerfile):
        assert importlib.util.find_spec(module) is not None, f"Dockerfile imports {module}, which does not exist"
