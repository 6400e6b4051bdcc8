#!/usr/bin/env bash
# Load comparison: pullgate, the CNCF distribution registry in proxy mode, and
# nginx (one worker, sendfile) serving the same bytes as static files, all on
# this machine, in one run, against the same upstream (a plain distribution
# registry holding images this script writes).
#
#   benches/load.sh                 # full run (1 GiB blob, 10 s per wrk run)
#   BLOB_MIB=256 DURATION=5 benches/load.sh
#   PG_WORKERS=2 benches/load.sh    # pullgate with two worker threads (default 1, as nginx)
#   TLS=0 benches/load.sh           # leave out the TLS part (the site gateway's)
#   PACE_MS=2 benches/load.sh       # the think time of the same-load manifest runs (default 1)
#
# Prints a table and the ratios that BENCHMARKS.md records. Needs the Debian
# packages docker-registry, skopeo, nginx-light, wrk, curl, nghttp2-client
# (h2load), apache2-utils (htpasswd), openssl (installed when missing) and a
# release build of pullgate (built here).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
BLOB_MIB=${BLOB_MIB:-1024}
COLD_MIB=${COLD_MIB:-256}
COLD_CLIENTS=${COLD_CLIENTS:-32}
# pullgate's worker threads; 1 matches nginx's one worker process.
PG_WORKERS=${PG_WORKERS:-1}
TLS=${TLS:-1}

. benches/lib.sh
bench_install load.sh docker-registry:docker-registry skopeo:skopeo nginx:nginx-light wrk:wrk curl:curl python3:python3 \
            h2load:nghttp2-client htpasswd:apache2-utils openssl:openssl

bench_build load.sh

bench_work load.sh
chmod 755 "$WORK"   # nginx workers run as an unprivileged user

start_registry() { # name port [remoteurl]
  local name=$1 p=$2 remote=${3:-}
  mkdir -p "$WORK/$name"
  cat > "$WORK/$name/config.yml" <<YML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $WORK/$name/storage
http:
  addr: 127.0.0.1:$p
  secret: load-test-only
YML
  if [ -n "$remote" ]; then printf 'proxy:\n  remoteurl: %s\n' "$remote" >> "$WORK/$name/config.yml"; fi
  docker-registry serve "$WORK/$name/config.yml" > "$WORK/$name/log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/v2/" >/dev/null && return; sleep 0.1; done
  echo "registry $name did not start"; cat "$WORK/$name/log"; exit 1
}

cpu_ticks() { # pid... -> utime+stime of the processes, in clock ticks
  local total=0
  for p in "$@"; do
    read -r -a f < "/proc/$p/stat"
    total=$((total + f[13] + f[14]))
  done
  echo "$total"
}

echo "load.sh: writing test images (${BLOB_MIB} MiB and ${COLD_MIB} MiB layers)"
python3 - "$WORK/layout" "$BLOB_MIB" "$COLD_MIB" <<'PY'
import hashlib, json, os, sys
root, blob_mib, cold_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(f"{root}/blobs/sha256", exist_ok=True)
open(f"{root}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{root}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d, len(data)
def put_random(mib, seed):
    h, tmp = hashlib.sha256(), f"{root}/tmp-{seed}"
    with open(tmp, "wb") as f:
        for _ in range(mib):
            chunk = os.urandom(1 << 20)
            h.update(chunk); f.write(chunk)
    d = h.hexdigest()
    os.rename(tmp, f"{root}/blobs/sha256/{d}")
    return "sha256:" + d, mib << 20
entries = []
def image(tag, layer):
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer[0]]}}).encode()
    c = put(cfg)
    m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c[0], "size": c[1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer[0], "size": layer[1]}]}).encode()
    md = put(m)
    entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md[0], "size": md[1],
                    "annotations": {"org.opencontainers.image.ref.name": tag}})
    return md[0], layer[0]
