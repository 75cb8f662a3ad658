#!/usr/bin/env bash
# Runs ON every Cloud TPU VM worker. infra/launch_tpu_vm.sh copies it to ~/jcdm_tpu_worker.sh with
# `gcloud compute tpus tpu-vm scp --worker=all` and calls it with `tpu-vm ssh --worker=all`.
#
#   jcdm_tpu_worker.sh setup --commit SHA (--tarball FILE | --repo-url URL) [--extras tpu]
#                            [--secrets FILE] [--data gs://BUCKET/DIR]...
#       Unpack (or clone) the code at SHA into ~/jcdm/code/SHA and `pip install -e '.[EXTRAS]'` it
#       into ~/jcdm/venv; copy each --data directory once to ~/jcdm/data/NAME (the trainer reads
#       local files only) and link it as data/NAME in the code directory. Idempotent.
#   jcdm_tpu_worker.sh run --run-id ID --commit SHA --nonce HEX [--env K=V]... -- TRAINER_ARGS...
#       Start `python -m jcdm TRAINER_ARGS` from ~/jcdm/code/SHA, detached from this ssh session,
#       appending to ~/jcdm/runs/ID/trainer.log; stream that log to stdout with a [worker] prefix,
#       then print `JCDM_EXIT_CODE nonce=HEX worker=W rc=N` and exit N. The launcher's random
#       nonce is never given to the trainer, so its output cannot forge this line. If a trainer for the same run is still
#       alive (the previous ssh connection dropped) and was started with the same arguments, it is
#       re-attached instead of started twice; if its arguments differ it is stopped first.
#   jcdm_tpu_worker.sh stop --run-id ID
#       SIGTERM the trainer (it writes a checkpoint and exits 75), SIGKILL after JCDM_STOP_GRACE_S.
#
# Environment: JCDM_ROOT (~/jcdm), JCDM_WORKER_ID (hostname), JCDM_BOOTSTRAP_PYTHON (python3),
# JCDM_WORKER_POLL_S (1), JCDM_STOP_GRACE_S (300).
set -euo pipefail

ROOT=${JCDM_ROOT:-$HOME/jcdm}
WORKER=${JCDM_WORKER_ID:-$(hostname)}
POLL_S=${JCDM_WORKER_POLL_S:-1}
STOP_GRACE_S=${JCDM_STOP_GRACE_S:-300}
BOOTSTRAP_PYTHON=${JCDM_BOOTSTRAP_PYTHON:-python3}
VENV=$ROOT/venv
SELF=$(readlink -f "${BASH_SOURCE[0]}")

say() { printf '[%s %s] %s\n' "$WORKER" "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
  say "ERROR: $*"
  exit 2
}

check_commit() { [[ $1 =~ ^[0-9a-f]{7,40}$ ]] || die "bad --commit '$1' (want a hex sha)"; }
check_run_id() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || die "bad --run-id '$1'"; }

# ---------------------------------------------------------------------------------------- setup
cmd_setup() {
  local commit="" tarball="" repo_url="" extras="tpu" secrets="" uri
  local -a data=()
  while (($#)); do
    (($# >= 2)) || die "setup: $1 needs a value"
    case $1 in
      --data) data+=("$2") ;;
      --commit) commit=$2 ;;
      --tarball) tarball=$2 ;;
      --repo-url) repo_url=$2 ;;
      --extras) extras=$2 ;;
      --secrets) secrets=$2 ;;
      *) die "setup: unknown argument '$1'" ;;
    esac
    shift 2
  done
  check_commit "$commit"
  [[ -n $tarball || -n $repo_url ]] || die "setup: need --tarball or --repo-url"
  mkdir -p "$ROOT/code" "$ROOT/runs"
  chmod 700 "$ROOT"

  if [[ -n $secrets ]]; then
    install -m 600 "$secrets" "$ROOT/secrets.env"
    rm -f "$secrets"
  else
    rm -f "$ROOT/secrets.env" # an earlier launch's --env values must not leak into this run
  fi

  local code=$ROOT/code/$commit
  if [[ ! -f $code/.jcdm-complete ]]; then
    rm -rf "$code.tmp"
    mkdir -p "$code.tmp"
    if [[ -n $tarball ]]; then
      say "unpacking $tarball"
      tar -xzf "$tarball" -C "$code.tmp" --strip-components=1
    else
      say "cloning $repo_url at $commit"
      rm -rf "$code.tmp"
      git clone --quiet "$repo_url" "$code.tmp"
      git -C "$code.tmp" checkout --quiet --detach "$commit"
    fi
    touch "$code.tmp/.jcdm-complete"
    rm -rf "$code"
    mv "$code.tmp" "$code"
  fi
  [[ -z $tarball ]] || rm -f "$tarball"

  if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV"
    if ! "$BOOTSTRAP_PYTHON" -m venv "$VENV"; then
      # Some images lack python3-venv; virtualenv from the user site works without root.
      "$BOOTSTRAP_PYTHON" -m pip install --quiet --user virtualenv
      "$BOOTSTRAP_PYTHON" -m virtualenv --quiet "$VENV"
    fi
  fi
  local want="${commit}[${extras}]"
  if [[ $(cat "$VENV/.jcdm-installed" 2>/dev/null || true) != "$want" ]]; then
    say "pip install -e '.[$extras]' at $commit"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "${code}[${extras}]"
    (cd "$code" && "$VENV/bin/python" -c 'import jcdm') || die "jcdm does not import after install"
    printf '%s\n' "$want" >"$VENV/.jcdm-installed"
  fi
  for uri in "${data[@]}"; do stage_data "$uri" "$code"; done
  say "setup ok: code=$code venv=$VENV"
}

