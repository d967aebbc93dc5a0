# shellcheck shell=bash
# Sourced by slurm/*.sbatch: runs the job's launcher so that a stop signal sent to the batch shell
# reaches every rank, and requeues the job when its ranks stopped on one.
#   run_requeueable MODE COMMAND [ARG ...]
# Never returns: exits with COMMAND's status, or with 0 once the job is requeued.
#
# A rank that gets SIGUSR1 or SIGTERM during `train` finishes its round (`distill`: within distill.log_every steps), writes a checkpoint
# and exits with 75. This shell traps both signals while COMMAND runs in the background and sends
# SIGUSR1 on, as MODE says:
#   srun      COMMAND is srun, which passes a SIGUSR1 on to every process of its step (srun answers
#             SIGTERM by killing the step at once, so it is never sent that one)
#   children  COMMAND is torchrun, which starts the ranks as its children: they get the signal from
#             here, while COMMAND runs with SIGUSR1 ignored (torchrun would die of it and leave the
#             ranks behind; it passes the ignore on to them, so a rank acts on SIGUSR1 only between
#             the start of its first round and the end of its last)
# When the ranks exited with 75, or the trap fired and COMMAND then failed, the job is requeued
# with `scontrol requeue` (it runs the same command again) unless FEDPFT_REQUEUE=0, or Slurm itself
# is ending the job (scancel, time limit): then it ends with COMMAND's status.
#   FEDPFT_REQUEUE   0: never requeue (default 1)

_fedpft_forward_stop() {
  [ -n "$_fedpft_pid" ] || return 0
  if [ "$_fedpft_mode" = children ]; then
    pkill -USR1 -P "$_fedpft_pid" || true
  else
    kill -USR1 "$_fedpft_pid" 2>/dev/null || true
  fi
}

run_requeueable() {
  _fedpft_mode=$1
  shift
  _fedpft_stop='' _fedpft_pid=''
  trap '_fedpft_stop=SIGUSR1; _fedpft_forward_stop' USR1
  trap '_fedpft_stop=SIGTERM; _fedpft_forward_stop' TERM
  if [ "$_fedpft_mode" = children ]; then
    (trap '' USR1; exec "$@") &
  else
    "$@" &
  fi
  _fedpft_pid=$!
  # wait returns early when a trapped signal comes in: wait again while COMMAND runs, then once
  # more for its status (bash keeps it).
  while kill -0 "$_fedpft_pid" 2>/dev/null; do wait "$_fedpft_pid" || true; done
  local rc=0 why='' line state
  wait "$_fedpft_pid" || rc=$?
  trap '' USR1
  trap - TERM
  if [ -n "$_fedpft_stop" ] && [ "$rc" -ne 0 ]; then why="$_fedpft_stop to the batch shell"
  elif [ "$rc" -eq 75 ]; then why="a stop signal to the ranks"
  else exit "$rc"
  fi
  line="fedpft: job $SLURM_JOB_ID stopped on $why (exit $rc)"
  if [ "${FEDPFT_REQUEUE:-1}" = 0 ]; then
    echo "$line; not requeued (FEDPFT_REQUEUE=0): submit it again with fed.resume=true (distill: distill.resume=true) to continue"
    exit "$rc"
  fi
  state=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o -m1 'JobState=[A-Z_]*' || true)
  if [ "$state" != JobState=RUNNING ]; then
    echo "$line; not requeued: Slurm is ending it (${state:-JobState unknown})"
    exit "$rc"
  fi
  echo "$line; requeueing it to run the same command again (FEDPFT_REQUEUE=0 turns this off)"
  if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  echo "fedpft: scontrol requeue $SLURM_JOB_ID failed, so the job ends here (submit with --requeue?)" >&2
  exit "$rc"
}
