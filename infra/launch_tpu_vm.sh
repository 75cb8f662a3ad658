#!/usr/bin/env bash
# Train jcdm on a (spot) Cloud TPU VM and keep it training until it finishes.
#
#   infra/launch_tpu_vm.sh --gin gin/joint.gin [options] [gin bindings...]
#
# Creates or reuses the TPU VM (spot via queued resources by default), ships the code at a commit
# to every worker, installs it, starts the same `python -m jcdm` command on all workers, streams
# their logs, and supervises: when the trainer exits 75 (checkpointed after a preemption notice) or
# the VM is reclaimed, the VM is recreated and the same run id is relaunched, which resumes from the
# last checkpoint in the workdir and continues the same W&B run. Exit 0 ends the loop; 2 and 3 are
# never retried; other failures are retried --max-failures times in a row. See docs/operations.md.
set -euo pipefail

INFRA_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$INFRA_DIR/.." && pwd)

usage() {
  cat <<'EOF'
Usage: infra/launch_tpu_vm.sh --gin FILE [options] [GIN_BINDING...] [-- GIN_BINDING...]

Training
  --gin FILE               gin config inside this repo (required), e.g. gin/joint.gin
  -b, --gin_bindings B     one gin binding, repeatable; bare arguments, --gin.KEY=VALUE and all
                           after `--` are bindings too: 'train.num_steps=1000' "wandb.project='p q'"
  --workdir URI            checkpoints/logs; default gs://$JCDM_BUCKET/runs/RUN_ID. Must be gs://
                           for multi-host slices (and should be for any spot VM)
  --run-id ID              default $JCDM_RUN_ID or jcdm-UTCDATE-TIME; pass the same id to resume
  --wandb-mode M           online|offline|disabled (default $WANDB_MODE or online)
  --wandb-project P        default $WANDB_PROJECT;  --wandb-entity E  default $WANDB_ENTITY
                           ($WANDB_API_KEY is shipped to the workers in a 0600 file, never on argv)
  --env NAME=VALUE         extra environment for the trainer, repeatable (shipped in the same
                           0600 file: values never appear on argv, in --dry-run output or logs)
  --data gs://BUCKET/DIR   dataset directory (from tools/prepare_cifar10.py --out) copied once to
                           every worker's disk and visible as data/DIR in the code directory, so
                           the default DATA_DIR='data/cifar10/train' works; repeatable
TPU VM
  --name NAME              TPU VM name (default $JCDM_TPU_NAME or jcdm-$USER)
  --zone ZONE              default $JCDM_ZONE or us-central2-b
  --project PROJECT        default $JCDM_PROJECT, else gcloud's configured project
  --accelerator TYPE       v4-8 (default, $JCDM_ACCELERATOR), v4-32, v5p-8, v5litepod-16, v6e-8, ...
  --runtime VERSION        TPU software version (default from the accelerator family)
  --provisioning MODE      spot (default) | on-demand | reserved | preemptible
  --queued | --no-queued   use a queued resource (default: yes for spot and reserved)
  --qr-name ID             queued resource id (default NAME-qr)
  --create-flag FLAG       extra flag for the create command, repeatable (e.g. --network=N)
Code
  --commit REV             revision to run (default HEAD; uncommitted changes are NOT shipped)
  --code local|git         local: git archive + scp (default); git: workers clone --repo-url
  --repo-url URL           default: this checkout's `origin`
  --extras NAME            pip extra installed on the workers (default tpu)
Supervision and safety
  --max-failures N         consecutive non-preemption failures before giving up (default 5)
  --allow-delete           may delete/recreate a VM or queued resource it did not create
  --delete-when-done       delete the VM after success (only one this launcher created, or with
                           --allow-delete); default: keep it and print the delete command
  --skip-bucket-check      do not check that the workdir bucket exists
  --dry-run                print every cloud command instead of running it, then exit
Other actions (instead of training)
  --stop                   SIGTERM the trainer on all workers (it checkpoints, exits 75)
  --delete                 delete the VM / queued resource (same ownership rule)
Environment knobs: JCDM_POLL_S (30) JCDM_BACKOFF_S (30) JCDM_BACKOFF_MAX_S (600)
  JCDM_MAX_CREATE_FAILURES (50) JCDM_LOG_DIR (runs/launcher/RUN_ID) JCDM_STATE_DIR
  (~/.local/state/jcdm: records what this launcher created)
Exit status: 0 finished, 1 gave up after failures, 2 usage/config error (also the trainer's 2),
  3 trainer numerical failure, 4 the trainer was interrupted (SIGINT/SIGHUP on a worker),
  130 this launcher interrupted (the trainer keeps running; rerun to re-attach).
EOF
}

# ------------------------------------------------------------------------------------- helpers
log() {
  local line
  line="[launch $(date -u +%H:%M:%S)] $*"
  printf '%s\n' "$line" >&2
  if [[ -n ${LOG_DIR:-} && $DRY_RUN == 0 ]]; then
    printf '%s\n' "$line" >>"$LOG_DIR/launcher.log"
  fi
}
die() { # die CODE MESSAGE
  local code=$1
  shift
  log "ERROR: $*"
  exit "$code"
}

# shellcheck source-path=SCRIPTDIR source=lib/args.sh
source "$INFRA_DIR/lib/args.sh" # shared options, need_arg, shquote, shjoin, usage_error

sleep_s() { [[ $1 == 0 ]] || sleep "$1"; }

# gcloud wrapper: --quiet (no prompts) and --project on every call; in dry-run only print.
gc() {
  local -a cmd=(gcloud "$@" --quiet)
  [[ -z $PROJECT ]] || cmd+=(--project="$PROJECT")
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(shjoin "${cmd[@]}")" >&3 # fd 3 = real stdout, also inside $(...)
    return 0
  fi
  log "+ $(shjoin "${cmd[@]}")"
  "${cmd[@]}"
}
gc_tpu() { gc "$@" --zone="$ZONE"; }

# describe KIND NAME FORMAT: prints the value; returns 0, or 3 if the resource does not exist, or 1.
# KIND is tpu-vm or queued-resources. In dry-run nothing exists until "created".
describe() {
  local kind=$1 name=$2 fmt=$3 out rc=0
  local -a cmd=(gcloud compute tpus "$kind" describe "$name" --zone="$ZONE" --format="$fmt" --quiet)
  [[ -z $PROJECT ]] || cmd+=(--project="$PROJECT")
  if ((DRY_RUN)); then
    gc_tpu compute tpus "$kind" describe "$name" --format="$fmt"
    ((DRY_CREATED)) || return 3
    case $fmt in
      *state.state*) echo ACTIVE ;;
      *state*) echo READY ;;
    esac
    return 0
  fi
  out=$("${cmd[@]}" 2>"$TMPD/describe.err") || rc=$?
  if ((rc == 0)); then
    printf '%s\n' "$out"
    return 0
  fi
  if grep -qiE 'NOT_FOUND|not found|does not exist' "$TMPD/describe.err"; then return 3; fi
  log "describe $kind $name failed: $(tr '\n' ' ' <"$TMPD/describe.err")"
  return 1
}

