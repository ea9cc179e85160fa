"""Export a trial's recipe from a study (YAML), and optionally materialize the merged model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge.atomic_io import write_text_atomic
from evomerge.errors import ConfigError, OutputExistsError
from evomerge.merging import MergeRecipe, merge_streaming
from evomerge.optimizer.study import PICK_ATTR, best_trial, val_attr


@dataclass(frozen=True)
class RunInfo:
    """What ``runs/<study>/sweep.json`` records about a sweep."""

    run_dir: Path
    study_name: str
    storage: str
    data: dict[str, Any]


def load_run(run_dir: str | Path) -> RunInfo:
    root = Path(run_dir)
    meta = root / "sweep.json"
    if not meta.is_file():
        raise ConfigError(f"{root} is not a sweep run directory (no sweep.json); run 'evomerge search' first")
    data = json.loads(meta.read_text())
    return RunInfo(root, data["config"]["study_name"], data["storage"], data)


def load_study(storage: str, study_name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"no study {study_name!r} in {storage}") from None


def val_note(study: optuna.Study, number: int) -> str:
    """``, val mean X (picked on val)`` for the trial the study records as its pick, ``, val mean X`` for
    another trial scored on val, else empty."""
    record = study.user_attrs.get(val_attr(number))
    if not isinstance(record, dict) or "mean" not in record:
        return ""
    pick = study.user_attrs.get(PICK_ATTR)
    picked = isinstance(pick, dict) and pick.get("trial") == number
    return f", val mean {float(record['mean']):.4f}" + (" (picked on val)" if picked else "")


def pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """The chosen trial (must be complete), or the sweep's pick (:func:`best_trial`: the best val score
    among the top dev trials once the final report has run, else the best dev trial)."""
    if number is None:
        return best_trial(study)
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not trials:
        raise ConfigError(f"study {study.study_name!r} has no trial {number}")
    if trials[0].state != TrialState.COMPLETE or "recipe" not in trials[0].user_attrs:
        raise ConfigError(f"trial {number} is {trials[0].state.name}, not a complete trial with a recipe")
    return trials[0]


def trial_recipe(trial: FrozenTrial) -> MergeRecipe:
    return MergeRecipe.model_validate(trial.user_attrs["recipe"])


def export_trial(
    study: optuna.Study,
    out: Path,
    *,
    trial: int | None = None,
    materialize: Path | None = None,
    overwrite: bool = False,
    progress: Any = None,
    fmt: str = "evomerge",
) -> tuple[FrozenTrial, MergeRecipe]:
    """Write the trial's recipe to ``out`` (YAML); with ``materialize``, also merge it to that directory.

    ``fmt`` is ``evomerge`` (our recipe format) or ``mergekit`` (a configuration ``mergekit-yaml`` reads;
    RecipeError for methods mergekit lacks)."""
    if fmt not in ("evomerge", "mergekit"):
        raise ConfigError(f"--format must be evomerge or mergekit, got {fmt!r}")
    chosen = pick_trial(study, trial)
    recipe = trial_recipe(chosen)
    text = recipe.to_mergekit_yaml() if fmt == "mergekit" else recipe.to_yaml()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    if materialize is not None and materialize.exists() and not overwrite:
        raise OutputExistsError(f"{materialize} exists; pass --overwrite to replace it")
    header = (
        f"# evomerge: study {study.study_name}, trial {chosen.number}, "
        f"dev mean {float(chosen.user_attrs['mean']):.4f}{val_note(study, chosen.number)}\n"
    )
    write_text_atomic(out, header + text, overwrite=overwrite)
    if materialize is not None:
        merge_streaming(recipe, materialize, overwrite=overwrite, progress=progress)
    return chosen, recipe


def uniform_task_arithmetic(base: str, experts: Sequence[str], weight: float) -> MergeRecipe:
    """Task arithmetic with one weight for every expert (the report's uniform baselines, polish's
    ``uniform`` start)."""
    return MergeRecipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": e, "parameters": {"weight": weight}} for e in experts],
            "dtype": "float32",
        }
    )
