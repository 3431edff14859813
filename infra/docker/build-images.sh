#!/usr/bin/env bash
# Build the Docker images ClaudeCluster workers run in, locally, without pulling anything:
#
#   claudecluster-base:bookworm   Debian minbase + python3, venv, pip, git, CA certificates,
#                                 made with debootstrap and `docker import` (built once, then
#                                 reused while it exists)
#   claudecluster-worker:latest   infra/docker/Dockerfile on top of it (rebuilt only when the
#                                 package sources, the Dockerfile or the base image changed)
#
# Needs a running Docker engine, debootstrap, and root (debootstrap). The Debian mirror and
# pip's package index are read from this machine's apt and pip configuration at run time.
#
# Environment:
#   BASE_IMAGE     base image name      (default claudecluster-base:bookworm)
#   WORKER_IMAGE   worker image name    (default claudecluster-worker:latest)
#   STAGE_IMAGE    name of the build-cache images of the throwaway stages, tagged :deps and
#                  :wheel (default claudecluster-worker-build; local only, never push them)
#   DEBIAN_SUITE   suite to bootstrap   (default bookworm)
#   DEBIAN_MIRROR  Debian mirror URL    (default: the one this machine's apt sources use)
#   FORCE=1        rebuild both images even when cached
#   DOCKER_BUILDKIT=0|1  builder for the worker image (default: BuildKit when the buildx
#                  plugin is installed, else the legacy builder; the Dockerfile works with both)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

BASE_IMAGE=${BASE_IMAGE:-claudecluster-base:bookworm}
WORKER_IMAGE=${WORKER_IMAGE:-claudecluster-worker:latest}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
FORCE=${FORCE:-0}
STAGE_IMAGE=${STAGE_IMAGE:-${WORKER_IMAGE%%:*}-build}
HASH_LABEL=io.claudecluster.source-hash

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
log() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker CLI not found (run .ci/docker-setup)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (run .ci/docker-setup)"

tmp_dirs=()
cleanup() { for d in "${tmp_dirs[@]+"${tmp_dirs[@]}"}"; do rm -rf "$d"; done; }
trap cleanup EXIT

# The first Debian mirror in this machine's apt sources (one-line and deb822 formats) that
# serves the suite's main component; security and updates archives are skipped.
debian_mirror() {
    python3 - "$DEBIAN_SUITE" <<'PY'
import glob, re, sys

suite = sys.argv[1]
entries = []  # (uri, suites, components)
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
for path in files:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 4 and line[0] == "deb":
            entries.append((line[1], [line[2]], line[3:]))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        continue
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))

def plain(s):
    return not s.endswith(("-security", "-updates", "-backports", "-proposed-updates"))

for want_suite in (True, False):  # an entry for the suite itself, else any main archive
    for uri, suites, components in entries:
        if not uri.startswith(("http://", "https://")) or "main" not in components:
            continue
        if (suite in suites) if want_suite else any(map(plain, suites)):
            print(uri)
            sys.exit(0)
sys.exit(1)
PY
}