# Prints READY/CREATING/PREEMPTED/... , NOT_FOUND, or UNKNOWN (the describe call itself failed).
node_state() {
  local out rc=0
  out=$(describe tpu-vm "$NAME" 'value(state)') || rc=$?
  case $rc in
    0) printf '%s\n' "${out:-UNKNOWN}" ;;
    3) echo NOT_FOUND ;;
    *) echo UNKNOWN ;;
  esac
}
qr_state() {
  local out rc=0
  out=$(describe queued-resources "$QR" 'value(state.state)') || rc=$?
  case $rc in
    0) printf '%s\n' "${out:-UNKNOWN}" ;;
    3) echo NOT_FOUND ;;
    *) echo UNKNOWN ;;
  esac
}
worker_count() {
  local out n
  ((DRY_RUN == 0)) || {
    echo "$HOSTS_GUESS"
    return 0
  }
  out=$(describe tpu-vm "$NAME" 'value(networkEndpoints[].ipAddress)') || out=""
  n=$(tr -s ';,[:space:]' '\n' <<<"$out" | grep -c . || true)
  echo "${n:-0}"
}

# ------------------------------------------------------------------------------------ ownership
# A resource is ours if this launcher created it: recorded in STATE_DIR and, for nodes, the
# jcdm_launcher=1 label set at creation. Only ours (or anything, with --allow-delete) is deleted.
owned_file() { echo "$STATE_DIR/owned_${PROJECT:-default}_${ZONE}_$1_$2"; }
record_owned() {
  ((DRY_RUN)) && return 0
  mkdir -p "$STATE_DIR"
  date -u +%FT%TZ >"$(owned_file "$1" "$2")"
}
forget_owned() { ((DRY_RUN)) || rm -f "$(owned_file "$1" "$2")"; }
node_is_ours() {
  [[ -f $(owned_file node "$NAME") ]] && return 0
  [[ $(describe tpu-vm "$NAME" 'value(labels.jcdm_launcher)' 2>/dev/null) == 1 ]]
}
qr_is_ours() {
  [[ -f $(owned_file qr "$QR") ]] && return 0
  node_is_ours
}
may_delete() { # KIND(node|qr) REASON
  ((ALLOW_DELETE)) && return 0
  if [[ $1 == qr ]]; then qr_is_ours && return 0; else node_is_ours && return 0; fi
  local what="TPU VM $NAME"
  [[ $1 == qr ]] && what="queued resource $QR"
  die 2 "$what $2, but this launcher did not create it; refusing to delete it." \
    "Delete it yourself, or rerun with --allow-delete."
}

