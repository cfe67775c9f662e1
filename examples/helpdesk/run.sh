#!/usr/bin/env bash
# Help-desk example: a customer mails help@desk.localhost (swaks); the agent reads the mail in
# its XMTP conversation and answers; the answer arrives as a threaded reply at a local mail
# sink (aiosmtpd standing in for the outgoing relay).
#   GATEHOUSE=./target/debug/gatehouse examples/helpdesk/run.sh
# Needs: swaks, python3-aiosmtpd. Runs on free ports in a temporary directory; cleans up.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
G=$(realpath "${GATEHOUSE:-./target/debug/gatehouse}")
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits up to 60 s for a condition (a shell command), or says what it waited for and fails.
waitfor() { for _ in $(seq 600); do eval "$1" && return 0; sleep 0.1; done; echo "timed out waiting for $2" >&2; exit 1; }
# The Python that has aiosmtpd (Debian's python3-aiosmtpd is for /usr/bin/python3).
for PY in python3 /usr/bin/python3; do "$PY" -c 'import aiosmtpd' 2>/dev/null && break; done
"$PY" -c 'import aiosmtpd' 2>/dev/null || { echo "needs aiosmtpd: apt-get install python3-aiosmtpd" >&2; exit 1; }
SMTP=$(port); RELAY=$(port); NODE=$(port); ADMIN=$(port)
cd "$work"
agent() { "$G" agent --home agent --node "http://127.0.0.1:$NODE" "$@"; }

# The outgoing relay: a mail sink writing a maildir.
"$PY" -m aiosmtpd -n -l "127.0.0.1:$RELAY" -c aiosmtpd.handlers.Mailbox "$work/mbox" & pids+=($!)
waitfor "python3 -c \"import socket; socket.create_connection(('127.0.0.1',$RELAY))\" 2>/dev/null" "the mail sink"

AGENT=$(agent id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["inbox_id"])')
sed -e "s/AGENT_INBOX/$AGENT/" -e "s/127.0.0.1:2525/127.0.0.1:$SMTP/" -e "s/port: 2526/port: $RELAY/" \
    -e "s/127.0.0.1:5556/127.0.0.1:$NODE/" -e "s/127.0.0.1:5557/127.0.0.1:$ADMIN/" \
    "$here/config.yaml" > config.yaml
"$G" run --config config.yaml 2> daemon.log & pids+=($!)
waitfor 'grep -q "gatehouse running" daemon.log' "the daemon"
agent init > /dev/null

# The customer writes.
swaks --silent 2 --server "127.0.0.1:$SMTP" --from ann@example.org --to help@desk.localhost \
      --header "Subject: Printer jam" --body "The printer on floor 2 is jammed."

# The agent reads it and answers in the same conversation (the thread).
agent listen --json --count 1 --timeout 60 > mail.json
conversation=$(python3 -c 'import json; print(json.load(open("mail.json"))["conversation"])')
echo "agent got: $(python3 -c 'import json; print(json.load(open("mail.json"))["text"].splitlines()[0])')"
agent send --conversation "$conversation" "A technician is on the way." > /dev/null

# The answer arrives at the relay, threaded.
waitfor 'ls mbox/new/* >/dev/null 2>&1' "the answer at the relay"
reply=$(cat mbox/new/*)
echo "customer got: $(grep -m1 '^Subject:' <<<"$reply") / $(grep -m1 -c '^In-Reply-To:' <<<"$reply") In-Reply-To header / \"$(grep -m1 'technician' <<<"$reply")\""