out = {}
out["small"] = image("small", put(os.urandom(1024)))
out["big"] = image("big", put_random(blob_mib, 1))
out["cold"] = image("cold", put_random(cold_mib, 2))
json.dump({"schemaVersion": 2, "manifests": entries}, open(f"{root}/index.json", "w"))
for k, (m, l) in out.items():
    print(f"{k} {m} {l}")
PY
python3 - "$WORK/layout" > "$WORK/digests" <<'PY'
import json, sys
idx = json.load(open(sys.argv[1] + "/index.json"))
for e in idx["manifests"]:
    m = json.load(open(sys.argv[1] + "/blobs/sha256/" + e["digest"][7:]))
    print(e["annotations"]["org.opencontainers.image.ref.name"], e["digest"], m["layers"][0]["digest"])
PY
read -r _ SMALL_M _ < <(grep '^small ' "$WORK/digests")
read -r _ _ BIG_L < <(grep '^big ' "$WORK/digests")
read -r _ _ COLD_L < <(grep '^cold ' "$WORK/digests")

UP=$(port); DIST=$(port); PG=$(port); PGADMIN=$(port); NG=$(port)
start_registry upstream "$UP"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' > "$WORK/policy.json"
for tag in small big cold; do
  skopeo --policy "$WORK/policy.json" copy --quiet --preserve-digests --dest-tls-verify=false \
    "oci:$WORK/layout:$tag" "docker://127.0.0.1:$UP/bench/app:$tag"
done
start_registry distribution "$DIST" "http://127.0.0.1:$UP"
DIST_PID=${PIDS[-1]}