delete_failed() {
  DELETE_FAILS=$((DELETE_FAILS + 1))
  ((DELETE_FAILS < 10)) || die 1 "could not delete $1 after $DELETE_FAILS tries (owned by" \
    "another queued resource?); delete it by hand and rerun"
  log "delete of $1 failed ($DELETE_FAILS/10); retrying after ${POLL_S}s"
  sleep_s "$POLL_S"
}
delete_node() {
  may_delete node "$1"
  log "deleting TPU VM $NAME ($1)"
  if gc_tpu compute tpus tpu-vm delete "$NAME"; then
    forget_owned node "$NAME"
    DELETE_FAILS=0
  else
    delete_failed "TPU VM $NAME"
  fi
}
delete_qr() {
  may_delete qr "$1"
  log "deleting queued resource $QR and its node ($1)"
  if gc_tpu compute tpus queued-resources delete "$QR" --force; then
    forget_owned qr "$QR"
    forget_owned node "$NAME"
    DELETE_FAILS=0
  else
    delete_failed "queued resource $QR"
  fi
}

create_vm() {
  local -a cmd
  local labels=jcdm_launcher=1
  if ((QUEUED)); then
    cmd=(compute tpus queued-resources create "$QR" --node-id="$NAME"
      --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" --labels="$labels")
  else
    cmd=(compute tpus tpu-vm create "$NAME"
      --accelerator-type="$ACCEL" --version="$RUNTIME" --labels="$labels")
  fi
  case $PROVISIONING in
    spot) cmd+=(--spot) ;;
    reserved) cmd+=(--reserved) ;;
    preemptible) cmd+=(--preemptible) ;;
  esac
  cmd+=("${CREATE_FLAGS[@]}")
  log "creating $ACCEL ($PROVISIONING$( ((QUEUED)) && echo ', queued resource')) as $NAME in $ZONE"
  if gc_tpu "${cmd[@]}"; then
    VM_FRESH=1
    if ((QUEUED)); then record_owned qr "$QR"; fi
    record_owned node "$NAME"
    DRY_CREATED=1
    CREATE_FAILS=0
    return 0
  fi
  CREATE_FAILS=$((CREATE_FAILS + 1))
  ((CREATE_FAILS < MAX_CREATE_FAILS)) || die 1 "create failed $CREATE_FAILS times; giving up"
  local wait_s
  wait_s=$(backoff "$CREATE_FAILS")
  log "create failed ($CREATE_FAILS/$MAX_CREATE_FAILS; e.g. no spot capacity); retry in ${wait_s}s"
  sleep_s "$wait_s"
}

