"""The sweep configuration (``evomerge search CONFIG``): models, tasks, search space, sampler, budget."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.config_util import load_yaml, validate_model
from evomerge.errors import ConfigError
from evomerge.evaluators import TaskConfig
from evomerge.search_spaces import SearchSpaceConfig

SamplerName = Literal["tpe", "cmaes", "nsga2", "random", "nevergrad"]
_STUDY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str
    experts: tuple[str, ...] = Field(min_length=1)


class SamplerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: SamplerName = "cmaes"
    seed: int = 0
    n_startup_trials: int | None = Field(default=None, ge=0)
    population_size: int | None = Field(default=None, ge=2)
    optimizer: str = "NGOpt"
    """For ``name: nevergrad``: the nevergrad optimizer (``CMA``, ``NGOpt``, ``TwoPointsDE``, ...)."""
    start: Literal["best_seed", "center"] = "best_seed"
    """For ``name: cmaes``: centre the first search distribution on the best complete trial (the best
    seed recipe) or on the centre of the search space (Optuna's default)."""
    method_choice: Literal["learned", "uniform"] = "learned"
    """For ``cmaes`` and ``nevergrad`` with a ``methods:`` space: choose the method gene by a bandit over
    the trials so far (``learned``) or uniformly at random for every trial (``uniform``, the behaviour
    before evomerge learned it; kept for comparisons). TPE and NSGA-II always learn it themselves."""
    sigma0: float | None = Field(default=None, gt=0.0, le=1.0)
    """For ``name: cmaes``: the initial step size as a share of each parameter's range (default: 0.1 from
    the best seed, Optuna's 1/6 from the centre)."""


class FidelityConfig(BaseModel):
    """Multi-fidelity fitness: score a candidate on ``rungs`` questions per task first (fixed seeded subsets
    of dev, smallest first), report each rung's mean to Optuna (``trial.report``), and let the pruner stop
    candidates that are not competitive before the full dev set. Single-objective samplers only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rungs: tuple[int, ...] = ()
    anchors: int | None = Field(default=None, ge=1)
    """Instead of rungs: score each candidate first on this many *anchor questions* per task, chosen from
    the per-question answers of the complete trials so far (evomerge/optimizer/anchors.py), and report
    the full dev mean they estimate; a candidate goes on to the full dev set only if that estimate
    reaches the median (``pruner: percentile``: that percentile) of the complete trials' dev means.
    Candidates before ``n_startup_trials`` complete trials are scored on the full dev set at once."""
    pruner: Literal["median", "percentile"] = "median"
    percentile: float = Field(default=50.0, gt=0.0, lt=100.0)
    """For ``percentile``: a trial is pruned below this percentile of earlier trials at the same rung."""
    n_startup_trials: int = Field(default=5, ge=0)
    """Complete trials before any pruning."""

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(r < 1 for r in value) or list(value) != sorted(set(value)):
            raise ValueError("rungs must be positive and strictly increasing")
        return value

    @model_validator(mode="after")
    def _rungs_or_anchors(self) -> FidelityConfig:
        if bool(self.rungs) == (self.anchors is not None):
            raise ValueError(
                "fidelity: give rungs (question counts) or anchors (questions per task), one of them"
            )
        return self


class BackendConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["hf", "vllm"] = "hf"
    """``hf``: transformers; ``vllm``: one live vLLM engine, weights swapped in place per candidate."""
    kv_cache_gb: float | None = Field(default=None, gt=0.0)
    """vLLM only: KV-cache size (vLLM's CPU default can take over 10 GiB)."""
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(default=64, ge=1)
    threads: int | None = Field(default=None, ge=1)
    merge_device: str | None = None
    """Where the base and the task vectors stay resident and candidates are merged (default: ``device``).
    ``cpu`` frees the GPU for the engine when they do not fit beside it (7B, two experts: 91 GB float32);
    each candidate's merged weights are then copied to the GPU."""
    resident_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype the base and task vectors are kept in: bfloat16 halves their memory, at the cost of
    rounding the task vectors once (merging itself still computes in float32)."""


class ExecutorConfig(BaseModel):
    """Where candidates are evaluated: ``local`` (in this process, one at a time) or ``ray`` (a pool of
    ``workers`` actors, each holding the base, the task vectors and one live model, given candidates as
    soon as they are free). ``retries``: how many times a trial whose worker died is run again on the
    replacement worker before it is recorded as FAILED."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    retries: int = Field(default=1, ge=0)
    prefetch: int = Field(default=1, ge=0)
    """Ray only: candidates queued on each worker behind the running one, so it starts the next at once
    instead of waiting for the driver to record the result and ask the sampler (not with fidelity)."""
    address: str | None = None
    """Ray only: ``auto`` joins a running cluster; None starts a local Ray."""

    @model_validator(mode="after")
    def _check(self) -> ExecutorConfig:
        if self.kind == "local" and self.workers != 1:
            raise ValueError("workers: the local executor runs one candidate at a time (use kind: ray)")
        return self


class PickConfig(BaseModel):
    """The honest pick. The best of many noisy dev scores is biased upward (the winner's curse), so after
    the search the ``top_k`` complete trials by dev mean (nsga2: the Pareto front's members, by dev mean)
    are scored on the ``val`` split, questions the search never saw, and the best val mean is the pick
    (ties: the better dev mean) that is exported, materialized and compared on test. Tasks without a
    ``val`` file hold ``val_fraction`` of their dev questions back as val (the search scores the rest).
    ``top_k: 0`` or ``pick: null`` turns it off: the whole dev split is fitness and the best dev trial is
    the pick."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    top_k: int = Field(default=5, ge=0)
    val_fraction: float = Field(default=0.3, gt=0.0, lt=1.0)

    @property
    def enabled(self) -> bool:
        return self.top_k > 0


class PolishConfig(BaseModel):
    """Gradient polish (evomerge/optimizer/polish.py): the ``polish:`` stage of a sweep, which runs after
    the search and before the test report, and ``evomerge polish RUN_DIR``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    objective: Literal["ce", "kl", "entropy"] = "ce"
    steps: int = Field(default=200, ge=1)
    lr: float = Field(default=0.02, gt=0.0)
    batch_size: int = Field(default=16, ge=1)
    eval_every: int = Field(default=25, ge=1)
    patience: int = Field(default=3, ge=1)
    """Dev evaluations without a gain before training stops."""
    max_examples: int = Field(default=2000, ge=1)
    """Training prompts per task (a seeded draw when the file has more)."""
    max_len: int = Field(default=128, ge=8)
    seed: int = 0
    data: dict[str, str] = Field(default_factory=dict)
    """Task name -> JSONL of training prompts (``question``, ``answer``), instead of the default file."""
    domains: dict[str, str] = Field(default_factory=dict)
    """For ``kl``: task name -> expert (directory name or path) whose distribution is the target."""
    starts: tuple[Literal["pick", "uniform"], ...] = Field(default=("pick", "uniform"), min_length=1)
    """The sweep stage polishes each of these (the search's pick; uniform task arithmetic, weight 1/N) and
    keeps whichever of them and the unpolished pick has the best val mean."""

    @field_validator("starts")
    @classmethod
    def _distinct_starts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"starts: {list(v)} names a start twice")
        return v


class SweepConfig(BaseModel):
    """One sweep. Either ``zoo`` (a zoo preset or zoo YAML that provides models and tasks) or both
    ``models`` and ``tasks`` must be given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_name: str
    storage: str | None = None
    runs_dir: str = "runs"
    zoo: str | None = None
    models: ModelsConfig | None = None
    tasks: tuple[TaskConfig, ...] = ()
    data_dir: str | None = None
    search_space: SearchSpaceConfig = Field(default_factory=SearchSpaceConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    n_trials: int = Field(default=30, ge=1)
    # Known-good starting points, enqueued before the sampler takes over: a value per searched
    # parameter, the same for all layers (a scalar for all experts or a list with one per expert).
    seed_genomes: tuple[dict[str, float | list[float] | str], ...] = ()
    # Known-good recipes enqueued first: ``uniform`` (weight 1/N each, and each of ``baseline_weights``:
    # the report's uniform task-arithmetic baselines) and ``experts`` (each alone). On by default, so the
    # search's candidates include what the report compares it with; ``[]`` turns them off.
    seed_recipes: tuple[Literal["uniform", "experts"], ...] = ("uniform", "experts")
    # Weights of the uniform task-arithmetic baselines in the final report; 0 stands for 1/N.
    baseline_weights: tuple[float, ...] = (0.0, 1.0)
    materialize_best: bool = True
    backend: BackendConfig = Field(default_factory=BackendConfig)
    fidelity: FidelityConfig | None = None
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    pick: PickConfig | None = Field(default_factory=PickConfig)
    """Choose among the top trials on the held-back ``val`` split (see :class:`PickConfig`); null: off."""
    # The heterogeneous fusion stage after the search (evomerge.fusion.FusionConfig, validated by the CLI
    # that runs it: the optimizer does not depend on fusion): distils other-architecture sources into
    # the materialized best model.
    fusion: dict[str, Any] | None = None
    polish: PolishConfig | None = None
    """Gradient polish after the search (see :class:`PolishConfig`); null: none."""

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if not _STUDY_RE.match(self.study_name):
            raise ValueError(f"study_name: {self.study_name!r} must be letters, digits, '_', '-' or '.'")
        if self.zoo is None and (self.models is None or not self.tasks):
            raise ValueError("give either 'zoo' or both 'models' and 'tasks'")
        if self.zoo is not None and self.models is not None:
            raise ValueError("give 'zoo' or 'models', not both")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: duplicate task name in {names}")
        if self.fidelity is not None and self.multi_objective:
            raise ValueError("fidelity: pruning needs a single-objective sampler (not nsga2)")
        if self.search_space.layer_path is not None:
            if self.backend.kind != "hf":
                raise ValueError(
                    "search_space.layer_path: candidates change the layer count, which only the "
                    "transformers backend follows in memory (backend: {kind: hf})"
                )
            if self.polish is not None:
                raise ValueError("polish: trains merge coefficients; a layer-path search has none")
            if self.seed_genomes:
                raise ValueError("seed_genomes: parameter values; a layer-path search takes seed_recipes")
        if self.polish is not None:
            methods = self.search_space.candidate_methods
            if "pick" in self.polish.starts and methods != ("task_arithmetic",):
                raise ValueError(
                    f"polish: start 'pick' trains task-arithmetic coefficients, and this search space's "
                    f"method is {' / '.join(methods)} (search method: task_arithmetic, or polish starts: "
                    "[uniform])"
                )
            if self.backend.kind != "hf":
                raise ValueError("polish: needs the transformers backend (backend: {kind: hf})")
            if not self.pick_enabled:
                raise ValueError("polish: chooses among the polished starts on the val split; it needs pick")
        for i, task in enumerate(self.tasks):
            if not task.has_split("dev"):
                raise ValueError(
                    f"tasks[{i}] ({task.name!r}): no 'dev' data file; candidates are scored on dev only"
                )
        return self

    @property
    def multi_objective(self) -> bool:
        return self.sampler.name == "nsga2"

    @property
    def pick_enabled(self) -> bool:
        return self.pick is not None and self.pick.enabled

    def run_dir(self) -> Path:
        return (Path(self.runs_dir) / self.study_name).resolve()

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        # Four slashes: an absolute path, so the URL means the same from any working directory.
        return f"sqlite:///{self.run_dir() / 'study.db'}"


def load_sweep_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read a sweep YAML. Relative model and task-data paths are taken relative to the YAML's folder
    (``data_dir``); ``runs_dir`` and a zoo YAML path relative to the current directory, like a CLI's
    output paths."""
    p = Path(path)
    data = load_yaml(p)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a sweep config must be a YAML mapping")
    data.update(overrides or {})
    data.setdefault("data_dir", str(p.resolve().parent))
    return validate_model(SweepConfig, data, where=str(p))