cat > "$WORK/pullgate.toml" <<TOML
[server]
listen = "127.0.0.1:$PG"
workers = $PG_WORKERS
[admin]
listen = "127.0.0.1:$PGADMIN"
[storage]
path = "$WORK/pullgate-data"
tag_ttl = "5m"
[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:$UP"
default = true
[[policy]]
name = "all"
match = ["**"]
TOML
RUST_LOG=warn "$PULLGATE" serve --config "$WORK/pullgate.toml" > "$WORK/pullgate.log" 2>&1 &
PG_PID=$!; PIDS+=($PG_PID)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PG/v2/" >/dev/null && break; sleep 0.1; done

# A second pullgate whose policy requires a signature: the small image is
# approved locally (pullgate keygen + approve), so its verdict needs no
# upstream signature and the run measures the cached-verdict path.
PGS=$(port); PGSADMIN=$(port)
"$PULLGATE" keygen --scheme ed25519 --out "$WORK/approver" > /dev/null
cat > "$WORK/pullgate-signed.toml" <<TOML
[keys]
approver = "$WORK/approver.pub"
[server]
listen = "127.0.0.1:$PGS"
workers = $PG_WORKERS
[admin]
listen = "127.0.0.1:$PGSADMIN"
[storage]
path = "$WORK/pullgate-signed-data"
tag_ttl = "5m"
[[upstream]]
name = "docker.io"
url = "http://127.0.0.1:$UP"
default = true
[[policy]]
name = "signed"
match = ["**"]
signed_by = ["approver"]
TOML
"$PULLGATE" approve "docker.io/bench/app@$SMALL_M" --key "$WORK/approver.key" --config "$WORK/pullgate-signed.toml" > /dev/null
RUST_LOG=warn "$PULLGATE" serve --config "$WORK/pullgate-signed.toml" > "$WORK/pullgate-signed.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PGS/v2/" >/dev/null && break; sleep 0.1; done

# A third pullgate with the audit log on, recording approvals too: one JSON
# line per request, the heaviest audit setting.
PGA=$(port); PGAADMIN=$(port)
sed -e "s/127.0.0.1:$PG\"/127.0.0.1:$PGA\"/" -e "s/127.0.0.1:$PGADMIN\"/127.0.0.1:$PGAADMIN\"/" \
    -e "s|$WORK/pullgate-data|$WORK/pullgate-audit-data|" "$WORK/pullgate.toml" > "$WORK/pullgate-audit.toml"
printf '[audit]\npath = "%s"\napprovals = true\n' "$WORK/audit.jsonl" >> "$WORK/pullgate-audit.toml"
RUST_LOG=warn "$PULLGATE" serve --config "$WORK/pullgate-audit.toml" > "$WORK/pullgate-audit.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PGA/v2/" >/dev/null && break; sleep 0.1; done

# A fourth pullgate with 100 name rewrites and 1000 tag pins configured,
# none of them for the image pulled: what the rewrite step costs a pull it
# does not change.
PGR=$(port); PGRADMIN=$(port)
sed -e "s/127.0.0.1:$PG\"/127.0.0.1:$PGR\"/" -e "s/127.0.0.1:$PGADMIN\"/127.0.0.1:$PGRADMIN\"/" \
    -e "s|$WORK/pullgate-data|$WORK/pullgate-rewrites-data|" "$WORK/pullgate.toml" > "$WORK/pullgate-rewrites.toml"
{
  for i in $(seq 100); do
    printf '[[rewrite]]\nfrom = "docker.io/team%d/**"\nto = "docker.io/mirror/team%d/**"\n' "$i" "$i"
  done
  printf '[pins]\n'
  for i in $(seq 1000); do
    printf '"docker.io/library/img%d:1" = "sha256:%064x"\n' "$i" "$i"
  done
} >> "$WORK/pullgate-rewrites.toml"
RUST_LOG=warn "$PULLGATE" serve --config "$WORK/pullgate-rewrites.toml" > "$WORK/pullgate-rewrites.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PGR/v2/" >/dev/null && break; sleep 0.1; done

# TLS: pullgate with server.tls (and a second one with htpasswd users as
# well), nginx with a TLS server next to its plain one; one certificate
# (ECDSA P-256) for all of them.
NGT=$(port); PGT=$(port); PGTADMIN=$(port); PGU=$(port); PGUADMIN=$(port)
mkdir -p "$WORK/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" 2>/dev/null
chmod 644 "$WORK/tls/key.pem"   # nginx reads it as root, pullgate as this user: a throwaway key
if [ "$TLS" = 1 ]; then
  sed -e "s/127.0.0.1:$PG\"/127.0.0.1:$PGT\"/" -e "s/127.0.0.1:$PGADMIN\"/127.0.0.1:$PGTADMIN\"/" \
      -e "s|$WORK/pullgate-data|$WORK/pullgate-tls-data|" \
      -e "/^\[server\]/a tls = { cert = \"$WORK/tls/cert.pem\", key = \"$WORK/tls/key.pem\" }" \
      "$WORK/pullgate.toml" > "$WORK/pullgate-tls.toml"
  RUST_LOG=warn "$PULLGATE" serve --config "$WORK/pullgate-tls.toml" > "$WORK/pullgate-tls.log" 2>&1 &
  PGT_PID=$!; PIDS+=($PGT_PID)
  htpasswd -B -C 10 -b -c "$WORK/users.htpasswd" bench bench-password 2>/dev/null
  sed -e "s/127.0.0.1:$PGT\"/127.0.0.1:$PGU\"/" -e "s/127.0.0.1:$PGTADMIN\"/127.0.0.1:$PGUADMIN\"/" \
      -e "s|$WORK/pullgate-tls-data|$WORK/pullgate-users-data|" "$WORK/pullgate-tls.toml" > "$WORK/pullgate-users.toml"
  printf '[auth]\nhtpasswd = "%s"\n' "$WORK/users.htpasswd" >> "$WORK/pullgate-users.toml"
  RUST_LOG=warn "$PULLGATE" serve --config "$WORK/pullgate-users.toml" > "$WORK/pullgate-users.log" 2>&1 &
  PIDS+=($!)
  for p in $PGT $PGU; do
    for _ in $(seq 100); do curl -s --cacert "$WORK/tls/cert.pem" -o /dev/null "https://127.0.0.1:$p/v2/" && break; sleep 0.1; done
  done
fi

# nginx: one worker, sendfile, the same manifest and blob bytes as files.
mkdir -p "$WORK/static/v2/bench/app/manifests" "$WORK/static/v2/bench/app/blobs" "$WORK/nginx"
cp "$WORK/layout/blobs/sha256/${SMALL_M#sha256:}" "$WORK/static/v2/bench/app/manifests/small"
ln "$WORK/layout/blobs/sha256/${BIG_L#sha256:}" "$WORK/static/v2/bench/app/blobs/$BIG_L" 2>/dev/null \
  || cp "$WORK/layout/blobs/sha256/${BIG_L#sha256:}" "$WORK/static/v2/bench/app/blobs/$BIG_L"
cat > "$WORK/nginx/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  default_type application/vnd.oci.image.manifest.v1+json;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx; fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  server { listen 127.0.0.1:$NG; root $WORK/static; }
  server {
    listen 127.0.0.1:$NGT ssl http2;
    ssl_certificate $WORK/tls/cert.pem;
    ssl_certificate_key $WORK/tls/key.pem;
    root $WORK/static;
  }
}
NGX
nginx -c "$WORK/nginx/nginx.conf" &
NG_PID=$!; PIDS+=($NG_PID)
sleep 0.5
NG_WORKERS=$(pgrep -P "$NG_PID" | tr '\n' ' ')