# Loops until the node is READY: creates it, waits on the queue, replaces a preempted one.
ensure_vm() {
  local ns qs unknown=0
  while :; do
    ns=$(node_state)
    [[ $ns == READY ]] && return 0
    qs=-
    ((QUEUED)) && qs=$(qr_state)
    if [[ $ns == UNKNOWN || $qs == UNKNOWN ]]; then
      unknown=$((unknown + 1))
      ((unknown < 20)) || die 1 "cannot read the state of $NAME (gcloud keeps failing)"
    else
      unknown=0
    fi
    log "node $NAME: $ns; queued resource ${QR}: $qs"
    if ((QUEUED)) && [[ $qs != NOT_FOUND ]]; then
      case $qs in
        SUSPENDING | SUSPENDED | FAILED) delete_qr "is $qs" ;;
        ACTIVE)
          case $ns in
            PREEMPTED | TERMINATED) delete_qr "holds a $ns node" ;;
            *) sleep_s "$POLL_S" ;;
          esac
          ;;
        *) sleep_s "$POLL_S" ;; # CREATING ACCEPTED WAITING_FOR_RESOURCES PROVISIONING DELETING
      esac
      continue
    fi
    case $ns in
      NOT_FOUND) create_vm ;;
      PREEMPTED | TERMINATED) delete_node "is $ns" ;;
      STOPPED) gc_tpu compute tpus tpu-vm start "$NAME" || sleep_s "$POLL_S" ;;
      *) sleep_s "$POLL_S" ;; # CREATING STARTING RESTARTING REPAIRING STOPPING DELETING UNKNOWN
    esac
  done
}

# ----------------------------------------------------------------------------- worker commands
ssh_all() { # ssh_all COMMAND_WORDS... : run one quoted command line on every worker
  gc_tpu compute tpus tpu-vm ssh "$NAME" --worker=all --strict-host-key-checking=no \
    --ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=6 \
    --command="$(shjoin "$@")" </dev/null
}

setup_workers() {
  local -a srcs=("$TMPD/jcdm_tpu_worker.sh") remote
  local d
  remote=(bash jcdm_tpu_worker.sh setup --commit "$SHA" --extras "$EXTRAS")
  if [[ $CODE == local ]]; then
    srcs+=("$TARBALL")
    remote+=(--tarball "$(basename "$TARBALL")")
  else
    remote+=(--repo-url "$REPO_URL")
  fi
  if [[ -n $SECRETS ]]; then
    srcs+=("$SECRETS")
    remote+=(--secrets jcdm_secrets.env)
  fi
  for d in "${DATA[@]}"; do remote+=(--data "$d"); done
  log "copying the launcher's worker script${TARBALL:+ and the code} to all workers"
  gc_tpu compute tpus tpu-vm scp "${srcs[@]}" "$NAME:" --worker=all \
    --strict-host-key-checking=no </dev/null || return 1
  log "installing jcdm @ ${SHA:0:12} on all workers"
  ssh_all "${remote[@]}"
}

# Runs the trainer on all workers; sets RESULT to finished|usage|numerical|preempted|failed|lost.
run_workers() {
  # A fresh random nonce per attempt: only the worker script's own marker line carries it, so
  # no line of trainer output (a binding's value, say) can pass for a worker's exit code. Not
  # anchored to the line start: gcloud may prefix a worker's lines.
  local nonce
  nonce=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  local -a remote=(bash jcdm_tpu_worker.sh run --run-id "$RUN_ID" --commit "$SHA")
  remote+=(--nonce "$nonce")
  local kv alog ssh_rc=0 line n=0 rc action decision
  local -a codes=() reported=()
  for kv in "${TRAINER_ENV[@]}"; do remote+=(--env "$kv"); done
  remote+=(-- "${TRAINER_ARGS[@]}")
  log "attempt $ATTEMPT: starting the trainer on all workers (run $RUN_ID)"
  if ((DRY_RUN)); then
    ssh_all "${remote[@]}"
    RESULT=finished
    return 0
  fi
  alog=$LOG_DIR/attempt-$(printf '%03d' "$ATTEMPT").log
  set +e
  ssh_all "${remote[@]}" 2>&1 | tee "$alog"
  ssh_rc=${PIPESTATUS[0]}
  set -e
  while read -r line; do
    codes+=("${line##*rc=}")
    reported+=("${line#* nonce="$nonce" }")
    n=$((n + 1))
  done < <(grep -oaE "JCDM_EXIT_CODE nonce=$nonce worker=[^ ]+ rc=[0-9]+" "$alog" | sort -u)
  log "attempt $ATTEMPT: gcloud ssh exit $ssh_rc; exit codes reported by $n/$WORKERS workers:" \
    "${reported[*]}"
  if ((n == 0)); then
    RESULT=lost
    return 0
  fi
  # One policy for every launcher (jcdm/exit_codes.py): combine the workers' codes, then act.
  decision=$(python3 "$REPO/jcdm/exit_codes.py" decide "${codes[@]}") ||
    die 1 "cannot run $REPO/jcdm/exit_codes.py with python3"
  read -r rc action <<<"$decision"
  case $action in
    stop)
      case $rc in
        3) RESULT=numerical ;;
        4) RESULT=interrupted ;;
        *) RESULT=usage ;;
      esac
      ;;
    resume) RESULT=preempted ;;
    retry) RESULT=failed ;;
    done)
      # Finished only if every worker reported 0 (gcloud's own status for --worker=all is not
      # used); a worker that reported nothing may have been cut off.
      if { ((WORKERS > 0 && n >= WORKERS)) || ((WORKERS == 0 && ssh_rc == 0)); }; then
        RESULT=finished
      else
        RESULT=lost
      fi
      ;;
  esac
}

