#!/usr/bin/env bash
# Thermostat example: a simulated thermostat reports temperatures over MQTT; an agent on XMTP
# reads them, decides a setpoint and answers; the thermostat receives it.
#   GATEHOUSE=./target/debug/gatehouse examples/thermostat/run.sh
# Needs: mosquitto-clients, python3. Runs on free ports in a temporary directory; cleans up.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
G=$(realpath "${GATEHOUSE:-./target/debug/gatehouse}")
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits up to 60 s for a condition (a shell command), or says what it waited for and fails.
waitfor() { for _ in $(seq 600); do eval "$1" && return 0; sleep 0.1; done; echo "timed out waiting for $2" >&2; exit 1; }
MQTT=$(port); NODE=$(port); ADMIN=$(port)
cd "$work"
agent() { "$G" agent --home agent --node "http://127.0.0.1:$NODE" "$@"; }

# The agent's identity, then the example's config with it and this run's ports.
AGENT=$(agent id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["inbox_id"])')
sed -e "s/AGENT_INBOX/$AGENT/" -e "s/127.0.0.1:1883/127.0.0.1:$MQTT/" \
    -e "s/127.0.0.1:5556/127.0.0.1:$NODE/" -e "s/127.0.0.1:5557/127.0.0.1:$ADMIN/" \
    "$here/config.yaml" > config.yaml
"$G" run --config config.yaml 2> daemon.log & pids+=($!)
waitfor 'grep -q "MQTT connected" daemon.log' "the daemon's MQTT connection"
agent init > /dev/null

# The thermostat: listens for its setpoint, then reports three readings.
stdbuf -oL mosquitto_sub -d -p "$MQTT" -q 1 -C 1 -t home/living-room/setpoint > setpoint.txt & sub=$!
waitfor 'grep -qs SUBACK setpoint.txt' "the thermostat's subscription"
for t in 17.5 17.9 18.2; do
  mosquitto_pub -p "$MQTT" -q 1 -t home/living-room/temperature -m "{\"celsius\":$t}"
done

# The agent: reads the three reports, averages them, answers the thermostat.
agent listen --json --count 3 --timeout 60 > readings.json
read -r endpoint average setpoint < <(python3 - readings.json <<'PY'
import json, sys
msgs = [json.loads(l) for l in open(sys.argv[1])]
temps = [json.loads(m["text"])["celsius"] for m in msgs]
avg = sum(temps) / len(temps)
print(msgs[0]["sender_inbox"], round(avg, 2), 21.0 if avg < 19 else 19.0)
PY
)
echo "agent: 3 readings from $endpoint, average $average °C: setpoint $setpoint"
agent send --to "$endpoint" "{\"setpoint\":$setpoint}" > /dev/null
wait "$sub"
echo "thermostat received: $(grep -v -e '^Client ' -e '^Subscribed' setpoint.txt)"
