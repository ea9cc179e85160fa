"""Merge speed and peak memory: the ``evomerge merge`` CLI against ``mergekit-yaml`` and an I/O floor.

Usage:

    .venv/bin/python benchmarks/merge_speed.py                  # ~370M-parameter Llama models, slow
    .venv/bin/python benchmarks/merge_speed.py --scale small    # tiny models, a quick check

Three synthetic Llama checkpoints (``base``, ``expert_a``, ``expert_b``; bf16 safetensors) are built in
``--work-dir`` (and reused on later runs). For each merge method one mergekit-format recipe YAML is
written and given, unchanged, to both tools. Every merge runs as its own subprocess, exactly as a user
runs the CLI (interpreter start-up and imports included), so its wall time and peak RSS are its own.
The floor is a third subprocess (this script with ``--floor-only``) that only reads both experts
tensor by tensor, averages them in float32 and writes the result: no merge tool can do much better.

The page cache is warmed once before timing by reading all three models, and ``os.sync()`` runs
(untimed) before each run so that one run's write-back does not land in the next one's time.

Prints a Markdown table and writes the numbers as JSON (``--json``, default ``<work-dir>/results.json``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_BYTES = 2 * 10**9
MODELS = ("base", "expert_a", "expert_b")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
TOOLS = ("evomerge", "mergekit")
DETERMINISTIC = frozenset({"linear", "task_arithmetic", "ties"})
CHECK_TENSORS = (
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)
SCALES: dict[str, dict[str, int]] = {
    "full": {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 2816, "vocab_size": 32000},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 704, "vocab_size": 4000},
}
EXPERT_SEEDS = {"base": 0, "expert_a": 1, "expert_b": 2}
LOG_TAIL_LINES = 15


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def llama_config(scale: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SCALES[scale],
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of LlamaForCausalLM's weights, in the order transformers lists them."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        shapes += [(f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h))]
        shapes += [(f"{p}.mlp.down_proj.weight", (h, inter))]
        shapes += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    return [*shapes, ("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def make_tensor(name: str, shape: tuple[int, ...], index: int, model: str) -> torch.Tensor:
    """The base tensor (seeded by position), plus seeded noise for an expert: a realistic task vector."""
    if name.endswith("norm.weight"):
        value = torch.ones(shape)
    else:
        value = torch.randn(shape, generator=torch.Generator().manual_seed(index)) * 0.02
    if model != "base":
        seed = EXPERT_SEEDS[model] * 1_000_000 + index
        value += torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.002
    return value.to(torch.bfloat16)


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_sharded(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write tensors into ~SHARD_BYTES safetensors shards plus ``model.safetensors.index.json``."""
    parts: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > SHARD_BYTES:
            save_file(pending, out_dir / f"part-{len(parts)}.tmp", metadata={"format": "pt"})
            parts.append(list(pending))
            pending, pending_bytes = {}, 0
        pending[name] = tensor
        pending_bytes += nbytes
        total += nbytes
    if pending:
        save_file(pending, out_dir / f"part-{len(parts)}.tmp", metadata={"format": "pt"})
        parts.append(list(pending))
    weight_map: dict[str, str] = {}
    for i, names in enumerate(parts):
        final = shard_name(i + 1, len(parts))
        (out_dir / f"part-{i}.tmp").rename(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def model_is_complete(model_dir: Path, config: dict[str, Any]) -> bool:
    index_path = model_dir / "model.safetensors.index.json"
    if not (model_dir / "config.json").is_file() or not index_path.is_file():
        return False
    if json.loads((model_dir / "config.json").read_text()) != config:
        return False
    shards = set(json.loads(index_path.read_text())["weight_map"].values())
    return all((model_dir / s).is_file() for s in shards)


def build_model(model_dir: Path, model: str, config: dict[str, Any]) -> None:
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    shapes = tensor_shapes(config)
    write_sharded(tmp, ((n, make_tensor(n, s, i, model)) for i, (n, s) in enumerate(shapes)))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)


def ensure_models(work_dir: Path, scale: str) -> dict[str, Path]:
    config = llama_config(scale)
    paths = {m: work_dir / m for m in MODELS}
    for model, path in paths.items():
        if model_is_complete(path, config):
            print(f"reusing {path}")
            continue
        start = time.perf_counter()
        build_model(path, model, config)
        print(f"built {path} in {time.perf_counter() - start:.1f}s")
    return paths