backoff() { # backoff N: BACKOFF_S * 2^(N-1), capped
  local s=$BACKOFF_S i
  for ((i = 1; i < $1; i++)); do s=$((s * 2)); done
  ((s < BACKOFF_MAX_S)) || s=$BACKOFF_MAX_S
  echo "$s"
}

finish() {
  log "training finished: run $RUN_ID, workdir $WORKDIR"
  log "worker logs: ~/jcdm/runs/$RUN_ID/trainer.log on each worker; launcher logs: $LOG_DIR"
  if ((DELETE_WHEN_DONE)); then
    if ((QUEUED)) && [[ $(qr_state) != NOT_FOUND ]]; then
      delete_qr "is no longer needed"
    else
      delete_node "is no longer needed"
    fi
  else
    local del="gcloud compute tpus tpu-vm delete $NAME"
    ((QUEUED)) && del="gcloud compute tpus queued-resources delete $QR --force"
    del+=" --zone=$ZONE${PROJECT:+ --project=$PROJECT}"
    log "the TPU VM is kept (billing continues). Delete it with: $del"
  fi
}

supervise() {
  local failures=0 preemptions=0 st
  ATTEMPT=0
  while :; do
    ATTEMPT=$((ATTEMPT + 1))
    ensure_vm
    if ((VM_FRESH)); then # first attempt, a new VM, or an attempt that failed: (re)install
      WORKERS=$(worker_count)
      if ! setup_workers; then
        st=$(node_state)
        if [[ $st != READY ]]; then
          preemptions=$((preemptions + 1))
          log "VM became $st during setup (preemption #$preemptions); recreating"
          continue
        fi
        failures=$((failures + 1))
        ((failures <= MAX_FAILURES)) || die 1 "setup failed $failures times in a row; giving up"
        log "setup failed ($failures/$MAX_FAILURES); retrying in $(backoff "$failures")s"
        sleep_s "$(backoff "$failures")"
        continue
      fi
      VM_FRESH=0
    fi
    run_workers
    if ((DRY_RUN)); then
      log "dry run: the supervise loop would now relaunch on exit 75 or preemption" \
        "(recreating the VM), retry other failures up to $MAX_FAILURES times, stop on 0/2/3"
      return 0
    fi
    case $RESULT in
      finished)
        finish
        return 0
        ;;
      usage) die 2 "the trainer exited 2 (usage/config error); not restarting" ;;
      numerical) die 3 "the trainer exited 3 (numerical failure); not restarting" ;;
      interrupted) die 4 "the trainer was interrupted (SIGINT/SIGHUP, exit 4) after committing a" \
        "checkpoint; not restarting (rerun the same command to resume)" ;;
      preempted)
        failures=0
        preemptions=$((preemptions + 1))
        log "the trainer checkpointed and exited 75 (#$preemptions); relaunching after ${POLL_S}s" \
          "(the VM is recreated if it was reclaimed)"
        sleep_s "$POLL_S"
        ;;
      failed | lost)
        VM_FRESH=1
        st=$(node_state)
        if [[ $st != READY ]]; then
          preemptions=$((preemptions + 1))
          log "the VM is $st (preemption #$preemptions); recreating it and resuming $RUN_ID"
          continue
        fi
        failures=$((failures + 1))
        if [[ $RESULT == lost ]]; then
          log "lost contact with the workers but the VM is READY (a re-run re-attaches)"
        fi
        ((failures <= MAX_FAILURES)) ||
          die 1 "the trainer failed $failures times in a row; giving up (logs: $LOG_DIR)"
        log "failure $failures/$MAX_FAILURES; relaunching in $(backoff "$failures")s"
        sleep_s "$(backoff "$failures")"
        ;;
    esac
  done
}

