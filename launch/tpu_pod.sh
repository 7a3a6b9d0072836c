#!/usr/bin/env bash
# Trains tokenizers_jax on a Cloud TPU VM slice (one host or a pod) with gcloud.
#
#   launch/tpu_pod.sh up --name=flowmo-lo --zone=us-central2-b --accelerator-type=v4-32 \
#       --config=configs/flowmo.py:lo --workdir=gs://my-bucket/runs/flowmo_lo [--spot]
#   launch/tpu_pod.sh logs --name=flowmo-lo --zone=us-central2-b
#
# Every remote step runs on all workers at once (gcloud ... ssh --worker=all). --dry-run prints
# each command instead of running it. See launch/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Fixed places on every worker; $HOME stays unexpanded here and is the worker's own.
REMOTE_REPO="\$HOME/tokenizers_jax"
REMOTE_VENV="\$HOME/tokenizers_jax_venv"
REMOTE_LOGS="\$HOME/tokenizers_jax_logs"
REMOTE_ARCHIVE='tokenizers_jax_source.tar.gz'
MOUNT_ROOT=/gcs

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [OPTIONS] [-- FLAGS FOR THE TRAINER OR EVALUATOR]

Commands:
  create    create the TPU VM slice, or reuse it when it is READY (a PREEMPTED spot or
            preemptible slice cannot restart: it is deleted and created again)
  install   on every worker: fetch the repository at --ref (or upload this checkout with
            --copy), make a Python venv and pip install -e ".[tpu]"
  train     on every worker at once: python -m tokenizers_jax.train --config=... --workdir=...
            --distributed, detached (nohup), log in ~/tokenizers_jax_logs/train.log
  up        create, install and train
  evaluate  on every worker: python -m tokenizers_jax.evaluate --checkpoint=WORKDIR
            --continuous (use a separate, smaller slice: --name=...-eval)
  status    the slice's state and, on every worker, whether the job runs and its last log line
  logs      follow the log of one worker (--worker, default 0; --job=train|evaluate)
  stop      SIGTERM the job on every worker: the trainer saves at its next step boundary
  delete    delete the slice (the workdir in the bucket stays)

Options:
  --name=NAME               TPU VM name (required; or $TPU_NAME)
  --zone=ZONE               zone (required; or $TPU_ZONE)
  --project=PROJECT         project (default: gcloud's configured project)
  --accelerator-type=TYPE   e.g. v4-32, v5litepod-16, v6e-32 (default v4-32)
  --version=RUNTIME         TPU software version (default tpu-ubuntu2204-base)
  --spot | --preemptible    create a spot / preemptible slice
  --repo=URL                git URL to clone on the workers (default: this checkout's origin)
  --ref=REF                 commit, tag or branch to install (default: this checkout's HEAD)
  --copy                    upload this checkout's files (tracked and untracked, not ignored)
                            instead of cloning: for changes that are not pushed
  --python-version=VERSION  Python of the workers' venv, made with uv (default 3.11)
  --config=CONFIG           configs/<model>.py[:variant], relative to the repository
  --workdir=DIR             gs://BUCKET/PATH (mounted with Cloud Storage FUSE at /gcs/BUCKET
                            on every worker) or a directory that all workers share
  --mount=gs://BUCKET       mount one more bucket at /gcs/BUCKET (data, converted weights);
                            repeatable
  --env=NAME=VALUE          environment of the job on every worker (e.g.
                            TOKENIZERS_JAX_WEIGHTS=/gcs/BUCKET/weights); repeatable
  --worker=N                logs: the worker to follow (default 0)
  --job=train|evaluate      logs, status, stop: which job (default train)
  --dry-run                 print every command instead of running it
  -h, --help                this message

Flags after -- go to the trainer (train, up) or the evaluator (evaluate) unchanged.
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

# Prints a command so that a shell reads it back as the same words.
shell_quote() {
  local word quoted=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      quoted+=("$word")
    else
      quoted+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${quoted[*]}"
}

run() {
  if [[ $DRY_RUN == 1 ]]; then
    shell_quote "$@"
  else
    "$@"
  fi
}

# ---- options -------------------------------------------------------------------------------

COMMAND=${1:-}
[[ -n $COMMAND ]] || { usage >&2; exit 2; }
shift
case $COMMAND in
  -h | --help) usage; exit 0 ;;
  create | install | train | up | evaluate | status | logs | stop | delete) ;;
  *) usage >&2; die "unknown command '$COMMAND'" ;;
