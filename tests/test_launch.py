"""launch/: shellcheck, each script's dry-run commands, their remote and per-task snippets run
here against stand-ins for gcloud/srun/scontrol, and the SLURM script's local mode training
with two processes on this machine.

shellcheck: CI installs it (.ci/run). Where it is missing the check fails when $CI is set and is
skipped, with the reason, otherwise, so that the README's test command still passes on a machine
without it.
"""

import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tokenizers_jax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
SCOPE = ["--zone=us-central2-b", "--project=my-project"]
POD = ["--name=pod", *SCOPE]


def _executable(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return str(path)


def _shellcheck():
    executable = shutil.which("shellcheck")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed; .ci/run installs it (apt-get install -y "
                        "shellcheck)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); with $CI set "
                    "this is a failure")
    return executable


def _check_shell(script_text):
    """A remote or per-task snippet parses as bash and (where shellcheck is installed) is clean."""
    parsed = subprocess.run(["bash", "-n", "-c", script_text], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    if shutil.which("shellcheck"):
        checked = subprocess.run(["shellcheck", "-s", "bash", "-"], input=script_text,
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize("script", [TPU_POD, SLURM, os.path.join(ROOT, ".ci", "run")],
                         ids=["tpu_pod.sh", "slurm_gpu.sbatch", "ci_run"])
def test_shellcheck_is_clean(script):
    result = subprocess.run([_shellcheck(), script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---- launch/tpu_pod.sh -------------------------------------------------------------------------


@pytest.fixture
def gcloud_log(tmp_path, monkeypatch):
    """A stand-in gcloud first on PATH: records each call's arguments (one per line)."""
    log = tmp_path / "gcloud_calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "gcloud", f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {shlex.quote(str(log))}
if [[ $* == *" scp "* ]]; then cp "$5" {shlex.quote(str(tmp_path / "uploaded.tar.gz"))}; fi
""")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def _tpu(*args, check=True):
    result = subprocess.run(["bash", TPU_POD, *args], capture_output=True, text=True, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _dry_run(*args):
    """The commands that tpu_pod.sh --dry-run prints, each split into its words."""
    split = args.index("--") if "--" in args else len(args)
    output = _tpu(*args[:split], "--dry-run", *args[split:]).stdout
    return [shlex.split(line) for line in output.splitlines() if line and not line.startswith("#")]


def _ssh_all(command):
    """The remote script of a `gcloud ... ssh pod --worker=all --command=SCRIPT` command."""
    assert command[:-1] == [*GCLOUD_TPU, "ssh", "pod", *SCOPE, "--worker=all"], command
    assert command[-1].startswith("--command=")
    script = command[-1][len("--command="):]
    _check_shell(script)
    return script


def test_create_describes_then_creates_and_dry_run_calls_nothing(gcloud_log):
    commands = _dry_run("create", *POD, "--accelerator-type=v5litepod-16",
                        "--version=v2-alpha-tpuv5-lite", "--spot")
    assert commands == [
        [*GCLOUD_TPU, "describe", "pod", *SCOPE, "--format=value(state)"],
        [*GCLOUD_TPU, "create", "pod", *SCOPE, "--accelerator-type=v5litepod-16",
         "--version=v2-alpha-tpuv5-lite", "--spot"],
    ]
    preemptible = _dry_run("create", "--name=pod", "--zone=z", "--preemptible")
    assert preemptible[1] == [*GCLOUD_TPU, "create", "pod", "--zone=z", "--accelerator-type=v4-32",
                              "--version=tpu-ubuntu2204-base", "--preemptible"]
    assert not gcloud_log.exists()


def test_create_reuses_a_ready_slice(gcloud_log, tmp_path):
    # The stand-in's describe prints nothing; make it report READY instead.
    bin_gcloud = tmp_path / "bin" / "gcloud"
    bin_gcloud.write_text(bin_gcloud.read_text() + 'if [[ $* == *describe* ]]; then echo READY; fi\n')
    result = _tpu("create", *POD)
    assert "reusing pod" in result.stdout
    calls = gcloud_log.read_text().splitlines()
    assert calls == [" ".join([*GCLOUD_TPU[1:], "describe", "pod", *SCOPE, "--format=value(state)"])]


def test_install_clones_the_ref_and_pip_installs_the_tpu_extra():
    (command,) = _dry_run("install", *POD, "--repo=https://example.org/tokenizers_jax.git",
                          "--ref=abc1234")
    script = _ssh_all(command)
    statements = script.split("; ")
    assert statements[0] == "set -euo pipefail"
    assert ('git clone --quiet https://example.org/tokenizers_jax.git "$HOME/tokenizers_jax"'
            in script)
    assert "ref=abc1234" in statements
    assert 'rev-parse --verify "$ref^{commit}"' in script
    assert 'git -C "$HOME/tokenizers_jax" checkout --quiet --detach "$commit"' in statements
    assert ('[ -x "$HOME/tokenizers_jax_venv/bin/python" ] || "$HOME/.local/bin/uv" venv --quiet '
            '--seed --python 3.11 "$HOME/tokenizers_jax_venv"') in statements
    assert ('"$HOME/tokenizers_jax_venv/bin/python" -m pip install --quiet -e '
            '"$HOME/tokenizers_jax[tpu]"') in statements


def test_install_copy_uploads_this_checkout_to_every_worker(gcloud_log, tmp_path):
    _tpu("install", *POD, "--copy")
    scp, ssh = [line.split(" ") for line in gcloud_log.read_text().splitlines()]
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:] == ["pod:tokenizers_jax_source.tar.gz", *SCOPE, "--worker=all"]
    assert not os.path.exists(scp[4]), "the local archive is left behind"
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / "uploaded.tar.gz")],
                             capture_output=True, text=True, check=True).stdout.split()
    assert {"launch/tpu_pod.sh", "pyproject.toml", "tokenizers_jax/train.py"} <= set(listing)
    assert not any(name.startswith(".git/") for name in listing)
    assert ssh[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
    (dry_ssh,) = [c for c in _dry_run("install", *POD, "--copy") if c[4] == "ssh"]
    assert ('tar -xzf "$HOME/tokenizers_jax_source.tar.gz" -C "$HOME/tokenizers_jax"'
            in _ssh_all(dry_ssh))


def test_train_mounts_the_bucket_and_starts_the_trainer_on_all_workers():
    (command,) = _dry_run("train", *POD, "--config=configs/flowmo.py:lo",
                          "--workdir=gs://my-bucket/runs/flowmo_lo", "--mount=gs://data-bucket",
                          "--", "--config.train.num_steps=1000")
    script = _ssh_all(command)
    assert ("if ! mountpoint -q /gcs/my-bucket; then sudo mkdir -p /gcs/my-bucket; sudo chown "
            '"$USER" /gcs/my-bucket; gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket '
            "/gcs/my-bucket; fi") in script
    assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 data-bucket /gcs/data-bucket" in script
    assert ('nohup "$HOME/tokenizers_jax_venv/bin/python" -m tokenizers_jax.train '
            "--config=configs/flowmo.py:lo --workdir=/gcs/my-bucket/runs/flowmo_lo --distributed "
            '--config.train.num_steps=1000 >> "$HOME/tokenizers_jax_logs/train.log" 2>&1 '
            '< /dev/null & echo $! > "$HOME/tokenizers_jax_logs/train.pid"') in script


def test_up_creates_installs_and_trains_in_that_order():
    commands = _dry_run("up", *POD, "--repo=r", "--ref=v1", "--config=configs/flowmo.py:lo",
                        "--workdir=gs://b/run")
    assert [c[4] for c in commands] == ["describe", "create", "ssh", "ssh"]
    assert "git clone" in _ssh_all(commands[2])
    assert "-m tokenizers_jax.train --config=configs/flowmo.py:lo --workdir=/gcs/b/run" in (
        _ssh_all(commands[3]))


def test_evaluate_follows_the_workdir_continuously():
    (command,) = _dry_run("evaluate", "--name=pod", *SCOPE, "--config=configs/flowmo.py:lo",
                          "--workdir=gs://b/run", "--env=TOKENIZERS_JAX_WEIGHTS=/gcs/b/weights",
                          "--", "--config.eval.inception_path=/gcs/b/w")
    assert ('nohup env TOKENIZERS_JAX_WEIGHTS=/gcs/b/weights "$HOME/tokenizers_jax_venv/bin/python"'
            " -m tokenizers_jax.evaluate --config=configs/flowmo.py:lo --checkpoint=/gcs/b/run "
            "--continuous --distributed --config.eval.inception_path=/gcs/b/w >> "
            '"$HOME/tokenizers_jax_logs/evaluate.log"') in _ssh_all(command)


def test_status_logs_stop_delete():
    status = _dry_run("status", *POD)
    assert status[0][:8] == [*GCLOUD_TPU, "describe", "pod", *SCOPE]
    assert "train.pid" in _ssh_all(status[1])
    assert _dry_run("logs", *POD, "--worker=3", "--job=evaluate") == [
        [*GCLOUD_TPU, "ssh", "pod", *SCOPE, "--worker=3",
         '--command=tail -n 200 -F "$HOME/tokenizers_jax_logs/evaluate.log"']]
    (stop,) = _dry_run("stop", *POD)
    assert 'kill -TERM "$pid"' in _ssh_all(stop)
    assert _dry_run("delete", *POD) == [[*GCLOUD_TPU, "delete", "pod", *SCOPE, "--quiet"]]


@pytest.mark.parametrize("args, message", [
    (["train", "--zone=z"], "--name is required"),
    (["train", "--name=pod"], "--zone is required"),
    (["launch", *POD], "unknown command 'launch'"),
    (["train", *POD, "--workdir", "gs://b/r"], "unknown option '--workdir'"),
    (["train", *POD, "--config=c", "--workdir=gs://bucket"], "needs a path inside the bucket"),
    (["train", *POD, "--workdir=gs://b/r"], "--config is required"),
    (["logs", *POD, "--job=eval"], "--job must be train or evaluate"),
    (["train", *POD, "--env=WEIGHTS"], "--env expects NAME=VALUE"),
    (["train", *POD, "--config=c", "--workdir=w", "--", "--dry-run"], "put it before --"),
])
def test_usage_errors_name_the_problem(args, message):
    result = _tpu(*args, "--dry-run", check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def _remote(command_words, home):
    script = _ssh_all(command_words)
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, HOME=str(home)), timeout=60)


def test_remote_job_scripts_start_report_refuse_twice_and_stop(tmp_path):
    """The train/status/stop scripts, run here on a fake worker home with a stand-in trainer."""
    home = tmp_path / "home"
    (home / "tokenizers_jax").mkdir(parents=True)
    (home / "tokenizers_jax_venv" / "bin").mkdir(parents=True)
    _executable(home / "tokenizers_jax_venv" / "bin" / "python", """#!/usr/bin/env bash
echo "trainer argv: $*"
trap 'echo "SIGTERM: saving at the next step"; exit 0' TERM
while true; do sleep 0.1; done
""")
    args = [*POD, "--config=configs/flowmo.py:tiny", "--workdir=/shared/run"]
    (train,) = _dry_run("train", *args)
    (status,) = _dry_run("status", *POD)[1:]
    (stop,) = _dry_run("stop", *POD)
    pidfile = home / "tokenizers_jax_logs" / "train.pid"
    try:
        started = _remote(train, home)
        assert started.returncode == 0 and "train started" in started.stdout, started.stderr
        assert "train running (pid" in _remote(status, home).stdout
        again = _remote(train, home)
        assert again.returncode == 1 and "already runs" in again.stderr
        stopped = _remote(stop, home)
        assert "sent SIGTERM" in stopped.stdout and "train exited" in stopped.stdout, stopped
        assert "train not running" in _remote(status, home).stdout
    finally:
        if pidfile.exists():
            subprocess.run(["kill", "-KILL", pidfile.read_text().strip()], capture_output=True)
    log = (home / "tokenizers_jax_logs" / "train.log").read_text()
    assert ("trainer argv: -m tokenizers_jax.train --config=configs/flowmo.py:tiny "
            "--workdir=/shared/run --distributed") in log
    assert "SIGTERM: saving at the next step" in log


# ---- launch/slurm_gpu.sbatch -------------------------------------------------------------------

JOB_ID = 4242
PORT = 61440 + JOB_ID % 4096


@pytest.fixture
def slurm(tmp_path):
    """Stand-ins for scontrol and srun, and the environment of a 2-node job."""
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    record = tmp_path / "slurm_calls"
    _executable(bin_dir / "scontrol", f"""#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-a01\\ngpu-a02\\n'; exit 0; fi
printf 'scontrol %s\\n' "$*" >> {shlex.quote(str(record))}
""")
    _executable(bin_dir / "srun", f"""#!/usr/bin/env bash
printf 'srun %s\\n' "$*" >> {shlex.quote(str(record))}
exit "${{FAKE_SRUN_STATUS:-0}}"
""")
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=str(JOB_ID),
               SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="gpu-a[01-02]",
               SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96", SLURM_SUBMIT_DIR=ROOT)
    env.pop("JAX_COORDINATOR_PORT", None)
    return env, record


def _sbatch(env, *args, check=True):
    result = subprocess.run(["bash", SLURM, *args], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


LO = ["--config=configs/flowmo.py:lo", "--workdir=/shared/runs/lo"]


def _srun_words(output):
    (line,) = [line for line in output.splitlines() if line.startswith("srun ")]
    return shlex.split(line)


def _run_wrapper(wrapper, env):
    """Runs a per-task wrapper around a Python that prints its device ids and arguments."""
    probe = [sys.executable, "-c",
             "import os, sys; print(os.environ.get('JAX_LOCAL_DEVICE_IDS'), sys.argv[1:])"]
    _check_shell(wrapper)
    return subprocess.run(["bash", "-c", wrapper, "tokenizers_jax_task", *probe, "--flag"],
                          capture_output=True, text=True, env=env, check=True).stdout.strip()


def test_one_task_per_node_takes_all_its_gpus(slurm):
    env, _ = slurm
    output = _sbatch(env, "--dry-run", *LO, "--", "--config.train.num_steps=5").stdout
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in output.splitlines()
    words = _srun_words(output)
    assert words[:5] == ["srun", "--kill-on-bad-exit=1", "--label", "--ntasks-per-node=1",
                         "--cpus-per-task=96"]
    assert words[5:7] == ["bash", "-c"]
    assert words[8:] == [
        "tokenizers_jax_task", "python", "-m", "tokenizers_jax.train",
        "--config=configs/flowmo.py:lo", "--workdir=/shared/runs/lo", "--distributed",
        "--exit_code_on_preemption=0",
        f"--coordinator_address=gpu-a01:{PORT}", "--num_processes=2",
        "--config.train.num_steps=5"]
    task_env = dict(env, SLURM_PROCID="1", SLURM_LOCALID="0",
                    JAX_LOCAL_DEVICE_IDS="0,1,2,3,4,5,6,7")
    assert _run_wrapper(words[7], task_env) == "0,1,2,3,4,5,6,7 ['--flag', '--process_id=1']"


def test_one_task_per_gpu_takes_its_own_gpu(slurm):
    env, _ = slurm
    env = dict(env, SLURM_NTASKS="16", SLURM_GPUS_PER_NODE="h100:8")
    del env["SLURM_GPUS_ON_NODE"]
    output = _sbatch(env, "--dry-run", *LO, "--port=7000").stdout
    assert "JAX_LOCAL_DEVICE_IDS" not in output.split("srun ")[0]
    words = _srun_words(output)
    assert words[3:5] == ["--ntasks-per-node=8", "--cpus-per-task=12"]
    assert "--coordinator_address=gpu-a01:7000" in words and "--num_processes=16" in words
    task = dict(env, SLURM_PROCID="13", SLURM_LOCALID="5")
    all_visible = dict(task, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert _run_wrapper(words[7], all_visible) == "5 ['--flag', '--process_id=13']"
    bound = dict(task, CUDA_VISIBLE_DEVICES="5")  # SLURM bound one GPU to the task
    assert _run_wrapper(words[7], bound) == "0 ['--flag', '--process_id=13']"


@pytest.mark.parametrize("change, message", [
    (dict(SLURM_NTASKS="8"), "use --ntasks-per-node=1 (one process per node) or --ntasks-per-node=8"),
    (dict(SLURM_NTASKS="3"), "3 tasks do not spread evenly over 2 nodes"),
    (dict(SLURM_GPUS_ON_NODE=None), "pass --gpus-per-node=N"),
    (dict(SLURM_JOB_ID=None), "not inside a SLURM job"),
])
def test_slurm_layout_errors(slurm, change, message):
    env = dict(slurm[0])
    for name, value in change.items():
        if value is None:
            del env[name]
        else:
            env[name] = value
    result = _sbatch(env, "--dry-run", *LO, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def _fake_python(tmp_path, progress):
    """A --python stand-in: answers the progress queries with `progress` lines, in order."""
    queue = tmp_path / "progress"
    queue.write_text("".join(f"{line}\n" for line in progress))
    return _executable(tmp_path / "python", f"""#!/usr/bin/env bash
[[ $1 == - ]] || exit 9
cat > /dev/null
head -n 1 {queue}
sed -i 1d {queue}
""")


@pytest.mark.parametrize("srun_status, before, after, flags, status, requeued, message", [
    (0, "-1 -1", "100 100", [], 0, False, "training finished: step 100 of 100"),
    (0, "-1 -1", "40 100", [], 0, True, "training stopped at step 40 of 100: requeueing job 4242"),
    (0, "40 100", "40 100", [], 1, False, "without a new checkpoint since the start"),
    (0, "-1 -1", "40 100", ["--no-requeue"], 0, False, "--no-requeue: resubmit to resume"),
    (3, "-1 -1", None, [], 3, False, "training exited with status 3: not requeueing"),
], ids=["finished", "preempted", "no-progress", "no-requeue", "failed"])
def test_requeue_only_after_progress_short_of_the_last_step(
        slurm, tmp_path, srun_status, before, after, flags, status, requeued, message):
    env, record = slurm
    python = _fake_python(tmp_path, [before] + ([after] if after else []))
    result = _sbatch(dict(env, FAKE_SRUN_STATUS=str(srun_status)), *LO, f"--python={python}",
                     *flags, check=False)
    assert result.returncode == status and message in result.stdout, result.stdout + result.stderr
    calls = record.read_text().splitlines()
    assert calls[0].startswith("srun --kill-on-bad-exit=1 --label")
    assert calls[0].endswith(f"-m tokenizers_jax.train --config=configs/flowmo.py:lo "
                             f"--workdir=/shared/runs/lo --distributed "
                             f"--exit_code_on_preemption=0 --coordinator_address=gpu-a01:{PORT} --num_processes=2")
    assert (f"scontrol requeue {JOB_ID}" in calls) == requeued


def test_local_dry_run_prints_one_cpu_process_per_id():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    output = _sbatch(env, "--local=2", "--dry-run", "--port=9999", "--config=configs/flowmo.py:tiny",
                     "--workdir=/tmp/run", "--", "--config.train.num_steps=2").stdout
    assert output.splitlines() == [
        f"JAX_PLATFORMS=cpu python -m tokenizers_jax.train --config=configs/flowmo.py:tiny "
        f"--workdir=/tmp/run --distributed --exit_code_on_preemption=0 "
        f"--coordinator_address=127.0.0.1:9999 --num_processes=2 "
        f"--config.train.num_steps=2 --process_id={i}" for i in range(2)]
    misplaced = _sbatch(env, "--local=2", "--config=c", "--workdir=w", "--", "--dry-run", check=False)
    assert misplaced.returncode == 2 and "put it before --" in misplaced.stderr


def _local_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    env.pop("XLA_FLAGS", None)
    return env


def _wait_for(path, text, process, deadline_seconds=600):
    deadline = time.time() + deadline_seconds
    while text not in (path.read_text() if path.exists() else ""):
        assert process.poll() is None, path.read_text()[-4000:]
        assert time.time() < deadline, f"never saw {text!r}: {path.read_text()[-4000:]}"
        time.sleep(0.5)


def test_local_mode_two_processes_train_together_and_stop_on_sigterm(tmp_path):
    """Two processes of the toy task (tests/toy_config_file.py) through the script's local mode;
    SIGTERM to the script reaches both, which stop at one step boundary and save there."""
    workdir, log = tmp_path / "run", tmp_path / "output"
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["bash", SLURM, "--local=2", "--config=tests/toy_config_file.py", f"--workdir={workdir}",
             "--", "--config.train.num_steps=100000", "--config.checkpoint.every=100000",
             "--config.eval.every=0"], cwd=ROOT, env=_local_env(), stdout=out,
            stderr=subprocess.STDOUT)
    try:
        _wait_for(log, "step 3/100000", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "started 2 processes" in output and "forwarding SIGTERM" in output
    stops = {line.split("stopped by SIGTERM at step ")[1].split()[0]
             for line in output.splitlines() if "stopped by SIGTERM at step " in line}
    assert len(stops) == 1, stops  # both processes stopped at the same step
    (step,) = stops
    assert f"training stopped at checkpoint step {step} of 100000" in output
    assert checkpoint.latest_step(str(workdir)) == int(step) >= 3
    assert sorted(os.listdir(workdir / "checkpoints" / step / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


TINY_FLOWMO = [
    "--config=configs/flowmo.py:tiny", "--config.train.num_steps=2", "--config.train.batch_size=4",
    "--config.model.image_size=16", "--config.data.image_size=16", "--config.model.code_length=4",
    "--config.model.context_dim=4", "--config.model.codebook_size_for_entropy=2",
    *[f"--config.model.{side}.{field}" for side in ("encoder", "decoder") for field in (
        "hidden_size=32", "num_heads=2", "depth=1", "axes_dim=(4,6,6)")],
    "--config.eval.every=0", "--config.checkpoint.every=2", "--config.logging.every=1",
]


@pytest.mark.slow
def test_local_mode_two_processes_train_tiny_flowmo(tmp_path):
    """The tiny FlowMo config, shrunk further, for two steps on two processes (minutes: the
    train step's compile dominates)."""
    workdir = tmp_path / "run"
    result = subprocess.run(
        ["bash", SLURM, "--local=2", TINY_FLOWMO[0], f"--workdir={workdir}", "--", *TINY_FLOWMO[1:]],
        cwd=ROOT, env=_local_env(), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "training finished: step 2 of 2" in result.stdout
    assert checkpoint.latest_step(str(workdir)) == 2
    assert sorted(os.listdir(workdir / "checkpoints" / "2" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len([row for row in rows if '"train/loss"' in row]) == 2  # written by process 0 only