ACCEPT="Accept: application/vnd.oci.image.manifest.v1+json"
D_URL="http://127.0.0.1:$DIST/v2/bench/app"
P_URL="http://127.0.0.1:$PG/v2/bench/app"
N_URL="http://127.0.0.1:$NG/v2/bench/app"

echo "load.sh: warming the caches"
warm() {
  curl -sS -f -H "$ACCEPT" -o /dev/null "$1" && return
  echo "load.sh: warming $1 failed:"; curl -sS -H "$ACCEPT" "$1" | head -c 600; echo
  for log in "$WORK/pullgate.log" "$WORK/distribution/log"; do echo "== $log"; tail -n 20 "$log"; done
  exit 1
}
for u in "$D_URL" "$P_URL"; do
  warm "$u/manifests/small"
  warm "$u/manifests/big"
  warm "$u/blobs/$BIG_L"
done
warm "$N_URL/manifests/small"
S_URL="http://127.0.0.1:$PGS/v2/bench/app"
A_URL="http://127.0.0.1:$PGA/v2/bench/app"
R_URL="http://127.0.0.1:$PGR/v2/bench/app"
warm "$A_URL/manifests/small"
warm "$R_URL/manifests/small"
warm "$S_URL/manifests/small"

# Every server must answer the measured URLs with 200: a fast error page
# would measure nothing.
for u in "$N_URL/manifests/small" "$P_URL/manifests/small" "$D_URL/manifests/small" \
         "$N_URL/blobs/$BIG_L" "$P_URL/blobs/$BIG_L" "$D_URL/blobs/$BIG_L"; do
  code=$(curl -s -o /dev/null -r 0-0 -w '%{http_code}' -H "$ACCEPT" "$u")
  case "$code" in 200|206) ;; *) echo "load.sh: $u answered $code, not 200"; exit 1 ;; esac
done

wrk_run() { # url [wrk options] -> "req/s p99"; fails when any answer was not a 2xx
  local url=$1 out
  shift
  out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$@" -H "$ACCEPT" "$url")
  if grep -q "Non-2xx or 3xx responses" <<<"$out"; then
    echo "load.sh: $url gave non-2xx answers:" >&2; echo "$out" >&2; exit 1
  fi
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  echo "$rps $p99"
}

echo "load.sh: manifests (wrk, $CONNS connections, ${DURATION}s each; ${ROUNDS:-3} rounds, median)"
# nginx and the four pullgates take turns, ROUNDS times, so that the
# machine's drift over the run falls on all of them; the median of each is
# reported. Each round starts one further along the list, so no server
# always runs first or last.
ROUNDS=${ROUNDS:-3}
declare -A runs
order=(N P S A R)
for round in $(seq "$ROUNDS"); do
  for k in 0 1 2 3 4; do
    who=${order[$(( (round + k) % 5 ))]}
    u="${who}_URL"
    runs[$who]+="$(wrk_run "${!u}/manifests/small")"$'\n'
  done
