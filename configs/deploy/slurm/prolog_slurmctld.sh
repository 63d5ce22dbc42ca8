#!/bin/bash
# rackpower PrologSlurmctld: ask the power controller before a job starts.
#
# slurmctld runs this on the head node at job allocation, before the job launches,
# with SLURM_JOB_ID and SLURM_JOB_NODELIST set. For every allocated node it takes a
# reservation of RACKPOWER_NODE_WATTS under that node (POST /v1/reservations through
# `rackpower reserve`), so that the controller counts the job's power before its
# meters can see it and two jobs cannot both be placed on the same spare watts.
#
# - All granted: exit 0, the job starts. The reservation ids are kept in
#   $RACKPOWER_STATE_DIR/$SLURM_JOB_ID/ for the release (epilog_slurmctld.sh, or the
#   timed release below once the job draws power).
# - One refused (not enough headroom): the holds already taken are given back and the
#   script exits 1; slurmctld then requeues a batch job (interactive ones are
#   cancelled) and tries again later, perhaps elsewhere.
# - Controller unreachable: exit 1 as well, unless RACKPOWER_FAIL_OPEN=1 (start the job
#   without a hold rather than stall the queue while the controller is down).
#
# Settings (environment, or the file RACKPOWER_HOOK_ENV, default
# /etc/rackpower/slurm-hook.env; see slurm-hook.env.example):
#   RACKPOWER_URL            controller API, e.g. http://rackpower.mgmt:8080
#   RACKPOWER_TOKEN_FILE     file holding the API token (or RACKPOWER_TOKEN in the env)
#   RACKPOWER_NODE_WATTS     power to hold per node, W (GPUs at max + baseline)
#   RACKPOWER_TTL_S          seconds a hold lives if nobody releases it (default 900)
#   RACKPOWER_RELEASE_AFTER_S  release this long after the job starts: by then it
#                            draws power and the meters count it (default 120; 0 = only
#                            the epilog and the TTL release)
#   RACKPOWER_NODE_MAP       optional file of "slurm-host tree-node-id" lines
#   RACKPOWER_STATE_DIR      default /var/spool/slurmctld/rackpower
#   RACKPOWER_CLI            the client command (default: rackpower)
set -u
# slurmctld runs hooks without a search path.
export PATH="${PATH:-/usr/local/bin:/usr/bin:/bin}:/usr/local/bin:/usr/bin:/bin"
HOOK_ENV=${RACKPOWER_HOOK_ENV:-/etc/rackpower/slurm-hook.env}
# shellcheck disable=SC1090
[ -r "$HOOK_ENV" ] && . "$HOOK_ENV"

CLI=${RACKPOWER_CLI:-rackpower}
STATE=${RACKPOWER_STATE_DIR:-/var/spool/slurmctld/rackpower}/${SLURM_JOB_ID:?SLURM_JOB_ID not set}
WATTS=${RACKPOWER_NODE_WATTS:?RACKPOWER_NODE_WATTS not set}
TTL=${RACKPOWER_TTL_S:-900}
RELEASE_AFTER=${RACKPOWER_RELEASE_AFTER_S:-120}
HERE=$(cd "$(dirname "$0")" && pwd)

auth=()
[ -n "${RACKPOWER_TOKEN_FILE:-}" ] && auth=(--token-file "$RACKPOWER_TOKEN_FILE")
open=()
[ "${RACKPOWER_FAIL_OPEN:-0}" = 1 ] && open=(--fail-open)

tree_node() {  # Slurm host name -> power tree node id (same name unless mapped)
    local host=$1 mapped=""
    if [ -n "${RACKPOWER_NODE_MAP:-}" ] && [ -r "$RACKPOWER_NODE_MAP" ]; then
        mapped=$(awk -v h="$host" '$1 == h { print $2; exit }' "$RACKPOWER_NODE_MAP")
    fi
    echo "${mapped:-$host}"
}

# A node list we cannot expand must stop the job, not let it through without holds.
if ! hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST not set}") \
        || [ -z "$hosts" ]; then
    echo "rackpower: cannot expand node list '$SLURM_JOB_NODELIST' of job $SLURM_JOB_ID" >&2
    exit 1
fi
mkdir -p "$STATE"
for host in $hosts; do
    node=$(tree_node "$host")
    # shellcheck disable=SC2086
    if rid=$($CLI reserve --node "$node" --watts "$WATTS" --ttl "$TTL" \
            --job "slurm-$SLURM_JOB_ID" "${auth[@]}" "${open[@]}"); then
        [ -n "$rid" ] && echo "$rid" > "$STATE/$node"  # empty: --fail-open let it pass
    else
        echo "rackpower: job $SLURM_JOB_ID not started on $host ($node): see above" >&2
        RACKPOWER_STATE_DIR=$(dirname "$STATE") "$HERE/epilog_slurmctld.sh"  # give back
        exit 1
    fi
done

if [ "$RELEASE_AFTER" != 0 ]; then
    # Slurm has no "the job draws power now" event: release a fixed time after the start,
    # detached so the prolog returns at once. The epilog and the TTL cover a lost timer.
    setsid nohup bash -c "sleep $RELEASE_AFTER; exec \"$HERE/epilog_slurmctld.sh\"" \
        </dev/null >/dev/null 2>&1 &
fi
exit 0
