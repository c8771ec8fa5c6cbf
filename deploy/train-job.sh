#!/bin/sh
# Entry point of the training image: run a batch command (normally `chargen train ... --out DIR
# --resume`) and, when it succeeds, publish DIR/model.pt into the shared models volume where the
# api loads it:  $CHARGEN_MODELS_DIR/${CHARGEN_PUBLISH_AS:-<basename of DIR>.pt}
#
# Why a wrapper and not `sh -c "chargen train ... && cp ..."`: a plain shell as PID 1 does not pass
# SIGTERM on to its child, so `docker stop` or a preempted node would kill training without the
# checkpoint. Here SIGTERM/SIGINT go to the trainer, which finishes its step, writes last.pt and
# exits 143; that status is returned unchanged (nothing published) so the scheduler reruns the
# same command and it resumes.
set -eu

if [ "$#" -eq 0 ]; then
    echo "train-job: usage: train-job COMMAND [ARGS...]" >&2
    exit 2
fi

# Find --out DIR / --out=DIR in the command line: that run directory holds model.pt when done.
out=""
prev=""
for arg in "$@"; do
    case "$arg" in
        --out=*) out="${arg#--out=}" ;;
        *) if [ "$prev" = "--out" ]; then out="$arg"; fi ;;
    esac
    prev="$arg"
done

"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM
trap 'kill -INT "$child" 2>/dev/null || true' INT

# `wait` returns early (status > 128) when a trapped signal arrives; keep waiting until the child
# has really exited so its own status (143 after a checkpoint) is what we report.
while :; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break
done
trap - TERM INT

if [ "$status" -ne 0 ]; then
    echo "train-job: command exited with status $status; nothing published" >&2
    exit "$status"
fi

models_dir="${CHARGEN_MODELS_DIR:-}"
if [ -z "$out" ] || [ -z "$models_dir" ] || [ ! -f "$out/model.pt" ]; then
    exit 0  # not a training run that exports (or publishing is off): nothing to hand over
fi

name="${CHARGEN_PUBLISH_AS:-$(basename "$out").pt}"
mkdir -p "$models_dir"
# Copy then rename within the volume: a replica starting meanwhile never reads a half-written file.
tmp="$models_dir/.$name.tmp.$$"
cp "$out/model.pt" "$tmp"
mv -f "$tmp" "$models_dir/$name"
echo "train-job: published $models_dir/$name; replicas watching $models_dir serve it without a restart" >&2