on_interrupt() {
  log "interrupted. A started trainer keeps running on the VM: rerun the same command to" \
    "re-attach, or add --stop to stop it (it checkpoints first)."
  exit 130
}

# ------------------------------------------------------------------------------------- options
RUN_ID=${JCDM_RUN_ID:-} NAME=${JCDM_TPU_NAME:-} ZONE=${JCDM_ZONE:-us-central2-b}
PROJECT=${JCDM_PROJECT:-} ACCEL=${JCDM_ACCELERATOR:-v4-8} RUNTIME="" PROVISIONING=spot QUEUED=""
QR="" COMMIT=HEAD CODE=local REPO_URL="" EXTRAS=tpu MAX_FAILURES=5 ALLOW_DELETE=0
DELETE_WHEN_DONE=0 BUCKET_CHECK=1 ACTION=train
WANDB_MODE_=${WANDB_MODE:-online} WANDB_PROJECT_=${WANDB_PROJECT:-} WANDB_ENTITY_=${WANDB_ENTITY:-}
CREATE_FLAGS=() DATA=()
POLL_S=${JCDM_POLL_S:-30} BACKOFF_S=${JCDM_BACKOFF_S:-30} BACKOFF_MAX_S=${JCDM_BACKOFF_MAX_S:-600}
MAX_CREATE_FAILURES=${JCDM_MAX_CREATE_FAILURES:-50}
STATE_DIR=${JCDM_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/jcdm}
LOG_DIR="" DRY_CREATED=0 CREATE_FAILS=0 MAX_CREATE_FAILS=$MAX_CREATE_FAILURES SHA="" TARBALL=""
SECRETS="" WORKERS=0 HOSTS_GUESS=1 ATTEMPT=0 RESULT="" VM_FRESH=1 DELETE_FAILS=0

launcher_option() { # the TPU-only options (lib/args.sh parses the shared ones)
  ARGS_USED=2
  case $1 in
    --data) need_arg "$1" $# && DATA+=("$2") ;;
    --name) need_arg "$1" $# && NAME=$2 ;;
    --zone) need_arg "$1" $# && ZONE=$2 ;;
    --project) need_arg "$1" $# && PROJECT=$2 ;;
    --accelerator | --accelerator-type) need_arg "$1" $# && ACCEL=$2 ;;
    --runtime | --version) need_arg "$1" $# && RUNTIME=$2 ;;
    --provisioning) need_arg "$1" $# && PROVISIONING=$2 ;;
    --qr-name) need_arg "$1" $# && QR=$2 ;;
    --create-flag) need_arg "$1" $# && CREATE_FLAGS+=("$2") ;;
    --commit) need_arg "$1" $# && COMMIT=$2 ;;
    --code) need_arg "$1" $# && CODE=$2 ;;
    --repo-url) need_arg "$1" $# && REPO_URL=$2 ;;
    --extras) need_arg "$1" $# && EXTRAS=$2 ;;
    --max-failures) need_arg "$1" $# && MAX_FAILURES=$2 ;;
    *)
      ARGS_USED=1
      case $1 in
        --spot | --on-demand | --reserved | --preemptible) PROVISIONING=${1#--} ;;
        --queued) QUEUED=1 ;;
        --no-queued) QUEUED=0 ;;
        --allow-delete) ALLOW_DELETE=1 ;;
        --delete-when-done) DELETE_WHEN_DONE=1 ;;
        --skip-bucket-check) BUCKET_CHECK=0 ;;
        --stop) ACTION=stop ;;
        --delete) ACTION=delete ;;
        *) ARGS_USED=0 ;;
      esac
      ;;
  esac
}

parse_args "$@"

