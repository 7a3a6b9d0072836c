"""The conventions every command-line entry point shares: errors, exit statuses, console logs.

    def main(argv): ...                     # an absl entry point (train, evaluate, benchmark)
    if __name__ == "__main__":
        cli.run(main)

    def main(argv) -> int: ...              # an argparse entry point (convert)
    if __name__ == "__main__":
        sys.exit(cli.call(main))

What a user sees:
  - A failure prints `error: <what happened and what to do>` on stderr, plus one line saying
    how to get the traceback: `--verbose` (absl entry points) or TOKENIZERS_JAX_VERBOSE=1
    (any entry point) shows it instead.
  - Exit statuses: 0 done, 1 the run failed, 2 the command line could not be parsed (unknown
    flag, config typo, bad flag value, missing config file), 75 (EX_TEMPFAIL) training stopped
    by SIGTERM/SIGINT after saving a checkpoint (`train --exit_code_on_preemption` changes it),
    130 interrupted without saving.
  - Console logs: INFO records of orbax, grain, jax and asyncio are dropped (a dozen per
    checkpoint); their warnings and errors stay, one line each, without the traceback. The
    source of a record is its logger's name, or for absl's shared logger the name of the module
    that made the call; never a substring of a file path.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later"; schedulers may requeue on it
EXIT_INTERRUPTED = 130  # 128 + SIGINT

VERBOSE_ENV = "TOKENIZERS_JAX_VERBOSE"
_VERBOSE = flags.DEFINE_bool("verbose", False, "show tracebacks and every library log line "
                             f"(also ${VERBOSE_ENV}=1)")

# Top-level packages whose INFO records stay off the console.
QUIET_PACKAGES = ("orbax", "grain", "jax", "jaxlib", "asyncio")

# Exception types that signal a bug rather than a bad input; their name is printed too.
_BUG_TYPES = (AssertionError, AttributeError, IndexError, KeyError, NameError,
              NotImplementedError, UnboundLocalError, ZeroDivisionError, RecursionError)


def verbose(argv: list[str] | None = None) -> bool:
    """Whether tracebacks were asked for: $TOKENIZERS_JAX_VERBOSE, or --verbose."""
    if os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no"):
        return True
    if flags.FLAGS.is_parsed():
        return _VERBOSE.value
    return "--verbose" in (sys.argv if argv is None else argv)


def describe(error: BaseException) -> str:
    """The user-facing text of an exception: its message, prefixed by its type for bugs."""
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        message = error.args[0]
    else:
        message = str(error)
    message = message.strip() or type(error).__name__
    if isinstance(error, _BUG_TYPES):
        return f"{type(error).__name__}: {message}"
    return message


def print_error(message: str, hint: bool = True):
    """`error: message` on stderr, and how to see the traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if hint:
        print(f"(pass --verbose or set {VERBOSE_ENV}=1 for the traceback)", file=sys.stderr,
              flush=True)


def _program() -> str:
    main_module = sys.modules.get("__main__")
    spec = getattr(main_module, "__spec__", None)
    return f"python -m {spec.name}" if spec and spec.name else os.path.basename(sys.argv[0])


# --------------------------------------------------------------------------- flag parsing


