#!/usr/bin/env bash
# Creates the secret files compose.yaml mounts (./secrets/<name>, gitignored): random values,
# without a trailing newline, for every one that does not exist yet (existing ones are kept:
# Postgres and MinIO only read theirs when their volume is first initialised).
#
# The directory is 0700 (only you); the files are 0644 because compose (outside Swarm)
# bind-mounts them with their host mode, and the containers read them as their own users
# (gpumarket 10001, grafana 472).
set -euo pipefail
dir="${1:-$(dirname "$0")/../secrets}"
names=(gpumarket_internal_token gpumarket_database_password gpumarket_s3_access_key
       gpumarket_s3_secret_key grafana_admin_password)

mkdir -p "$dir"
chmod 0700 "$dir"
for name in "${names[@]}"; do
  file="$dir/$name"
  [ -e "$file" ] && continue
  # 24 random bytes as hex: no character needs quoting in a URL, a shell or a config file.
  head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$file"
  chmod 0644 "$file"
  echo "created $file"
done