# --------------------------------------------------------------------------------- validation
if [[ -z $NAME ]]; then
  NAME=jcdm-$(printf '%s' "${USER:-user}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-')
fi
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || die 2 "bad --name '$NAME' (GCE resource name)"
[[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die 2 "bad --zone '$ZONE'"
[[ $QR ]] || QR=$NAME-qr
[[ $MAX_FAILURES =~ ^[0-9]+$ ]] || die 2 "--max-failures wants a number"
case $PROVISIONING in spot | on-demand | reserved | preemptible) ;;
  *) die 2 "--provisioning must be spot, on-demand, reserved or preemptible" ;;
esac
if [[ -z $QUEUED ]]; then
  QUEUED=0
  [[ $PROVISIONING == spot || $PROVISIONING == reserved ]] && QUEUED=1
fi
[[ $QUEUED == 1 && $PROVISIONING == preemptible ]] &&
  die 2 "queued resources have no preemptible mode: use --spot or --no-queued"
for v in POLL_S BACKOFF_S BACKOFF_MAX_S MAX_CREATE_FAILURES; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die 2 "JCDM_$v must be a whole number of seconds/attempts"
done

[[ $ACCEL == v5e-* ]] && ACCEL=v5litepod-${ACCEL#v5e-}
[[ $ACCEL =~ ^(v[0-9]+[a-z]*|v5litepod)-([0-9]+)$ ]] || die 2 "bad --accelerator '$ACCEL'"
ACCEL_FAMILY=${BASH_REMATCH[1]} ACCEL_N=${BASH_REMATCH[2]}
if [[ -z $RUNTIME ]]; then
  case $ACCEL_FAMILY in
    v2 | v3 | v4) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p) RUNTIME=v2-alpha-tpuv5 ;;
    v6e) RUNTIME=v2-alpha-tpuv6e ;;
    *) die 2 "no default TPU software version for $ACCEL; pass --runtime" ;;
  esac
fi
# Slices with more than 8 cores (v2-v5p) or 8 chips (v5e, v6e) span several hosts.
MULTI_HOST=0
((ACCEL_N > 8)) && MULTI_HOST=1
HOSTS_GUESS=$(((ACCEL_N + 7) / 8))

[[ $ACTION != train ]] || check_gin "$REPO"
check_run_id jcdm

