#!/usr/bin/env bash
# NATS feed example: a billing service publishes three invoice events; the agent receives them
# in its conversation with the "billing" endpoint, adds them up and answers; the answer is
# published on replies.billing, where the service listens.
#   GATEHOUSE=./target/debug/gatehouse examples/nats-feed/run.sh
# Needs: nats-server, python3 (the service is a few lines of NATS protocol over a socket).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
G=$(realpath "${GATEHOUSE:-./target/debug/gatehouse}")
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitfor() { for _ in $(seq 600); do eval "$1" && return 0; sleep 0.1; done; echo "timed out waiting for $2" >&2; exit 1; }
NATS=$(port); NODE=$(port); ADMIN=$(port)
cd "$work"
agent() { "$G" agent --home agent --node "http://127.0.0.1:$NODE" "$@"; }

nats-server -a 127.0.0.1 -p "$NATS" > nats.log 2>&1 & pids+=($!)
waitfor "python3 -c \"import socket; socket.create_connection(('127.0.0.1',$NATS))\" 2>/dev/null" "nats-server"

AGENT=$(agent id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["inbox_id"])')
sed -e "s/AGENT_INBOX/$AGENT/" -e "s/127.0.0.1:4222/127.0.0.1:$NATS/" \
    -e "s/127.0.0.1:5556/127.0.0.1:$NODE/" -e "s/127.0.0.1:5557/127.0.0.1:$ADMIN/" \
    "$here/config.yaml" > config.yaml
"$G" run --config config.yaml 2> daemon.log & pids+=($!)
waitfor 'grep -q "NATS connected" daemon.log' "the daemon's NATS connection"
agent init > /dev/null

# The billing service: a tiny NATS client (CONNECT, SUB, PUB; PING/PONG as a flush).
cat > service.py <<'PY'
import json, socket, sys
port, mode = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port))
f = s.makefile("rb")
f.readline()  # INFO
def flush():
    s.sendall(b"PING\r\n")
    while f.readline().strip() != b"PONG":
        pass
s.sendall(b'CONNECT {"verbose":false}\r\n')
if mode == "listen":
    s.sendall(b"SUB replies.billing 1\r\n")
    flush()
    print("subscribed", flush=True)
    while True:
        line = f.readline().split()
        if line and line[0] == b"MSG":
            print(f.read(int(line[-1])).decode(), flush=True)
            break
else:
    for n, amount in enumerate([12.5, 20.0, 27.5]):
        body = json.dumps({"invoice": n + 1, "amount": amount}).encode()
        s.sendall(b"PUB events.billing.invoice %d\r\n%s\r\n" % (len(body), body))
    flush()
PY
python3 service.py "$NATS" listen > answer.txt & sub=$!
waitfor 'grep -qs subscribed answer.txt' "the service's subscription"
python3 service.py "$NATS" publish

# The agent: three events from the billing endpoint; it answers with the total.
agent listen --json --count 3 --timeout 60 > events.json
read -r endpoint total < <(python3 - events.json <<'PY'
import json, sys
msgs = [json.loads(l) for l in open(sys.argv[1])]
print(msgs[0]["sender_inbox"], sum(json.loads(m["text"])["amount"] for m in msgs))
PY
)
echo "agent: 3 invoices from billing ($endpoint), total $total"
agent send --to "$endpoint" "{\"invoices\":3,\"total\":$total}" > /dev/null
wait "$sub"
echo "billing received: $(tail -n 1 answer.txt)"