done
median() { # "rps p99" lines -> the line with the median rps
  sort -n | awk '{l[NR]=$0} END {print l[int((NR+1)/2)]}'
}
rounds_of() { # "rps p99" lines -> "rps/p99 ...", each round
  awk 'NF {printf "%s%d/%s", (n++ ? " " : ""), $1, $2}' <<<"$1"
}
read -r N_TAG N_TAG99 < <(printf '%s' "${runs[N]}" | median)
read -r P_TAG P_TAG99 < <(printf '%s' "${runs[P]}" | median)
read -r S_TAG S_TAG99 < <(printf '%s' "${runs[S]}" | median)
read -r A_TAG A_TAG99 < <(printf '%s' "${runs[A]}" | median)
read -r R_TAG R_TAG99 < <(printf '%s' "${runs[R]}" | median)
# The same offered load for nginx and pullgate: each connection waits
# PACE_MS before each request (wrk's delay()), which keeps both below what
# they can serve, so the p99 is the server's own rather than the queue of a
# machine whose two cores are saturated by wrk and the server together.
PACE_MS=${PACE_MS:-1}
printf 'function delay() return %s end\n' "$PACE_MS" > "$WORK/pace.lua"
echo "load.sh: manifests at the same load (each connection waits ${PACE_MS} ms between requests; $ROUNDS rounds)"
declare -A paced
for round in $(seq "$ROUNDS"); do
  for who in $( ((round % 2)) && echo N P || echo P N); do
    u="${who}_URL"
    paced[$who]+="$(wrk_run "${!u}/manifests/small" -s "$WORK/pace.lua")"$'\n'
  done
done
read -r D_TAG D_TAG99 < <(wrk_run "$D_URL/manifests/small")
read -r P_DIG P_DIG99 < <(wrk_run "$P_URL/manifests/$SMALL_M")
read -r D_DIG D_DIG99 < <(wrk_run "$D_URL/manifests/$SMALL_M")

blob_run() { # url pids... -> "bytes/s cpu_s_per_gib machine_s_per_gib", over 3 downloads
  # On loopback the receiver's kernel work is charged to whichever process
  # runs, so the whole machine's busy time (curl included) is the fair cost.
  local url=$1; shift
  local t0 t1 m0 m1 speeds=()
  t0=$(cpu_ticks "$@"); m0=$(machine_busy)
  for _ in 1 2 3; do
    speeds+=("$(curl -sf -o /dev/null -w '%{speed_download}' "$url")")
  done
  t1=$(cpu_ticks "$@"); m1=$(machine_busy)
  python3 -c "import os; hz=os.sysconf('SC_CLK_TCK'); s=[${speeds[0]},${speeds[1]},${speeds[2]}]; g=3*$BLOB_MIB/1024; print(sum(s)/3, ($t1-$t0)/hz/g, ($m1-$m0)/hz/g)"
}
echo "load.sh: cached blob, one client (${BLOB_MIB} MiB, 3 downloads each; nginx pids $NG_PID $NG_WORKERS)"
# Rotated like the manifest rounds; the median of ROUNDS per server.
declare -A blobs
border=(N P D)
for round in $(seq "$ROUNDS"); do
  for k in 0 1 2; do
    who=${border[$(( (round + k) % 3 ))]}
    case $who in
      N) blobs[N]+="$(blob_run "$N_URL/blobs/$BIG_L" $NG_PID $NG_WORKERS)"$'\n' ;;
      P) blobs[P]+="$(blob_run "$P_URL/blobs/$BIG_L" "$PG_PID")"$'\n' ;;
      D) blobs[D]+="$(blob_run "$D_URL/blobs/$BIG_L" "$DIST_PID")"$'\n' ;;
    esac
  done