def _innermost_message(error: BaseException) -> str:
    """ConfigDict wraps KeyErrors in AttributeErrors; the text is in the innermost one."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)


def _unknown_field_message(error: BaseException, argv: list[str]) -> str:
    """`--config.optim.lrr=1e-3: the config has no field optim.lrr. Did you mean "lr"...?`"""
    text = _innermost_message(error)
    first, _, rest = text.partition("\n")
    key = first.strip().strip("'\"")
    for arg in argv:
        name = arg.lstrip("-").split("=", 1)[0]
        parts = name.split(".")
        if arg.startswith("--") and len(parts) > 1 and key in parts[1:]:
            path = ".".join(parts[1:])
            return f"{arg}: the config has no field {path!r}. {rest.strip()}".strip()
    return f"the config has no field {key!r}. {rest.strip()}".strip()


def _flag_error_message(error: BaseException, argv: list[str]) -> str:
    if isinstance(error, (KeyError, AttributeError)):
        return _unknown_field_message(error, argv)
    message = str(error).strip()
    marker = ": Error whilst parsing config file:"
    if marker in message:  # get_config raised; its message is the traceback's last line
        where = message.split(marker)[0].removeprefix("flag ")
        cause = [line.strip() for line in message.splitlines() if line.strip()][-1]
        cause = cause.split(": ", 1)[1] if ": " in cause else cause
        return f"{where}: {cause}"
    return message


def _load_config_files(flag_values: flags.FlagValues):
    """ml_collections defers a missing config file's error to first use; raise it now."""
    for name in list(flag_values):
        flag = flag_values[name]
        try:
            filename = config_flags.get_config_filename(flag)
        except (TypeError, flags.Error):  # not a config-file flag, or not given
            continue
        try:
            getattr(flag.value, "keys")
        except OSError as e:
            reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
            raise app.UsageError(
                f"--{name}={filename}: cannot load the config file ({reason}); paths are "
                "relative to the current directory") from e


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl's flag parsing with one-line errors and exit status 2 (the `flags_parser` of
    `app.run`)."""
    try:
        remaining = flag_values(argv)
        _load_config_files(flag_values)
        return remaining
    except (flags.Error, app.UsageError, KeyError, AttributeError, OSError, ValueError,
            TypeError) as e:
        if verbose(argv):
            raise
        if isinstance(e, app.UsageError):
            message = str(e)
        else:
            message = _flag_error_message(e, argv)
        print_error(message, hint=False)
        print(f"({_program()} --helpshort lists the flags)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# --------------------------------------------------------------------------- console logs


@functools.lru_cache(maxsize=None)
def _module_of_file(path: str) -> str:
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == path:
            return name
    return ""


def record_source(record: logging.LogRecord) -> str:
    """The module name a log record came from: its logger's name, or for records of absl's
    shared "absl" logger (orbax and grain log through it) the module that made the call."""
    if record.name != "absl":
        return record.name
    return _module_of_file(record.pathname) or record.name


class LibraryLogFilter(logging.Filter):
    """Keeps the console readable: library INFO dropped, library warnings on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        package = record_source(record).split(".")[0]
        if package not in QUIET_PACKAGES:
            return True
        if record.levelno < logging.WARNING:
            return False
        if record.exc_info or "\n" in record.getMessage():
            record.msg, record.args = record.getMessage().splitlines()[0], ()
            record.exc_info = record.exc_text = None
        return True


def install_console_filter():
    """Applies `LibraryLogFilter` to absl's console handler (idempotent)."""
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, LibraryLogFilter) for f in handler.filters):
        handler.addFilter(LibraryLogFilter())


# --------------------------------------------------------------------------- entry points


def guard(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int | None]:
    """`main` with the error conventions: one-line errors and exit statuses 1, 2 and 130."""

    @functools.wraps(main)
    def guarded(argv):
        if not verbose(argv):
            install_console_filter()
        try:
            return main(argv)
        except app.UsageError as e:
            print_error(str(e), hint=False)
            print(f"({_program()} --helpshort lists the flags)", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            if verbose(argv):
                raise
            print_error("interrupted", hint=False)
            return EXIT_INTERRUPTED
        except Exception as e:  # pylint: disable=broad-exception-caught
            if verbose(argv):
                raise
            print_error(describe(e))
            return EXIT_FAILURE

    return guarded


def run(main: Callable[[list[str]], int | None]) -> NoReturn:
    """Runs an absl `main(argv)` with these conventions (replaces `app.run(main)`)."""
    app.run(guard(main), flags_parser=parse_flags)


def call(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Runs an argparse `main(argv) -> status` with these conventions; returns the status.

    `--verbose` anywhere in argv is taken out and asks for tracebacks.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:
        argv.remove("--verbose")
        os.environ[VERBOSE_ENV] = "1"
    status = guard(main)(argv)
    return 0 if status is None else int(status)
