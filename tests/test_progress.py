"""Plain progress lines for logs (evomerge.progress) and the CLI's choice of them off a terminal."""

from __future__ import annotations

import io
import re

from evomerge.progress import PlainProgress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_format_duration() -> None:
    assert format_duration(0) == "0:00:00"
    assert format_duration(61.4) == "0:01:01"
    assert format_duration(3 * 3600 + 5) == "3:00:05"


def test_plain_lines_at_the_interval_with_rate_and_eta() -> None:
    out, clock = io.StringIO(), Clock()
    update = PlainProgress("search", out, interval=30, clock=clock)
    update("trial 0 complete · best 0.400", 1, 100)  # first update: printed
    for done in range(2, 11):  # one trial every 5 s: printed only once 30 s have passed
        clock.now += 5
        update(f"trial {done - 1} complete · best 0.500", done, 100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0] == "search 1/100  trial 0 complete · best 0.400  elapsed 0:00:00"
    # after 30 s, 6 more trials: 12/min, 93 left -> 7.75 min
    assert lines[1] == "search 7/100  trial 6 complete · best 0.500  12.0/min  elapsed 0:00:30  ETA 0:07:45"


def test_a_finished_step_always_prints_its_last_line() -> None:
    out, clock = io.StringIO(), Clock()
    update = PlainProgress("zoo", out, interval=1e9, clock=clock)
    update("base loss 1.000", 1, 3)
    clock.now += 1
    update("base loss 0.900", 2, 3)
    clock.now += 1
    update("expert loss 0.500", 3, 3)
    assert out.getvalue().splitlines() == [
        "zoo 1/3  base loss 1.000  elapsed 0:00:00",
        "zoo 3/3  expert loss 0.500  60.0/min  elapsed 0:00:02",
    ]


def test_cli_prints_plain_progress_lines_when_not_a_terminal(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from evomerge.cli import app
    from tests.conftest import NANO

    monkeypatch.setenv("EVOMERGE_PROGRESS_INTERVAL", "0")
    cfg = tmp_path / "nano.yaml"
    import json

    cfg.write_text(json.dumps(NANO.model_dump(mode="json")))
    result = CliRunner().invoke(
        app, ["zoo", "build", "--preset", str(cfg), "--cache-dir", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    total = NANO.base_steps + NANO.expert_steps * len(NANO.families)
    steps = re.findall(rf"^building zoo nano (\d+)/{total}  ", result.output, flags=re.M)
    assert [int(s) for s in steps] == list(range(1, total + 1))
    assert "\x1b[" not in result.output  # no terminal control codes in a log
    # no third-party noise: transformers' tqdm bars and deprecation lines
    assert "Writing model shards" not in result.output and "Loading weights" not in result.output
    assert "deprecated" not in result.output
