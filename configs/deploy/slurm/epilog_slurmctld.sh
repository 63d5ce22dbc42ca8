#!/bin/bash
# rackpower EpilogSlurmctld: give back whatever power holds job SLURM_JOB_ID still has.
#
# Runs at job end (and from prolog_slurmctld.sh: after a refusal, and on its timer once
# the job draws power). A hold that expired or was released already is not an error:
# the job is over either way. Always exits 0 so a controller outage never makes Slurm
# treat the job's end as failed; holds it could not release expire by their TTL.
set -u
export PATH="${PATH:-/usr/local/bin:/usr/bin:/bin}:/usr/local/bin:/usr/bin:/bin"
HOOK_ENV=${RACKPOWER_HOOK_ENV:-/etc/rackpower/slurm-hook.env}
# shellcheck disable=SC1090
[ -r "$HOOK_ENV" ] && . "$HOOK_ENV"

CLI=${RACKPOWER_CLI:-rackpower}
STATE=${RACKPOWER_STATE_DIR:-/var/spool/slurmctld/rackpower}/${SLURM_JOB_ID:?SLURM_JOB_ID not set}
auth=()
[ -n "${RACKPOWER_TOKEN_FILE:-}" ] && auth=(--token-file "$RACKPOWER_TOKEN_FILE")

[ -d "$STATE" ] || exit 0
for f in "$STATE"/*; do
    [ -f "$f" ] || continue
    # shellcheck disable=SC2086
    $CLI reserve --release "$(cat "$f")" "${auth[@]}" >/dev/null 2>&1 || true
    rm -f "$f"
done
rmdir "$STATE" 2>/dev/null || true
exit 0