done
read -r N_BLOB N_CPU N_MCPU < <(printf '%s' "${blobs[N]}" | median)
read -r P_BLOB P_CPU P_MCPU < <(printf '%s' "${blobs[P]}" | median)
read -r D_BLOB D_CPU D_MCPU < <(printf '%s' "${blobs[D]}" | median)
blob_rounds() { # the rounds of one server: "MB/s/machine s per GiB ..."
  printf '%s' "$1" | awk '{printf "%s%.0f/%.2f", (NR > 1 ? " " : ""), $1 / 1e6, $3}'
}

echo "load.sh: $COLD_CLIENTS concurrent cold pulls of one ${COLD_MIB} MiB blob through pullgate"
# One curl process runs all clients at once (--parallel-immediate opens
# every connection without waiting), each noting when its first body byte
# arrived relative to its own start; the spread between the earliest and
# the latest is how long the others lagged behind the first byte.
args=()
for _ in $(seq "$COLD_CLIENTS"); do args+=(-o /dev/null "$P_URL/blobs/$COLD_L"); done
curl -s --parallel --parallel-immediate --parallel-max "$COLD_CLIENTS" \
  -w '%{time_starttransfer} %{size_download} %{http_code}\n' "${args[@]}" > "$WORK/cold.raw"
python3 - "$WORK/cold.raw" > "$WORK/cold" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
firsts = [float(r[0]) for r in rows]
print(f"{(max(firsts) - min(firsts)) * 1000:.1f} {min(firsts) * 1000:.1f}")
for r in rows: print(r[1], r[2])
PY
COLD_FETCHES=$(grep -c "GET /v2/bench/app/blobs/$COLD_L" "$WORK/upstream/log" || true)
COLD_OK=$(awk -v want=$((COLD_MIB << 20)) 'NR>1 && $1==want && $2==200' "$WORK/cold" | wc -l)
read -r COLD_SPREAD COLD_FIRST < "$WORK/cold"

echo "load.sh: $COLD_CLIENTS warm clients of the ${BLOB_MIB} MiB blob through pullgate"
clients=()
for i in $(seq "$COLD_CLIENTS"); do
  curl -sf -o /dev/null "$P_URL/blobs/$BIG_L" &
  clients+=($!)
done
wait "${clients[@]}"
PG_RSS=$(awk '/VmHWM/ {print $2}' "/proc/$PG_PID/status")

ratio() { python3 -c "print(f'{float($1)/float($2):.2f}')"; }