if [[ $ACTION == train ]]; then
  if [[ -z $WORKDIR ]]; then
    [[ -n ${JCDM_BUCKET:-} ]] || die 2 "pass --workdir gs://BUCKET/runs/$RUN_ID or set JCDM_BUCKET"
    WORKDIR=gs://${JCDM_BUCKET#gs://}/runs/$RUN_ID
  fi
  if [[ $WORKDIR != gs://?* ]]; then
    ((MULTI_HOST == 0)) || die 2 "workdir '$WORKDIR' is not a gs:// bucket; a multi-host slice" \
      "($ACCEL) needs one shared by all workers"
    log "WARNING: workdir '$WORKDIR' is on the VM's disk: it is lost when a spot VM is" \
      "recreated, so a preempted run restarts from step 0. Prefer gs://BUCKET/..."
  fi
  check_env
  [[ $CODE == local || $CODE == git ]] || die 2 "--code must be local or git"
  for d in "${DATA[@]}"; do
    [[ ${d%/} == gs://?*/?* ]] || die 2 "--data wants gs://BUCKET/DIR (a directory), got '$d'"
  done

  SHA=$(git -C "$REPO" rev-parse --verify --quiet "$COMMIT^{commit}") ||
    die 2 "'$COMMIT' is not a commit of $REPO"
  git -C "$REPO" cat-file -e "$SHA:$GIN_REL" 2>/dev/null ||
    die 2 "gin file $GIN_REL is not in commit ${SHA:0:12}: commit it first"
  if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    log "WARNING: uncommitted changes in $REPO are NOT shipped; running commit ${SHA:0:12}"
  fi
  if [[ $CODE == git && -z $REPO_URL ]]; then
    REPO_URL=$(git -C "$REPO" remote get-url origin 2>/dev/null) ||
      die 2 "--code git needs --repo-url (no 'origin' remote)"
  fi
fi

make_trainer_args
TRAINER_ENV=("WANDB_MODE=$WANDB_MODE_")
# One restart token per supervising launcher: it starts an attempt only after the previous one
# ended (exit codes read, or the VM gone), so the trainer takes over a workdir lease that carries
# this token at once (jcdm/runtime/lease.py). tpu_worker.sh leaves it out of its fingerprint, so a
# rerun of this launcher still re-attaches to a running trainer.
LEASE_TOKEN=${JCDM_LEASE_TOKEN:-tpu-$RUN_ID-$(date -u +%Y%m%d%H%M%S)-$$-$RANDOM}
TRAINER_ENV+=("JCDM_LEASE_TOKEN=$LEASE_TOKEN")
[[ -z $WANDB_PROJECT_ ]] || TRAINER_ENV+=("WANDB_PROJECT=$WANDB_PROJECT_")
[[ -z $WANDB_ENTITY_ ]] || TRAINER_ENV+=("WANDB_ENTITY=$WANDB_ENTITY_")
# --env values may be secrets: they reach the workers in the 0600 secrets file, never on argv.

exec 3>&1
TMPD=$(mktemp -d "${TMPDIR:-/tmp}/jcdm-launch.XXXXXX")
trap 'rm -rf "$TMPD"' EXIT
trap on_interrupt INT TERM

if ((DRY_RUN == 0)); then
  LOG_DIR=${JCDM_LOG_DIR:-$REPO/runs/launcher/$RUN_ID}
  mkdir -p "$LOG_DIR"
fi

# -------------------------------------------------------------------------------------- actions
case $ACTION in
  stop)
    log "stopping the trainer of $RUN_ID on all workers of $NAME (it checkpoints, exits 75)"
    cp "$INFRA_DIR/tpu_worker.sh" "$TMPD/jcdm_tpu_worker.sh"
    gc_tpu compute tpus tpu-vm scp "$TMPD/jcdm_tpu_worker.sh" "$NAME:" --worker=all \
      --strict-host-key-checking=no </dev/null
    ssh_all bash jcdm_tpu_worker.sh stop --run-id "$RUN_ID"
    exit
    ;;
  delete)
    if ((QUEUED)) && [[ $(qr_state) != NOT_FOUND ]]; then
      delete_qr "was asked to be deleted"
    elif [[ $(node_state) != NOT_FOUND ]]; then
      delete_node "was asked to be deleted"
    else
      log "nothing to delete: neither $NAME nor $QR exists"
    fi
    exit 0
    ;;
esac

log "run $RUN_ID: $ACCEL ($PROVISIONING$( ((QUEUED)) && echo ', queued resource'))" \
  "$NAME in $ZONE; commit ${SHA:0:12}; workdir $WORKDIR;" \
  "W&B $WANDB_MODE_${WANDB_PROJECT_:+ project $WANDB_PROJECT_}"
log "to resume this run later (from any machine) pass: --run-id $RUN_ID"

if [[ $BUCKET_CHECK == 1 && $WORKDIR == gs://* ]]; then
  bucket=${WORKDIR#gs://}
  bucket=gs://${bucket%%/*}
  gc storage buckets describe "$bucket" --format='value(name)' >/dev/null ||
    die 2 "bucket $bucket is not accessible (gcloud storage buckets describe failed)"
fi

cp "$INFRA_DIR/tpu_worker.sh" "$TMPD/jcdm_tpu_worker.sh"
if [[ $CODE == local ]]; then
  TARBALL=$TMPD/jcdm-$SHA.tar.gz
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(shjoin git -C "$REPO" archive --format=tar.gz --prefix="jcdm-$SHA/" \
      -o "$TARBALL" "$SHA")" >&3
  else
    git -C "$REPO" archive --format=tar.gz --prefix="jcdm-$SHA/" -o "$TARBALL" "$SHA"
  fi
fi
if [[ -n ${WANDB_API_KEY:-} || ${#USER_ENV[@]} -gt 0 ]]; then
  # WANDB_API_KEY and every --env NAME=VALUE go to the workers in this 0600 file (scp, then
  # sourced by the worker): a value never appears on a gcloud command line, in --dry-run output
  # or in the launcher's logs, which name only the variables.
  SECRETS=$TMPD/jcdm_secrets.env
  (
    umask 077
    [[ -z ${WANDB_API_KEY:-} ]] || printf 'WANDB_API_KEY=%s\n' "$(shquote "$WANDB_API_KEY")"
    for kv in "${USER_ENV[@]}"; do printf '%s=%s\n' "${kv%%=*}" "$(shquote "${kv#*=}")"; done
  ) >"$SECRETS"
  names=()
  for kv in "${USER_ENV[@]}"; do names+=("${kv%%=*}"); done
  log "trainer environment in a 0600 file for the workers:${WANDB_API_KEY:+ WANDB_API_KEY}" \
    "${names[*]}"
fi
if [[ -z ${WANDB_API_KEY:-} && $WANDB_MODE_ == online ]]; then
  log "WARNING: WANDB_API_KEY is not set; online W&B logging needs the workers to be logged in"
fi

supervise
