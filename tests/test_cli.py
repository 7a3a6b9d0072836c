"""The shared command-line conventions (tokenizers_jax.cli): one-line errors, exit statuses,
console log filtering by module name."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
from absl import app, flags
from ml_collections import config_flags

from tokenizers_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv, capsys, monkeypatch):
    """cli.parse_flags on a fresh flag set with a config-file flag -> (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["prog", *argv])  # config_flags reads overrides there
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                    lock_config=True)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(["prog", *argv], flag_values)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--config=configs/flowmo.py:tiny", "--config.optim.lrr=1e-3"],
     "error: --config.optim.lrr=1e-3: the config has no field 'optim.lrr'. "
     'Did you mean "lr" instead of "lrr"?'),
    (["--config=configs/flowmo.py:tiny", "--config.train.batch_size=abc"],
     "error: flag --config.train.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    (["--config=configs/flowmo.py:bogus"],
     "error: --config=configs/flowmo.py:bogus: unknown FlowMo variant 'bogus'; choose one of "
     "('lo', 'hi', 'lo_posttrain', 'hi_posttrain', 'tiny')"),
    (["--config=configs/missing.py"],
     "error: --config=configs/missing.py: cannot load the config file ([Errno 2] No such file "
     "or directory: 'configs/missing.py'); paths are relative to the current directory"),
])
def test_command_line_errors_are_one_line_with_status_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    status, stderr = _parse(argv, capsys, monkeypatch)
    assert status == cli.EXIT_USAGE
    lines = stderr.splitlines()
    assert lines[0] == message
    assert len(lines) == 2 and "--helpshort" in lines[1]


def test_failures_print_one_line_and_exit_1_unless_verbose(capsys, monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)

    def fails(argv):
        raise FileNotFoundError("no such directory: /missing; pass a model directory")

    assert cli.guard(fails)(["prog"]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err.splitlines() == [
        "error: no such directory: /missing; pass a model directory",
        f"(pass --verbose or set {cli.VERBOSE_ENV}=1 for the traceback)"]

    def misused(argv):
        raise app.UsageError("--step and --continuous exclude each other")

    assert cli.guard(misused)(["prog"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith(
        "error: --step and --continuous exclude each other\n")

    def bug(argv):
        return {}["missing"]

    assert cli.guard(bug)(["prog"]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err.startswith("error: KeyError: missing\n")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.guard(interrupted)(["prog"]) == cli.EXIT_INTERRUPTED

    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.guard(fails)(["prog"])


def test_convert_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from tokenizers_jax.convert.__main__ import main as convert_main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    status = cli.call(convert_main, ["flowmo", "--checkpoint", str(tmp_path / "missing.pth"),
                                     "--config", "configs/flowmo.py:lo",
                                     "--output", str(tmp_path / "out")])
    assert status == cli.EXIT_FAILURE
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: checkpoint file not found: {tmp_path / 'missing.pth'}")
    assert not os.path.exists(tmp_path / "out")


def _record(name, pathname, level=logging.INFO, msg="a line"):
    return logging.LogRecord(name, level, pathname, 1, msg, (), None)


def test_library_info_logs_are_filtered_by_module_name():
    import orbax.checkpoint.checkpoint_manager as orbax_manager

    keep = cli.LibraryLogFilter().filter
    # orbax logs through absl's shared logger: recognised by the module that made the call.
    assert not keep(_record("absl", orbax_manager.__file__))
    assert keep(_record("absl", orbax_manager.__file__, logging.WARNING))
    assert not keep(_record("jax._src.xla_bridge", "/anywhere/xla_bridge.py"))
    # Our own INFO lines stay, wherever the clone lives (even under a folder named jax).
    assert keep(_record("absl", "/home/me/jax/tokenizers_jax/tokenizers_jax/training/loop.py"))
    assert keep(_record("tokenizers_jax.data.pipeline", "/home/me/jax/x/pipeline.py"))
    # A library warning with a traceback is cut to its first line.
    try:
        raise OSError("disk full")
    except OSError:
        record = _record("absl", orbax_manager.__file__, logging.ERROR, "save failed\ndetails")
        record.exc_info = sys.exc_info()
    assert keep(record) and record.getMessage() == "save failed" and record.exc_info is None


def test_a_clone_under_a_folder_named_jax_still_logs_and_errors_in_one_line(tmp_path):
    """`evaluate --checkpoint /missing` from a clone in .../jax/: its INFO lines show, and the
    missing checkpoint is one line, before any network is loaded."""
    clone = tmp_path / "jax" / "tokenizers_jax"
    shutil.copytree(os.path.join(ROOT, "tokenizers_jax"), clone / "tokenizers_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "configs"), clone / "configs")
    script = ("import runpy, sys, tokenizers_jax; "
              "assert '/jax/' in tokenizers_jax.__file__, tokenizers_jax.__file__; "
              "sys.argv = ['evaluate', '--config=configs/flowmo.py:tiny', "
              "'--checkpoint=/missing/run']; "
              "runpy.run_module('tokenizers_jax.evaluate', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(clone))
    env.pop(cli.VERBOSE_ENV, None)
    result = subprocess.run([sys.executable, "-c", script], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == cli.EXIT_FAILURE, result.stderr[-3000:]
    assert "process 0/1" in result.stderr  # the INFO line the path filter used to hide
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: no such directory: /missing/run; --checkpoint must be a model "
                      "directory (config.json and params/, from python -m "
                      "tokenizers_jax.convert) or a training workdir (config.json and "
                      "checkpoints/)"]
    assert "Traceback" not in result.stderr