def warm_page_cache(model_dirs: Iterable[Path]) -> tuple[int, float]:
    start, total = time.perf_counter(), 0
    for model_dir in model_dirs:
        for path in sorted(model_dir.iterdir()):
            with path.open("rb") as f:
                while chunk := f.read(64 * 2**20):
                    total += len(chunk)
    return total, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Reading outputs, the floor
# ---------------------------------------------------------------------------------------------------------


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index if there is one, else from every safetensors file's header."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


def load_tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(files[name]), framework="pt") as f:
        tensor: torch.Tensor = f.get_tensor(name)
    return tensor


def max_abs_diff(dir_a: Path, dir_b: Path, names: Iterable[str]) -> float:
    files_a, files_b = tensor_files(dir_a), tensor_files(dir_b)
    worst = 0.0
    for name in names:
        a, b = load_tensor(files_a, name).float(), load_tensor(files_b, name).float()
        worst = max(worst, (a - b).abs().max().item())
    return worst


def averaged_tensors(stack: ExitStack, dir_a: Path, dir_b: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files_a, files_b = tensor_files(dir_a), tensor_files(dir_b)
    handles: dict[Path, Any] = {}
    for path in {*files_a.values(), *files_b.values()}:
        handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
    for name, path in files_a.items():
        a = handles[path].get_tensor(name).float()
        b = handles[files_b[name]].get_tensor(name).float()
        yield name, (0.5 * a + 0.5 * b).to(torch.bfloat16)


def floor_merge(base: Path, dir_a: Path, dir_b: Path, out: Path) -> None:
    """The I/O floor: read both experts tensor by tensor, average in float32, write bf16 shards."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for extra in ("config.json", "generation_config.json"):
        shutil.copy2(base / extra, out / extra)
    with ExitStack() as stack:
        write_sharded(out, averaged_tensors(stack, dir_a, dir_b))


# ---------------------------------------------------------------------------------------------------------
# Recipes and timed runs
# ---------------------------------------------------------------------------------------------------------


def recipe_yaml(method: str, paths: dict[str, Path]) -> str:
    params = "{weight: 0.5, density: 0.5}" if method in ("ties", "dare_ties") else "{weight: 0.5}"
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {paths['base']}")
    lines.append("models:")
    for expert in ("expert_a", "expert_b"):
        lines += [f"  - model: {paths[expert]}", f"    parameters: {params}"]
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


@dataclass
class Measurement:
    ok: bool
    wall_s: float | None = None
    peak_rss_gib: float | None = None
    walls_s: list[float] = field(default_factory=list)
    returncode: int | None = None
    command: str = ""
    log: str = ""
    log_tail: str | None = None


def log_tail(log_path: Path) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def run_once(cmd: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run cmd, output to log_path; return (exit code, wall seconds, peak RSS GiB of that child)."""
    os.sync()
    with log_path.open("wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def measure(cmd: list[str], out_dir: Path, log_path: Path, repeat: int) -> Measurement:
    result = Measurement(ok=True, command=shlex.join(cmd), log=str(log_path))
    rss: list[float] = []
    for _ in range(repeat):
        shutil.rmtree(out_dir, ignore_errors=True)
        code, wall, peak = run_once(cmd, log_path)
        result.returncode = code
        if code != 0:
            result.ok, result.log_tail = False, log_tail(log_path)
            return result
        result.walls_s.append(wall)
        rss.append(peak)
    result.wall_s, result.peak_rss_gib = min(result.walls_s), max(rss)
    return result


def tool_command(tool: str, recipe: Path, out: Path, device: str) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if tool == "evomerge":
        cmd = [str(bin_dir / "evomerge"), "merge", str(recipe), "--output", str(out), "--overwrite"]
        return [*cmd, "--device", "cuda"] if device == "cuda" else cmd
    cmd = [str(bin_dir / "mergekit-yaml"), str(recipe), str(out)]
    return [*cmd, "--cuda"] if device == "cuda" else cmd


def progress(m: Measurement) -> str:
    if m.wall_s is None:
        return f"failed (exit {m.returncode}, log {m.log})"
    return f"{m.wall_s:.2f}s, peak RSS {m.peak_rss_gib:.2f} GiB"


def describe(m: Measurement | None) -> str:
    if m is None:
        return "-"
    return "failed" if m.wall_s is None else f"{m.wall_s:.2f}"


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def ratio(num: Measurement | None, den: Measurement | None) -> str:
    if num is None or den is None or num.wall_s is None or den.wall_s is None:
        return "-"
    return f"{num.wall_s / den.wall_s:.2f}x"


def rss(m: Measurement | None) -> str:
    return "-" if m is None or m.peak_rss_gib is None else f"{m.peak_rss_gib:.2f}"


def table(rows: dict[str, dict[str, Any]], floor: Measurement) -> str:
    header = (
        "| method | evomerge s | mergekit s | speedup (mergekit/evomerge) | floor s | evomerge/floor "
        "| evomerge peak RSS GiB | mergekit peak RSS GiB | max abs diff |"
    )
    lines = [header, "|" + "---|" * 9]
    for method, row in rows.items():
        evo, mk = row.get("evomerge"), row.get("mergekit")
        cells = [method, describe(evo), describe(mk), ratio(mk, evo), describe(floor), ratio(evo, floor)]
        lines.append("| " + " | ".join([*cells, rss(evo), rss(mk), row["max_abs_diff"]]) + " |")
    return "\n".join(lines)


def diff_cell(method: str, row: dict[str, Any], outs: dict[str, Path]) -> str:
    if method not in DETERMINISTIC:
        return "random"
    evo, mk = row.get("evomerge"), row.get("mergekit")
    if evo is None or mk is None or not evo.ok or not mk.ok:
        return "-"
    diff = max_abs_diff(outs["evomerge"], outs["mergekit"], CHECK_TENSORS)
    return "0" if diff == 0 else f"{diff:.2e}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


def machine() -> dict[str, Any]:
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mergekit": importlib.metadata.version("mergekit"),
        "evomerge": importlib.metadata.version("evomerge"),
    }


def print_failures(rows: dict[str, dict[str, Any]], floor: Measurement) -> None:
    runs = [("floor", "floor", floor)] + [(m, t, r[t]) for m, r in rows.items() for t in TOOLS if t in r]
    for method, tool, m in runs:
        if not m.ok:
            print(f"\n{tool} {method} failed (exit {m.returncode}; log {m.log}):\n{m.log_tail}")


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def csv_choice(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        unknown = sorted(set(items) - set(allowed))
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (got {text!r})")
        return items

    return parse


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/evomerge-merge-speed"))
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--methods", type=csv_choice(METHODS), default=list(METHODS), help="comma-separated")
    ap.add_argument("--tools", type=csv_choice(TOOLS), default=list(TOOLS), help="comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="runs per timing; keeps the fastest")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="default: <work-dir>/results.json")
    ap.add_argument(
        "--floor-only", nargs=4, type=Path, metavar=("BASE", "A", "B", "OUT"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def run_benchmark(args: argparse.Namespace, paths: dict[str, Path]) -> tuple[Measurement, dict[str, Any]]:
    work: Path = args.work_dir
    floor_cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-only"]
    floor_cmd += [str(paths[m]) for m in MODELS] + [str(work / "out-floor")]
    floor = measure(floor_cmd, work / "out-floor", work / "floor.log", args.repeat)
    print(f"floor: {progress(floor)}")
    outs = {tool: work / f"out-{tool}" for tool in TOOLS}
    rows: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        recipe = work / f"{method}.yaml"
        recipe.write_text(recipe_yaml(method, paths))
        row: dict[str, Any] = {"recipe": str(recipe)}
        for tool in args.tools:
            cmd = tool_command(tool, recipe, outs[tool], args.device)
            row[tool] = measure(cmd, outs[tool], work / f"{method}-{tool}.log", args.repeat)
            print(f"{method} {tool}: {progress(row[tool])}")
        row["max_abs_diff"] = diff_cell(method, row, outs)
        rows[method] = row
    return floor, rows


def main() -> None:
    args = parse_args()
    if args.floor_only:
        floor_merge(*args.floor_only)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    paths = ensure_models(args.work_dir, args.scale)
    nbytes, seconds = warm_page_cache(paths.values())
    print(f"warmed the page cache: read all three models ({nbytes / 2**30:.2f} GiB) in {seconds:.1f}s")
    floor, rows = run_benchmark(args, paths)
    print(f"\nscale {args.scale}, device {args.device}, best of {args.repeat}, page cache warm\n")
    print(table(rows, floor))
    print_failures(rows, floor)
    result = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "scale": {"name": args.scale, **llama_config(args.scale)},
        "device": args.device,
        "repeat": args.repeat,
        "page_cache": "warm",
        "floor": asdict(floor),
        "methods": {
            m: {k: asdict(v) if isinstance(v, Measurement) else v for k, v in r.items()}
            for m, r in rows.items()
        },
    }
    json_path: Path = args.json or args.work_dir / "results.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
