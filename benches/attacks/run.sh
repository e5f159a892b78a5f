#!/usr/bin/env bash
# The outside review's resource attacks, re-run against the release binary
# with tools keyward did not write (h2load; Python's sockets for slow
# bodies), reporting keyward's RSS before, at peak and after each, and a
# well-behaved client's latency (h2load, its own connection) beside it.
# Loopback only. A report, not a test: nothing here passes or fails on time.
#
#   cargo build --release && bash benches/attacks/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${KEYWARD_BIN:-target/release/keyward}
work=$(mktemp -d)
trap 'touch "$work/done"; kill $(jobs -p) 2>/dev/null || true; sleep 0.3; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=$(free_port); rest=$(free_port)
"$bin" serve --data-dir "$work/data" --listen "127.0.0.1:$grpc" --metrics-listen 127.0.0.1:0 \
  --http-listen "127.0.0.1:$rest" --log-format json 2>"$work/serve.log" &
pid=$!
for _ in $(seq 100); do grpcurl -plaintext "127.0.0.1:$grpc" grpc.health.v1.Health/Check >/dev/null 2>&1 && break; sleep 0.1; done
admin=$(cat "$work/data/admin.token")
secret=$(grpcurl -plaintext -H "authorization: Bearer $admin" \
  -d '{"name":"bench","scopes":["mail.send"],"account_id":"acme"}' \
  "127.0.0.1:$grpc" keyward.v1.KeyManager/CreateKey | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
# gRPC bodies: AuthorizeRequest{key:"x"} (unauthenticated), and a real call.
python3 - "$work" "$secret" <<'PY'
import sys
work, secret = sys.argv[1], sys.argv[2]
def field(n, s): b = s.encode(); return bytes([n << 3 | 2, len(b)]) + b
def grpc(msg): return b"\0" + len(msg).to_bytes(4, "big") + msg
open(f"{work}/x.bin", "wb").write(grpc(field(1, "x")))
open(f"{work}/ok.bin", "wb").write(grpc(field(1, secret) + field(2, "POST") + field(3, "/v3/mail/send")))
PY
rss() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid/status"; }
peak() { # samples RSS every 100 ms until the file $1 exists; prints the max
  local max=0 now
  while [ ! -e "$1" ]; do now=$(rss); [ "$now" -gt "$max" ] && max=$now; sleep 0.1; done
  echo "$max"
}
grpc_headers=(-H 'content-type: application/grpc' -H 'te: trailers')
normal_client() { # well-behaved Authorize calls on their own connection
  h2load -n "${1:-4000}" -c 1 -m 1 "${grpc_headers[@]}" -d "$work/ok.bin" \
    "http://127.0.0.1:$grpc/keyward.v1.Authorizer/Authorize" 2>&1 \
    | awk '/requests:/ {req=$0} /time for request:/ {print "    normal client: " $0} /^status codes/ {print "    normal client " $0}'
}
echo "keyward $($bin --version) (pid $pid); RSS at start: $(rss) MiB"
echo "baseline (no attack):"; normal_client

echo
echo "1. zero-window flood: h2load -n 400000 -c 1 -m 400000 -w 0, unauthenticated Authorize, 10 s"
rm -f "$work/done"; (peak "$work/done" >"$work/peak") &
timeout 10 h2load -n 400000 -c 1 -m 400000 -w 0 "${grpc_headers[@]}" -d "$work/x.bin" \
  "http://127.0.0.1:$grpc/keyward.v1.Authorizer/Authorize" >"$work/flood.log" 2>&1 &
attack=$!
sleep 2; normal_client; wait "$attack" || true
touch "$work/done"; sleep 0.3
echo "    peak RSS during the flood: $(cat "$work/peak") MiB; after it: $(rss) MiB"
grep -E 'streams|requests:' "$work/flood.log" | sed 's/^/    h2load: /' | head -2 || true

echo
echo "2. slow bodies: 600 REST connections, a bogus token, Content-Length 1 MiB, one byte a second"
rm -f "$work/done"; (peak "$work/done" >"$work/peak") &
python3 - "$rest" >"$work/slow.log" 2>&1 <<'PY' &
import socket, sys, time
port = int(sys.argv[1])
conns, answered = [], 0
for _ in range(600):
    s = socket.create_connection(("127.0.0.1", port)); s.settimeout(0.01)
    s.sendall(b"POST /v3/api_keys HTTP/1.1\r\nhost: x\r\nauthorization: Bearer bogus\r\n"
              b"content-type: application/json\r\ncontent-length: 1048576\r\n\r\n{")
    conns.append(s)
for second in range(10):
    for s in list(conns):
        try:
            if s.recv(1024):
                answered += 1; conns.remove(s); s.close(); continue
        except socket.timeout:
            pass
        except OSError:
            conns.remove(s); continue
        try: s.sendall(b" ")
        except OSError: conns.remove(s)
    time.sleep(1)
print(f"answered (refused at once) {answered} of 600; still open after 10 s: {len(conns)}")
PY
attack=$!
sleep 2; normal_client; wait "$attack" || true
touch "$work/done"; sleep 0.3
echo "    peak RSS during slow bodies: $(cat "$work/peak") MiB; after: $(rss) MiB"
sed 's/^/    /' "$work/slow.log"