esac

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=
ACCELERATOR_TYPE=v4-32
RUNTIME_VERSION=tpu-ubuntu2204-base
CAPACITY=
REPO=
REF=
COPY=0
PYTHON_VERSION=3.11
CONFIG=
WORKDIR=
EXTRA_MOUNTS=()
JOB_ENV=()
WORKER=0
JOB=train
DRY_RUN=0
JOB_FLAGS=()

while (($#)); do
  case $1 in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --accelerator-type=*) ACCELERATOR_TYPE=${1#*=} ;;
    --version=*) RUNTIME_VERSION=${1#*=} ;;
    --spot) CAPACITY=--spot ;;
    --preemptible) CAPACITY=--preemptible ;;
    --repo=*) REPO=${1#*=} ;;
    --ref=*) REF=${1#*=} ;;
    --copy) COPY=1 ;;
    --python-version=*) PYTHON_VERSION=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --workdir=*) WORKDIR=${1#*=} ;;
    --mount=*) EXTRA_MOUNTS+=("${1#*=}") ;;
    --env=*)
      [[ ${1#*=} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects NAME=VALUE, got '${1#*=}'"
      JOB_ENV+=("${1#*=}") ;;
    --worker=*) WORKER=${1#*=} ;;
    --job=*) JOB=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; JOB_FLAGS=("$@"); break ;;
    *) die "unknown option '$1' (options take the form --name=VALUE; see --help)" ;;
  esac
  shift
done

for flag in "${JOB_FLAGS[@]+"${JOB_FLAGS[@]}"}"; do
  [[ $flag != --dry-run ]] || die "--dry-run after -- would reach the trainer: put it before --"
done
[[ -n $NAME ]] || die "--name is required (or set TPU_NAME)"
[[ -n $ZONE ]] || die "--zone is required (or set TPU_ZONE)"
[[ $JOB == train || $JOB == evaluate ]] || die "--job must be train or evaluate, got '$JOB'"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index, got '$WORKER'"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
SCOPE=(--zone="$ZONE")
[[ -z $PROJECT ]] || SCOPE+=(--project="$PROJECT")

# ---- the workdir and the buckets to mount --------------------------------------------------

bucket_of() {  # gs://BUCKET/PATH -> BUCKET
  local rest=${1#gs://}
  echo "${rest%%/*}"
}

MOUNT_BUCKETS=()
add_mount() {
  [[ $1 == gs://?* ]] || die "--mount expects gs://BUCKET, got '$1'"
  local bucket existing
  bucket=$(bucket_of "$1")
  for existing in "${MOUNT_BUCKETS[@]+"${MOUNT_BUCKETS[@]}"}"; do
    [[ $existing == "$bucket" ]] && return
  done
  MOUNT_BUCKETS+=("$bucket")
}

# The trainer and the evaluator read and write workdirs through the local filesystem, so a
# gs:// workdir is mounted on every worker and passed as its /gcs/BUCKET/PATH path.
WORKER_WORKDIR=$WORKDIR
if [[ $WORKDIR == gs://* ]]; then
  [[ $WORKDIR == gs://?*/?* ]] || die "--workdir=gs://BUCKET/PATH needs a path inside the bucket"
  add_mount "$WORKDIR"
  WORKER_WORKDIR="$MOUNT_ROOT/${WORKDIR#gs://}"
  WORKER_WORKDIR=${WORKER_WORKDIR%/}
fi
for mount in "${EXTRA_MOUNTS[@]+"${EXTRA_MOUNTS[@]}"}"; do
  add_mount "$mount"
done

# ---- remote scripts (one line each: statements joined by '; ') ------------------------------

join_statements() {
  local IFS=$'\x1f'
  local joined="$*"
  echo "${joined//$'\x1f'/; }"
}

quote_words() {  # words -> one string a remote shell splits back into the same words
  local word out=()
  for word in "$@"; do
    out+=("$(printf '%q' "$word")")
  done
  echo "${out[*]}"
}

install_statements() {
  local statements=(
    "set -euo pipefail"
  )
  if [[ $COPY == 1 ]]; then
    statements+=(
      "rm -rf \"$REMOTE_REPO\""
      "mkdir -p \"$REMOTE_REPO\""
      "tar -xzf \"\$HOME/$REMOTE_ARCHIVE\" -C \"$REMOTE_REPO\""
    )
  else
    local repo ref
    repo=$(printf '%q' "$REPO")
    ref=$(printf '%q' "$REF")
    statements+=(
      "if [ -d \"$REMOTE_REPO/.git\" ]; then git -C \"$REMOTE_REPO\" fetch --quiet --tags origin; else git clone --quiet $repo \"$REMOTE_REPO\"; fi"
      "ref=$ref"
      "commit=\$(git -C \"$REMOTE_REPO\" rev-parse --verify --quiet \"origin/\$ref^{commit}\" || git -C \"$REMOTE_REPO\" rev-parse --verify \"\$ref^{commit}\")"
      "git -C \"$REMOTE_REPO\" checkout --quiet --detach \"\$commit\""
    )
  fi
  statements+=(
    "[ -x \"\$HOME/.local/bin/uv\" ] || curl -LsSf https://astral.sh/uv/install.sh | sh"
    "[ -x \"$REMOTE_VENV/bin/python\" ] || \"\$HOME/.local/bin/uv\" venv --quiet --seed --python $(printf '%q' "$PYTHON_VERSION") \"$REMOTE_VENV\""
    "\"$REMOTE_VENV/bin/python\" -m pip install --quiet --upgrade pip"
    "\"$REMOTE_VENV/bin/python\" -m pip install --quiet -e \"${REMOTE_REPO}[tpu]\""
    "echo \"\$(hostname): installed \$(git -C \"$REMOTE_REPO\" rev-parse --short HEAD 2>/dev/null || echo 'an uploaded copy')\""
  )
  join_statements "${statements[@]}"
}

# Statements that install Cloud Storage FUSE (when missing) and mount each bucket at /gcs/BUCKET.
mount_statements() {
  ((${#MOUNT_BUCKETS[@]})) || return 0
  echo "if ! command -v gcsfuse >/dev/null; then echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; sudo apt-get update -qq; sudo apt-get install -y -qq gcsfuse; fi"
  local bucket dir
  for bucket in "${MOUNT_BUCKETS[@]}"; do
    dir="$MOUNT_ROOT/$bucket"
    echo "if ! mountpoint -q $dir; then sudo mkdir -p $dir; sudo chown \"\$USER\" $dir; gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket $dir; fi"
  done
}

# Starts "$@" detached in the repository on this worker, unless the same job already runs.
job_statements() {
  local job=$1
  shift
  local log="$REMOTE_LOGS/$job.log" pidfile="$REMOTE_LOGS/$job.pid"
  local statements=("set -euo pipefail")
  local line environment=
  ((${#JOB_ENV[@]} == 0)) || environment="env $(quote_words "${JOB_ENV[@]}") "
  while IFS= read -r line; do
    statements+=("$line")
  done < <(mount_statements)
  statements+=(
    "mkdir -p \"$REMOTE_LOGS\""
    "if [ -f \"$pidfile\" ] && kill -0 \"\$(cat \"$pidfile\")\" 2>/dev/null; then echo \"\$(hostname): $job already runs (pid \$(cat \"$pidfile\")); stop it first\" >&2; exit 1; fi"
    "cd \"$REMOTE_REPO\""
    "echo \"==== \$(date -u +%Y-%m-%dT%H:%M:%SZ) starting $job\" >> \"$log\""
    "nohup ${environment}\"$REMOTE_VENV/bin/python\" -m $(quote_words "$@") >> \"$log\" 2>&1 < /dev/null & echo \$! > \"$pidfile\""
    "echo \"\$(hostname): $job started (pid \$!), log $log\""
  )
  join_statements "${statements[@]}"
}

status_statements() {
  local log="$REMOTE_LOGS/$JOB.log" pidfile="$REMOTE_LOGS/$JOB.pid"
  join_statements \
    "if [ -f \"$pidfile\" ] && kill -0 \"\$(cat \"$pidfile\")\" 2>/dev/null; then state=\"running (pid \$(cat \"$pidfile\"))\"; else state='not running'; fi" \
    "echo \"\$(hostname): $JOB \$state; last log line: \$(tail -n 1 \"$log\" 2>/dev/null || echo none)\""
}

stop_statements() {
  local pidfile="$REMOTE_LOGS/$JOB.pid"
  join_statements \
    "if [ -f \"$pidfile\" ] && kill -0 \"\$(cat \"$pidfile\")\" 2>/dev/null; then pid=\$(cat \"$pidfile\"); kill -TERM \"\$pid\"; echo \"\$(hostname): sent SIGTERM to $JOB (pid \$pid)\"; for _ in \$(seq 600); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done; if kill -0 \"\$pid\" 2>/dev/null; then echo \"\$(hostname): $JOB still runs after 10 minutes\" >&2; else echo \"\$(hostname): $JOB exited\"; fi; else echo \"\$(hostname): $JOB not running\"; fi"
}

on_all_workers() {
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all --command="$1"
}

# ---- commands ------------------------------------------------------------------------------

tpu_state() {  # READY, PREEMPTED, ... or nothing when the slice does not exist
  "${GCLOUD_TPU[@]}" describe "$NAME" "${SCOPE[@]}" --format='value(state)' 2>/dev/null || true
}

create_tpu() {
  local create=("${GCLOUD_TPU[@]}" create "$NAME" "${SCOPE[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ -z $CAPACITY ]] || create+=("$CAPACITY")
  if [[ $DRY_RUN == 1 ]]; then
    echo "# create: the slice is reused when this reports READY, created when it reports nothing"
    shell_quote "${GCLOUD_TPU[@]}" describe "$NAME" "${SCOPE[@]}" --format='value(state)'
    shell_quote "${create[@]}"
    return
  fi
  local state
  state=$(tpu_state)
  case $state in
    READY)
      echo "reusing $NAME ($ACCELERATOR_TYPE is not checked: the slice keeps its own type)"
      return ;;
    PREEMPTED)
      echo "$NAME was preempted and cannot restart: deleting it and creating it again"
      "${GCLOUD_TPU[@]}" delete "$NAME" "${SCOPE[@]}" --quiet ;;
    "") ;;
    *) die "$NAME exists in state $state; wait until it is READY, or delete it" ;;
  esac
  "${create[@]}"
}

install_project() {
  if [[ $COPY == 1 ]]; then
    local archive
    if [[ $DRY_RUN == 1 ]]; then
      archive=${TMPDIR:-/tmp}/tokenizers_jax_source.tar.gz
      echo "# pack the checkout's files (tracked and untracked, not ignored) into $archive"
    else
      archive=$(mktemp -t tokenizers_jax_source.XXXXXX)
      (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do [[ -e $file ]] && printf '%s\0' "$file"; done |
        tar --null -T - -czf "$archive")
    fi
    run "${GCLOUD_TPU[@]}" scp "$archive" "$NAME:$REMOTE_ARCHIVE" "${SCOPE[@]}" --worker=all
    [[ $DRY_RUN == 1 ]] || rm -f "$archive"
  else
    if [[ -z $REPO ]]; then
      REPO=$(git -C "$ROOT" remote get-url origin 2>/dev/null) ||
        die "this checkout has no 'origin' remote: pass --repo=URL, or --copy to upload it"
    fi
    if [[ -z $REF ]]; then
      REF=$(git -C "$ROOT" rev-parse HEAD)
      if [[ $DRY_RUN == 0 && -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
        echo "note: uncommitted changes are not installed (commit and push them, or use --copy)" >&2
      fi
    fi
  fi
  on_all_workers "$(install_statements)"
}

require_job_settings() {
  [[ -n $WORKDIR ]] || die "--workdir is required for $COMMAND"
  [[ -n $CONFIG ]] || die "--config is required for $COMMAND"
}

start_training() {
  require_job_settings
  on_all_workers "$(job_statements train tokenizers_jax.train --config="$CONFIG" \
    --workdir="$WORKER_WORKDIR" --distributed "${JOB_FLAGS[@]+"${JOB_FLAGS[@]}"}")"
}

start_evaluation() {
  require_job_settings
  on_all_workers "$(job_statements evaluate tokenizers_jax.evaluate --config="$CONFIG" \
    --checkpoint="$WORKER_WORKDIR" --continuous --distributed "${JOB_FLAGS[@]+"${JOB_FLAGS[@]}"}")"
}

case $COMMAND in
  create) create_tpu ;;
  install) install_project ;;
  train) start_training ;;
  up)
    require_job_settings
    create_tpu
    install_project
    start_training ;;
  evaluate) start_evaluation ;;
  status)
    run "${GCLOUD_TPU[@]}" describe "$NAME" "${SCOPE[@]}" \
      --format='table(name.basename(),state,health,acceleratorType,schedulingConfig)'
    on_all_workers "$(status_statements)" ;;
  logs)
    run "${GCLOUD_TPU[@]}" ssh "$NAME" "${SCOPE[@]}" --worker="$WORKER" \
      --command="tail -n 200 -F \"$REMOTE_LOGS/$JOB.log\"" ;;
  stop) on_all_workers "$(stop_statements)" ;;
  delete) run "${GCLOUD_TPU[@]}" delete "$NAME" "${SCOPE[@]}" --quiet ;;
esac
