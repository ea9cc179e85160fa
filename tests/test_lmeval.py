"""lm-eval tasks scored on the live in-memory model, offline, against a fresh lm-eval run from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from evomerge.checkpoints import ModelDir
from evomerge.errors import ConfigError
from evomerge.evaluators import HFBackend, TaskConfig, evaluate
from evomerge.zoo import Zoo

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (a dev dependency)")

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two local lm-eval tasks (dev and test) whose data files are relative to the task folder."""
    root = tmp_path_factory.mktemp("lmeval")
    folder = root / "tasks"
    folder.mkdir()
    for name, offset in (("sums_dev", 0), ("sums_test", 5)):
        rows = [
            {
                "q": f"Q: What is {a} plus {b}?\nA:",
                "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
                "gold": 0,
            }
            for a in range(offset, offset + 4)
            for b in range(2, 5)
        ]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=f"{name}.jsonl"))
    return root


def lmeval_task(**spec: Any) -> TaskConfig:
    return TaskConfig(
        name="sums",
        kind="lmeval",
        lmeval={"dev": "sums_dev", "test": "sums_test", "include_path": "tasks", **spec},
    )


def fresh_accuracy(model_dir: str, task_dir: Path, name: str) -> float:
    """lm-eval on its own: a new HFLM loading the checkpoint from disk."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    before = Path.cwd()
    os.chdir(task_dir / "tasks")
    try:
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model_dir, device="cpu", batch_size=8, dtype="float32"),
            tasks=[name],
            task_manager=TaskManager(include_path=str(task_dir / "tasks"), include_defaults=False),
            bootstrap_iters=0,
        )
    finally:
        os.chdir(before)
    assert out is not None
    return float(out["results"][name]["acc,none"])


def test_live_model_scores_equal_a_fresh_run_from_disk(micro_zoo: Zoo, task_dir: Path) -> None:
    backend = HFBackend.from_pretrained(micro_zoo.base, batch_size=8)
    task = lmeval_task()
    base_dev = evaluate(backend, [task], "dev", task_dir)
    assert base_dev.tasks["sums"].n == 12
    assert base_dev.scores["sums"] == pytest.approx(fresh_accuracy(micro_zoo.base, task_dir, "sums_dev"))
    # swap in an expert's weights in place: lm-eval sees them without reloading anything
    expert = micro_zoo.experts["arith"]
    with ModelDir(expert) as md:
        backend.load_state_dict({n: md.read(n).clone() for n in md.tensor_names()})
    expert_dev = evaluate(backend, [task], "dev", task_dir)
    assert expert_dev.scores["sums"] == pytest.approx(fresh_accuracy(expert, task_dir, "sums_dev"))
    assert expert_dev.scores["sums"] != base_dev.scores["sums"]  # the swap changed what lm-eval scored
    expert_test = evaluate(backend, [task], "test", task_dir)
    assert expert_test.scores["sums"] == pytest.approx(fresh_accuracy(expert, task_dir, "sums_test"))
    per_question = [r.score for r in expert_test.tasks["sums"].records]
    assert sum(per_question) / len(per_question) == pytest.approx(expert_test.scores["sums"])


def test_lmeval_task_errors(micro_zoo: Zoo, task_dir: Path) -> None:
    backend = HFBackend.from_pretrained(micro_zoo.base, batch_size=8)
    with pytest.raises(ConfigError, match="lm-eval has no task 'nope'"):
        evaluate(backend, [lmeval_task(dev="nope")], "dev", task_dir)
    with pytest.raises(ConfigError, match="has no metric 'bleu'"):
        evaluate(backend, [lmeval_task(metric="bleu")], "dev", task_dir)
    with pytest.raises(ConfigError, match="no lm-eval task for split 'test'"):
        evaluate(backend, [lmeval_task(test=None)], "test", task_dir)
    with pytest.raises(ConfigError, match="not a folder"):
        evaluate(backend, [lmeval_task(include_path="missing")], "dev", task_dir)
    with pytest.raises(ValueError, match="go together"):
        TaskConfig(name="x", kind="lmeval")