stage_data() { # URI CODE_DIR: copy a bucket directory to local disk once, link it into the code
  local uri=${1%/} code=$2 name dst
  [[ $uri == gs://?*/?* ]] || die "--data wants gs://BUCKET/DIR, got '$1'"
  name=$(basename "$uri")
  dst=$ROOT/data/$name
  if [[ ! -f $dst/.jcdm-staged ]]; then
    say "copying $uri to $dst"
    mkdir -p "$dst"
    if command -v gcloud >/dev/null; then
      gcloud storage rsync --recursive "$uri" "$dst"
    else
      gsutil -m rsync -r "$uri" "$dst"
    fi
    touch "$dst/.jcdm-staged"
  fi
  mkdir -p "$code/data"
  ln -sfn "$dst" "$code/data/$name"
}

# ------------------------------------------------------------------------------ trainer control
# The detached wrapper: the trainer's parent, so it alone can always record the exit status, even
# when the ssh session (and the streaming shell) is gone. It traps TERM/INT so that a signal sent
# to the whole group lets the trainer checkpoint while the wrapper keeps waiting for it.
cmd_wrap() {
  local pidfile=$1 exitfile=$2
  shift 2
  trap 'true' TERM INT
  "$@" &
  local child=$! rc=0
  printf '%s\n' "$child" >"$pidfile"
  while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  printf '%s\n' "$rc" >"$exitfile.tmp"
  mv -f "$exitfile.tmp" "$exitfile"
  printf '=== trainer exited rc=%s at %s\n' "$rc" "$(date -u +%FT%TZ)"
  exit "$rc"
}

# True if process $1 exists and is not a zombie (an orphaned wrapper stays a zombie until init
# reaps it, and `kill -0` alone would call it alive).
alive() {
  local st
  kill -0 "$1" 2>/dev/null || return 1
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  st=${st##*) }
  [[ ${st:0:1} != Z ]]
}

# Prints the wrapper pid if the wrapper of run dir $1 is alive.
live_wrapper() {
  local rundir=$1 pid
  pid=$(cat "$rundir/wrapper.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qx -- "_wrap" || return 1
  printf '%s\n' "$pid"
}

# Waits for wrapper $2 of run dir $1 to exit; prints the trainer's exit code (1 if unknown).
await_wrapper() {
  local rundir=$1 wpid=$2 i
  while alive "$wpid"; do sleep "$POLL_S"; done
  for ((i = 0; i < 20; i++)); do
    if [[ -s $rundir/exit_code ]]; then
      cat "$rundir/exit_code"
      return 0
    fi
    sleep 0.5
  done
  say "trainer exit code was not recorded; reporting a failure"
  echo 1
}

stop_trainer() {
  local rundir=$1 wpid=$2 tpid deadline=$((SECONDS + STOP_GRACE_S))
  tpid=$(cat "$rundir/trainer.pid" 2>/dev/null || true)
  say "sending SIGTERM to trainer ${tpid:-?} (wrapper $wpid); it should checkpoint and exit 75"
  if [[ -n $tpid ]]; then kill -TERM "$tpid" 2>/dev/null || true; fi
  while alive "$wpid"; do
    if ((SECONDS >= deadline)); then
      say "trainer still alive after ${STOP_GRACE_S}s; SIGKILL"
      if [[ -n $tpid ]]; then kill -KILL "$tpid" 2>/dev/null || true; fi
      break
    fi
    sleep "$POLL_S"
  done
  await_wrapper "$rundir" "$wpid" >/dev/null
}

stream() { # file, wrapper pid, tail start option: streams until the wrapper exits
  local log=$1 wpid=$2 start=$3
  tail "$start" -F --pid="$wpid" -s "$POLL_S" "$log" 2>/dev/null | sed -u "s/^/[$WORKER] /" || true
}

NONCE=""
marker() {
  printf 'JCDM_EXIT_CODE nonce=%s worker=%s rc=%s\n' "$NONCE" "$WORKER" "$1"
  exit "$1"
}

# ------------------------------------------------------------------------------------------ run
cmd_run() {
  local run_id="" commit="" kv
  local -a envs=()
  while (($#)); do
    case $1 in
      --run-id) run_id=$2 && shift 2 ;;
      --commit) commit=$2 && shift 2 ;;
      --nonce) NONCE=$2 && shift 2 ;;
      --env) envs+=("$2") && shift 2 ;;
      --) shift && break ;;
      *) die "run: unknown argument '$1'" ;;
    esac
  done
  [[ $NONCE =~ ^[0-9a-f]{16,64}$ ]] || die "run: --nonce HEX (16-64 hex digits) is required"
  check_run_id "$run_id"
  check_commit "$commit"
  local code=$ROOT/code/$commit rundir=$ROOT/runs/$run_id
  [[ -f $code/.jcdm-complete && -x $VENV/bin/python ]] || die "code $commit not set up; run setup"
  mkdir -p "$rundir"
  local log=$rundir/trainer.log fp wpid
  local secrets_fp=""
  [[ ! -f $ROOT/secrets.env ]] || secrets_fp=$(sha256sum <"$ROOT/secrets.env" | cut -c1-64)
  # The launcher's lease token changes with each launcher session: not part of the identity.
  local -a fp_envs=()
  for kv in "${envs[@]}"; do [[ $kv == JCDM_LEASE_TOKEN=* ]] || fp_envs+=("$kv"); done
  fp=$(printf '%s\0' "$commit" "${fp_envs[@]}" "$secrets_fp" "$@" | sha256sum | cut -c1-32)

  if wpid=$(live_wrapper "$rundir"); then
    if [[ $(cat "$rundir/fingerprint" 2>/dev/null || true) == "$fp" ]]; then
      say "re-attaching to the running trainer of $run_id (wrapper $wpid)"
      stream "$log" "$wpid" "-n20"
      marker "$(await_wrapper "$rundir" "$wpid")"
    fi
    say "a trainer of $run_id with different arguments is running; stopping it first"
    stop_trainer "$rundir" "$wpid"
  fi

  for kv in "${envs[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env '$kv' (want NAME=VALUE)"
    export "${kv?}"
  done
  if [[ -f $ROOT/secrets.env ]]; then
    set -a
    # shellcheck source=/dev/null
    source "$ROOT/secrets.env"
    set +a
  fi
  export WANDB_DIR=${WANDB_DIR:-$rundir}
  export PYTHONUNBUFFERED=1

  local offset
  offset=$(stat -c %s "$log" 2>/dev/null || echo 0)
  printf '=== %s start run=%s commit=%s worker=%s\n' "$(date -u +%FT%TZ)" "$run_id" "$commit" \
    "$WORKER" >>"$log"
  rm -f "$rundir/exit_code" "$rundir/trainer.pid"
  printf '%s\n' "$fp" >"$rundir/fingerprint"
  cd "$code"
  nohup bash "$SELF" _wrap "$rundir/trainer.pid" "$rundir/exit_code" \
    "$VENV/bin/python" -m jcdm "$@" >>"$log" 2>&1 </dev/null &
  wpid=$!
  printf '%s\n' "$wpid" >"$rundir/wrapper.pid"
  stream "$log" "$wpid" "-c+$((offset + 1))"
  local rc=0
  wait "$wpid" || rc=$?
  marker "$rc"
}

cmd_stop() {
  local run_id=""
  while (($#)); do
    case $1 in
      --run-id) run_id=$2 && shift 2 ;;
      *) die "stop: unknown argument '$1'" ;;
    esac
  done
  check_run_id "$run_id"
  local rundir=$ROOT/runs/$run_id wpid
  if ! wpid=$(live_wrapper "$rundir"); then
    say "no trainer of $run_id is running"
    return 0
  fi
  stop_trainer "$rundir" "$wpid"
  say "trainer of $run_id stopped (exit code $(cat "$rundir/exit_code" 2>/dev/null || echo '?'))"
}

main() {
  (($#)) || die "usage: $0 setup|run|stop ..."
  local sub=$1
  shift
  case $sub in
    setup) cmd_setup "$@" ;;
    run) cmd_run "$@" ;;
    stop) cmd_stop "$@" ;;
    _wrap) cmd_wrap "$@" ;;
    *) die "unknown subcommand '$sub'" ;;
  esac
}

main "$@"