# ---------------------------------------------------------------------------- base image
build_base() {
    local t mirror rootfs
    t=$(now)
    if [[ $FORCE != 1 ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base: $BASE_IMAGE exists, kept ($(since "$t"))"
        return
    fi
    [[ $(id -u) == 0 ]] || die "debootstrap needs root"
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install -y debootstrap)"
    mirror=${DEBIAN_MIRROR:-$(debian_mirror)} \
        || die "no Debian mirror for $DEBIAN_SUITE in /etc/apt; set DEBIAN_MIRROR"
    rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/claudecluster-rootfs.XXXXXX")
    tmp_dirs+=("$rootfs")
    log "base: debootstrap $DEBIAN_SUITE from the machine's apt mirror"
    debootstrap --variant=minbase --components=main \
        --include=python3,python3-venv,python3-pip,git,ca-certificates \
        "$DEBIAN_SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -30 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap failed"; }
    rm -f "$rootfs.log"
    log "base: debootstrap done ($(since "$t"))"
    # No package caches or indexes, no translations, no docs but the copyright files, and no
    # host identity (Docker provides hostname, hosts and resolv.conf at run time).
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/*/LC_MESSAGES \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/debootstrap
    find "$rootfs/usr/share/doc" -mindepth 1 -not -type d -not -name copyright -delete
    : >"$rootfs/etc/resolv.conf"
    : >"$rootfs/etc/hostname"
    local old
    old=$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)
    tar -C "$rootfs" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $DEBIAN_SUITE" \
        - "$BASE_IMAGE" >/dev/null
    remove_replaced "$old" "$BASE_IMAGE"
    log "base: imported $BASE_IMAGE ($(since "$t"))"
}

# -------------------------------------------------------------------------- worker image
# pip's settings for the build: this machine's index settings (remote URLs only; local paths
# and file:// indexes do not exist in the build) and its CA bundle, into $1.
pip_build_secrets() {
    local out=$1 pip_python=""
    mkdir -p "$out"
    for py in python3 /usr/bin/python3; do
        if "$py" -m pip --version >/dev/null 2>&1; then pip_python=$py; break; fi
    done
    local config=""
    if [[ -n $pip_python ]]; then
        config=$(cd / && "$pip_python" -m pip config list 2>/dev/null || true)
    fi
    PIP_CONFIG_LIST=$config python3 - "$out" <<'PY'
import os, re, shutil, sys

out = sys.argv[1]
single, multi = {}, {"extra-index-url": [], "trusted-host": []}
env_single = {}
for line in os.environ.get("PIP_CONFIG_LIST", "").splitlines():
    m = re.match(r"^([^.]*)\.([a-z0-9_-]+)='(.*)'$", line)
    if not m:
        continue
    section, key, value = m.groups()
    if section not in (":env:", "global", "install", "download", "wheel"):
        continue
    key = {"timeout": "default-timeout", "index": "index-url"}.get(key, key)
    if key in multi:
        for item in value.split():
            if item not in multi[key]:
                multi[key].append(item)
    elif section == ":env:":
        env_single[key] = value
    else:
        single.setdefault(key, value)
single.update(env_single)  # PIP_* variables win over config files, as in pip

remote = lambda url: url.startswith(("http://", "https://"))
lines = ["[global]"]
if remote(single.get("index-url", "")):
    lines.append("index-url = " + single["index-url"])
extra = [u for u in multi["extra-index-url"] if remote(u)]
if extra:
    lines.append("extra-index-url = " + " ".join(extra))
if multi["trusted-host"]:
    lines.append("trusted-host = " + " ".join(multi["trusted-host"]))
for key in ("default-timeout", "retries", "proxy"):
    if single.get(key):
        lines.append(f"{key} = {single[key]}")

candidates = [single.get("cert"), os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
              os.environ.get("REQUESTS_CA_BUNDLE"), "/etc/ssl/certs/ca-certificates.crt",
              "/etc/pki/tls/certs/ca-bundle.crt"]
for ca in candidates:
    if ca and os.path.isfile(ca):
        shutil.copyfile(ca, os.path.join(out, "ca.crt"))
        lines.append("cert = /build-secrets/ca.crt")
        break
else:  # keep the Dockerfile's COPY and SSL_CERT_FILE valid: the image's own bundle
    shutil.copyfile("/dev/null", os.path.join(out, "ca.crt"))
with open(os.path.join(out, "pip.conf"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
PY
    # An empty ca.crt would make SSL_CERT_FILE useless: fall back to the image's bundle.
    if [[ ! -s $out/ca.crt ]]; then
        rm -f "$out/ca.crt"
        ln -s /etc/ssl/certs/ca-certificates.crt "$out/ca.crt"
    fi
}

build_worker() {
    local t ctx hash base_id current builder
    t=$(now)
    ctx=$(mktemp -d "${TMPDIR:-/tmp}/claudecluster-context.XXXXXX")
    tmp_dirs+=("$ctx")
    mkdir "$ctx/src"
    # Only what the image needs: a small context (no .git, .venv, tests, caches).
    (cd "$root" && tar -c --exclude=__pycache__ --exclude='*.py[cod]' --exclude='*.egg-info' \
        pyproject.toml README.md LICENSE NOTICE claudecluster flows tasks blocks infra) \
        | tar -x -C "$ctx/src"
    cp "$here/Dockerfile" "$ctx/Dockerfile"
    base_id=$(docker image inspect --format '{{.Id}}' "$BASE_IMAGE")
    hash=$( (cd "$ctx" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
             echo "base $base_id"; echo "extra ${EXTRA_PACKAGES:-}") | sha256sum | cut -c1-32)
    current=$(docker image inspect --format "{{ index .Config.Labels \"$HASH_LABEL\" }}" \
        "$WORKER_IMAGE" 2>/dev/null || true)
    if [[ $FORCE != 1 && $current == "$hash" ]]; then
        log "worker: $WORKER_IMAGE is up to date (sources $hash), kept ($(since "$t"))"
        return
    fi
    pip_build_secrets "$ctx/.build-secrets"

    if [[ -n ${DOCKER_BUILDKIT:-} ]]; then
        builder=$DOCKER_BUILDKIT
    elif docker buildx version >/dev/null 2>&1; then
        builder=1
    else
        builder=0
    fi
    local args=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE" --file "$ctx/Dockerfile"
                --build-arg "EXTRA_PACKAGES=${EXTRA_PACKAGES:-}")
    for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
        if [[ -n ${!var:-} ]]; then args+=(--build-arg "$var"); fi
    done
    local labels=(--label "$HASH_LABEL=$hash") revision
    if revision=$(git -C "$root" rev-parse HEAD 2>/dev/null); then
        labels+=(--label "org.opencontainers.image.revision=$revision")
    fi
    log "worker: building $WORKER_IMAGE (sources $hash, $([[ $builder == 1 ]] && echo BuildKit || echo legacy builder))"
    # The throwaway stages get tags of their own (STAGE_IMAGE:deps, :wheel; local only, never
    # push them: they hold the build secrets), so that the dependency layer stays cached and
    # the stages a rebuild replaces are deleted instead of piling up as <none> images.
    local target
    for target in deps wheel; do
        build_tagged "$STAGE_IMAGE:$target" --target "$target"
    done
    build_tagged "$WORKER_IMAGE" "${labels[@]}"
    log "worker: built $WORKER_IMAGE ($(since "$t"))"
}

# docker build "${args[@]}" EXTRA... "$ctx" --tag TAG, then delete the image TAG named before
# (if no other tag or image still needs it). Uses $builder, $args and $ctx of build_worker.
build_tagged() {
    local tag=$1 old
    shift
    old=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
    DOCKER_BUILDKIT=$builder docker build "${args[@]}" "$@" --tag "$tag" "$ctx"
    remove_replaced "$old" "$tag"
}

remove_replaced() {
    local old=$1 tag=$2
    if [[ -n $old && $old != "$(docker image inspect --format '{{.Id}}' "$tag")" ]]; then
        docker image rm "$old" >/dev/null 2>&1 || true
    fi
}

t0=$(now)
build_base
build_worker
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
    | grep -E "^(${BASE_IMAGE%%:*}|${WORKER_IMAGE%%:*}):" >&2 || true
log "images ready ($(since "$t0"))"