TLS_REPORT=""
if [ "$TLS" = 1 ]; then
  echo "load.sh: TLS: manifests (h2load, $CONNS connections, HTTP/2 and HTTP/1.1, ${DURATION}s each, $ROUNDS rounds, median)"
  TA="https://127.0.0.1:$NGT/v2/bench/app"
  TP="https://127.0.0.1:$PGT/v2/bench/app"
  TU="https://127.0.0.1:$PGU/v2/bench/app"
  BASIC="authorization: Basic $(printf 'bench:bench-password' | base64)"
  for u in "$TP/manifests/small" "$TU/manifests/small" "$TP/blobs/$BIG_L"; do
    curl -sS -f --cacert "$WORK/tls/cert.pem" -H "$ACCEPT" -H "$BASIC" -o /dev/null "$u" \
      || { echo "load.sh: warming $u failed"; tail -n 20 "$WORK/pullgate-tls.log"; exit 1; }
  done
  for u in "$TA/manifests/small" "$TP/manifests/small" "$TA/blobs/$BIG_L" "$TP/blobs/$BIG_L"; do
    code=$(curl -s --cacert "$WORK/tls/cert.pem" -o /dev/null -r 0-0 -w '%{http_code} %{http_version}' --http2 -H "$ACCEPT" "$u")
    case "$code" in "200 2"|"206 2") ;; *) echo "load.sh: $u answered $code, not 200 over HTTP/2"; exit 1 ;; esac
  done
  h2_run() { # url [h2load args...] -> req/s; fails when any answer was not a 2xx
    local url=$1 out; shift
    out=$(h2load -c"$CONNS" -t2 -m1 -D"$DURATION" -H "$ACCEPT" "$@" "$url" 2>&1)
    local ok bad
    ok=$(awk '/^status codes:/ {print $3}' <<<"$out")
    bad=$(awk '/^status codes:/ {print $5+$7+$9}' <<<"$out")
    if [ -z "$ok" ] || [ "$ok" = 0 ] || [ "$bad" != 0 ]; then
      echo "load.sh: $url gave errors:" >&2; echo "$out" >&2; exit 1
    fi
    awk '/^finished in/ {print $4}' <<<"$out"
  }
  declare -A tls
  tlsorder=(N2 P2 N1 P1 U2)
  for round in $(seq "$ROUNDS"); do
    for k in 0 1 2 3 4; do
      who=${tlsorder[$(( (round + k) % 5 ))]}
      case $who in
        N2) tls[N2]+="$(h2_run "$TA/manifests/small")"$'\n' ;;
        P2) tls[P2]+="$(h2_run "$TP/manifests/small")"$'\n' ;;
        N1) tls[N1]+="$(h2_run "$TA/manifests/small" --h1)"$'\n' ;;
        P1) tls[P1]+="$(h2_run "$TP/manifests/small" --h1)"$'\n' ;;
        U2) tls[U2]+="$(h2_run "$TU/manifests/small" -H "$BASIC")"$'\n' ;;
      esac
    done
  done
  for k in N2 P2 N1 P1 U2; do tls[$k]=$(printf '%s' "${tls[$k]}" | median); done
  echo "load.sh: TLS: cached blob, one client (curl, HTTP/1.1 and HTTP/2)"
  tls_blob() { # url curl-args... -> bytes/s, median of ROUNDS
    local url=$1; shift
    for _ in $(seq "$ROUNDS"); do
      curl -sf --cacert "$WORK/tls/cert.pem" "$@" -o /dev/null -w '%{speed_download}\n' "$url"
    done | sort -n | awk '{l[NR]=$0} END {print l[int((NR+1)/2)]}'
  }
  NB1=$(tls_blob "$TA/blobs/$BIG_L" --http1.1); PB1=$(tls_blob "$TP/blobs/$BIG_L" --http1.1)
  NB2=$(tls_blob "$TA/blobs/$BIG_L" --http2); PB2=$(tls_blob "$TP/blobs/$BIG_L" --http2)
  mb() { python3 -c "print(round($1/1e6))"; }
  TLS_REPORT=$(cat <<TLSEOF
TLS 1.3, ECDSA P-256, one certificate; h2load -c$CONNS -t2 -m1   req/s (median of $ROUNDS)
  nginx HTTP/2          ${tls[N2]}
  pullgate HTTP/2       ${tls[P2]}
  nginx HTTP/1.1        ${tls[N1]}
  pullgate HTTP/1.1     ${tls[P1]}
  pullgate HTTP/2 users ${tls[U2]}   ([auth] htpasswd, bcrypt cost 10, Basic on every request)
TLS cached blob, 1 client (curl)   MB/s
  nginx HTTP/1.1 $(mb "$NB1")   HTTP/2 $(mb "$NB2")
  pullgate HTTP/1.1 $(mb "$PB1")   HTTP/2 $(mb "$PB2")

TLS ratios
  pullgate / nginx over TLS, manifest by tag, HTTP/2:    $(ratio "${tls[P2]}" "${tls[N2]}")
  pullgate / nginx over TLS, manifest by tag, HTTP/1.1:  $(ratio "${tls[P1]}" "${tls[N1]}")
  pullgate HTTP/2 / HTTP/1.1 over TLS:                   $(ratio "${tls[P2]}" "${tls[P1]}")
  nginx HTTP/2 / HTTP/1.1 over TLS:                      $(ratio "${tls[N2]}" "${tls[N1]}")
  htpasswd users on / off (TLS, HTTP/2):                 $(ratio "${tls[U2]}" "${tls[P2]}")
  pullgate / nginx over TLS, blob, HTTP/1.1:             $(ratio "$PB1" "$NB1")
  pullgate / nginx over TLS, blob, HTTP/2:               $(ratio "$PB2" "$NB2")
TLSEOF
)
fi

