#!/usr/bin/env bash
# A device on MQTT and an agent on XMTP talk through Gatehouse — the README's walkthrough as
# one script. The daemon's embedded MQTT broker serves the device (mosquitto_pub/_sub);
# its own ports in a temporary directory; cleans up.
#   GATEHOUSE=./target/debug/gatehouse examples/walkthrough.sh
set -euo pipefail
GATEHOUSE=${GATEHOUSE:-./target/debug/gatehouse}
GATEHOUSE=$(realpath "$GATEHOUSE")
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MQTT=$(free_port); NODE=$(free_port); ADMIN=$(free_port)
cd "$work"

# 1. No broker to install: the daemon runs one (channels.mqtt.embedded_broker, step 3).

# 2. The agent's identity (keys are local; no node needed yet).
AGENT=$("$GATEHOUSE" agent --home agent --node "http://127.0.0.1:$NODE" id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["inbox_id"])')

# 3. The bridge, with the agent on its route.
cat > config.yaml <<YAML
data_dir: data
node: {listen: 127.0.0.1:$NODE}
admin: {listen: 127.0.0.1:$ADMIN}
channels: {mqtt: {embedded_broker: {listen: 127.0.0.1:$MQTT}}}
plugins: {mqtt: {builtin: mqtt}}
routes:
  - {name: devices, channel: mqtt, subscribe: "devices/{device}/up", plugin: mqtt, agents: ["$AGENT"]}
YAML
"$GATEHOUSE" run --config config.yaml 2> daemon.log & pids+=($!)
until grep -qs "MQTT connected" daemon.log; do sleep 0.1; done

# 4. Register the agent, then the device speaks.
"$GATEHOUSE" agent --home agent --node "http://127.0.0.1:$NODE" init >/dev/null
mosquitto_pub -p "$MQTT" -q 1 -t devices/thermo-1/up -m '{"t":21.5}'
"$GATEHOUSE" agent --home agent --node "http://127.0.0.1:$NODE" listen --json --count 1 --timeout 60 | tee received.json

# 5. The agent answers; the device hears it on devices/thermo-1/down.
ENDPOINT=$("$GATEHOUSE" endpoints --json --admin "127.0.0.1:$ADMIN" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["inbox_id"])')
stdbuf -oL mosquitto_sub -d -p "$MQTT" -q 1 -C 1 -t devices/thermo-1/down > down.txt & sub=$!
until grep -qs SUBACK down.txt; do sleep 0.1; done   # subscribed
"$GATEHOUSE" agent --home agent --node "http://127.0.0.1:$NODE" send --to "$ENDPOINT" "set 19.0" >/dev/null
wait "$sub"
echo "device received: $(grep -v -e '^Client ' -e '^Subscribed' down.txt)"
