"""``evomerge``: the command line. User errors print one line and exit 2; nothing outside this package
imports it.

This module builds the typer app and its command groups, registers the commands, and holds :func:`main`
(the console script's entry point), which turns errors into one line and an exit code.

Modules
-------
- ``display``: the consoles, the progress bar and the results table;
- ``checks``: checks done before any work (output paths, devices, option values);
- ``run_dir``: a sweep's run directory and its study, opened without creating anything;
- ``zoo_commands``: ``zoo build`` and ``checkpoints import-gguf``;
- ``merge_command``: ``merge``;
- ``eval_command``: ``eval``;
- ``search_command``: ``search``;
- ``run_commands``: ``export``, ``report`` and ``dashboard`` (commands on a finished run);
- ``fuse_command``: ``fuse`` and a sweep's ``fusion:`` stage;
- ``polish_command``: ``polish`` (gradient polish of a finished sweep's pick);
- ``jobs_commands``: ``submit`` and ``sweeps list | status | logs | stop`` (sweeps as Ray jobs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape

from evomerge import __version__
from evomerge.cli.display import console, err_console
from evomerge.cli.eval_command import eval_cmd
from evomerge.cli.fuse_command import fuse
from evomerge.cli.jobs_commands import submit, sweeps_app
from evomerge.cli.merge_command import merge
from evomerge.cli.polish_command import polish
from evomerge.cli.run_commands import dashboard, export, report
from evomerge.cli.search_command import SweepStopped, search
from evomerge.cli.zoo_commands import checkpoints_import_gguf, zoo_build
from evomerge.errors import EvomergeError

__all__ = ["app", "main"]

_CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="evomerge",
    help="Search merge recipes for LLMs: merge, evaluate, search, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=_CONTEXT,
)
zoo_app = typer.Typer(help="The small local expert zoo.", no_args_is_help=True, context_settings=_CONTEXT)
app.add_typer(zoo_app, name="zoo")
checkpoints_app = typer.Typer(
    help="Model checkpoints: import other formats.",
    no_args_is_help=True,
    context_settings=_CONTEXT,
)
app.add_typer(checkpoints_app, name="checkpoints")
# click's exception classes: click.exceptions, or the copy of click that typer (0.2x) carries inside it
_cli_errors: Any = sys.modules[typer.BadParameter.__module__]
_EXIT: tuple[type[BaseException], ...] = (typer.Exit, getattr(_cli_errors, "Exit", typer.Exit))
_ABORT: tuple[type[BaseException], ...] = (
    typer.Abort,
    getattr(_cli_errors, "Abort", typer.Abort),
    KeyboardInterrupt,
)
_NO_ARGS_HELP: Any = getattr(_cli_errors, "NoArgsIsHelpError", ())  # click >= 8.2; () matches nothing


def _print_version(value: bool) -> None:
    if value:
        console.print(f"evomerge {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Search merge recipes for LLMs: merge, evaluate, search, export."""
    _quiet_third_party()


def _quiet_third_party() -> None:
    """Silence what the user cannot act on: third-party deprecation warnings, transformers' advisory
    log lines and its tqdm bars (our own progress replaces them; tqdm bars also garble a log file)."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported: its settings were read, set them directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


zoo_app.command("build")(zoo_build)
checkpoints_app.command("import-gguf")(checkpoints_import_gguf)
app.command()(merge)
app.command("eval")(eval_cmd)
app.command()(search)
app.command()(export)
app.command()(report)
app.command()(fuse)
app.command()(dashboard)
app.command()(polish)
app.command()(submit)
app.add_typer(sweeps_app, name="sweeps")


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system at once.

    Merging allocates and frees many tensor-sized buffers; with glibc's defaults each fresh buffer is new
    memory whose pages fault in on first touch, which made elementwise kernels several times slower
    (measured in docs/benchmarks.md). Peak memory is unchanged: freed buffers are reused.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum: buffers up to 32 MiB come from the heap
    libc.mallopt(m_trim_threshold, 2**30)
    libc.mallopt(m_top_pad, 256 * 2**20)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one clear line and exit code 2 for user errors, never a traceback for them."""
    # PyTorch's CPU allocator backs buffers of 2 MB and more with transparent huge pages when asked
    # (read once, at torch's first allocation): 13x fewer page faults for a merge (docs/benchmarks.md).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _keep_freed_memory()
    try:
        code = app(args=list(argv) if argv is not None else None, standalone_mode=False, prog_name="evomerge")
    except EvomergeError as err:
        _fail(str(err), err.exit_code)
    except _EXIT as ex:
        sys.exit(getattr(ex, "exit_code", 1))
    except _NO_ARGS_HELP as err:  # `evomerge`, `evomerge zoo`: the help
        console.print(err.ctx.get_help(), markup=False, highlight=False)
        sys.exit(0)
    except _cli_errors.UsageError as err:  # unknown command or option, a bad or missing value
        _fail(_usage_message(err), 2)
    except _cli_errors.ClickException as err:
        _fail(err.format_message(), 2 if err.exit_code in (1, 2) else err.exit_code)
    except SweepStopped:
        err_console.print(
            "stopped: the unfinished trials were failed and queued again; run the sweep again to resume"
        )
        sys.exit(143)
    except _ABORT:
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as err:  # an unwritable output, a full disk, an unreadable input: not evomerge's fault
        _fail(_os_error_message(err), 2)
    except Exception as err:
        if os.environ.get("EVOMERGE_DEBUG"):
            raise
        err_console.print(
            f"[red]internal error:[/] {type(err).__name__}: {escape(str(err))} "
            "(set EVOMERGE_DEBUG=1 for a traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    if isinstance(code, int) and code != 0:  # typer.Exit(code), e.g. optuna-dashboard's exit status
        sys.exit(code)


def _usage_message(err: Any) -> str:
    """A usage error as one line: click's message, the closest names for an unknown option, and where
    the command's help is."""
    message = str(err.format_message())
    possibilities = sorted(getattr(err, "possibilities", None) or [])
    if isinstance(err, _cli_errors.NoSuchOption) and possibilities:
        message = f"{err.message}. Did you mean {' or '.join(possibilities)}?"
    hint = f" (see '{err.ctx.command_path} -h')" if err.ctx is not None else ""
    return message + hint


def _fail(message: str, exit_code: int) -> NoReturn:
    """Print ``error: MESSAGE`` as one line on stderr and exit."""
    line = " ".join(message.split())
    err_console.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)


def _os_error_message(err: OSError) -> str:
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    reason = err.strerror or str(err) or type(err).__name__
    return f"{' -> '.join(paths)}: {reason}" if paths else reason