cat <<EOF

== results ($(date -u +%Y-%m-%dT%H:%MZ); pullgate workers=$PG_WORKERS, nginx 1 worker; $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)) ==
manifest by tag     req/s   p99
  nginx (static)    $N_TAG  $N_TAG99
  pullgate          $P_TAG  $P_TAG99
  pullgate signed   $S_TAG  $S_TAG99   (signed_by policy, cached verdict)
  pullgate audited  $A_TAG  $A_TAG99   (audit log with approvals: a line per request)
  pullgate rewrites $R_TAG  $R_TAG99   (100 rewrites + 1000 pins configured, none for this image)
  distribution      $D_TAG  $D_TAG99
  rounds (req/s/p99): nginx $(rounds_of "${runs[N]}"); pullgate $(rounds_of "${runs[P]}")
manifest by tag at the same load (each connection waits ${PACE_MS} ms between requests), rounds (req/s/p99)
  nginx (static)    $(rounds_of "${paced[N]}")
  pullgate          $(rounds_of "${paced[P]}")
manifest by digest
  pullgate          $P_DIG  $P_DIG99
  distribution      $D_DIG  $D_DIG99
cached blob, 1 client ($BLOB_MIB MiB, median of $ROUNDS x 3)   MB/s    CPU s/GiB (process)   CPU s/GiB (whole machine)
  nginx (sendfile)  $(python3 -c "print(round($N_BLOB/1e6))")   $N_CPU   $N_MCPU
  pullgate          $(python3 -c "print(round($P_BLOB/1e6))")   $P_CPU   $P_MCPU
  distribution      $(python3 -c "print(round($D_BLOB/1e6))")   $D_CPU   $D_MCPU
  rounds (MB/s/machine CPU s per GiB): nginx $(blob_rounds "${blobs[N]}"); pullgate $(blob_rounds "${blobs[P]}"); distribution $(blob_rounds "${blobs[D]}")
cold blob, $COLD_CLIENTS clients ($COLD_MIB MiB): upstream fetches $COLD_FETCHES, complete transfers $COLD_OK/$COLD_CLIENTS,
  first byte: earliest client ${COLD_FIRST} ms after its start, the last one ${COLD_SPREAD} ms after the earliest
pullgate peak RSS (VmHWM) after all runs: $((PG_RSS / 1024)) MiB

ratios
  pullgate / nginx, manifest by tag:          $(ratio "$P_TAG" "$N_TAG")
  pullgate / distribution, manifest by tag:   $(ratio "$P_TAG" "$D_TAG")
  signed_by policy / no policy, by tag:       $(ratio "$S_TAG" "$P_TAG")
  audit log on / off, by tag:                 $(ratio "$A_TAG" "$P_TAG")
  rewrites and pins / none, by tag:           $(ratio "$R_TAG" "$P_TAG")
  pullgate / distribution, manifest by digest: $(ratio "$P_DIG" "$D_DIG")
  pullgate / nginx, blob throughput:          $(ratio "$P_BLOB" "$N_BLOB")
  pullgate / distribution, blob throughput:   $(ratio "$P_BLOB" "$D_BLOB")
  pullgate / distribution, CPU per GiB:       $(ratio "$P_CPU" "$D_CPU")   (process)
  pullgate / nginx, CPU per GiB:              $(ratio "$P_CPU" "$N_CPU")   (process)
  pullgate / distribution, machine CPU/GiB:   $(ratio "$P_MCPU" "$D_MCPU")
  pullgate / nginx, machine CPU/GiB:          $(ratio "$P_MCPU" "$N_MCPU")

$TLS_REPORT
EOF
