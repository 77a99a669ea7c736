#!/usr/bin/env sh
# Writes deploy/compose/.env (mode 0600) with fresh secrets for the compose deployment,
# and the metrics token Prometheus reads. Refuses to overwrite an existing .env: the
# key-encryption key in it seals identity's signing keys, and a new one would make
# them unreadable.
set -eu
cd "$(dirname "$0")"
if [ -e .env ]; then
  echo ".env exists; keeping it (delete it only together with every volume)" >&2
  exit 1
fi
rand() { head -c "$1" /dev/urandom | base64 | tr -d '\n/+=' | cut -c1-"$2"; }
umask 077
metrics=$(rand 32 40)
cat > .env <<ENV
POSTGRES_PASSWORD=$(rand 32 32)
S3_ACCESS_KEY_ID=echo$(rand 16 12)
S3_SECRET_ACCESS_KEY=$(rand 32 40)
METRICS_TOKEN=$metrics
GRAFANA_ADMIN_PASSWORD=$(rand 24 24)
ECHO_IDENTITY_KEK=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
# SMTP_URL=smtp://mail.example.org:587   # reset mails; without it they go to identity's outbox volume
ENV
# Prometheus runs as another user: this file only grants reading /metrics.
umask 022
printf '%s' "$metrics" > metrics_token
echo "wrote $(pwd)/.env and metrics_token"
