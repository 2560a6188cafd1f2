#!/bin/sh
# One-shot MinIO setup for docker-compose.yml (service minio-init, image minio/mc). Safe to run again:
#   1. the media bucket (uploads) and the omniq bucket (results and work files);
#   2. omniq's own MinIO user, allowed to read the media bucket and to read and write the omniq bucket;
#   3. the webhook target notify_webhook:omniq -> `omniq webhook`, with its bearer token and a queue
#      directory, so events wait on disk while the webhook is down; MinIO restarts only when it asks to;
#   4. the event that posts every object created in the media bucket to that target.
set -eu

: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MINIO_OMNIQ_USER:?}" "${MINIO_OMNIQ_PASSWORD:?}"
: "${OMNIQ_WEBHOOK_TOKEN:?}"
MINIO_URL=${MINIO_URL:-http://minio:9000}
MEDIA_BUCKET=${MEDIA_BUCKET:-media}
RESULTS_BUCKET=${RESULTS_BUCKET:-omniq}
WEBHOOK_ENDPOINT=${WEBHOOK_ENDPOINT:-http://webhook:8080/minio/events}
TARGET=omniq                       # notify_webhook:<TARGET>, and the target id in the ARN below
ARN="arn:minio:sqs::$TARGET:webhook"
POLICY=omniq-buckets
ALIAS=omniq

log() { echo "minio-init: $*"; }

wait_ready() {  # `mc ready` fails at once while the server is down (it is, for a moment, after a restart)
    tries=0
    until mc ready "$ALIAS" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -ge 60 ]; then
            log "MinIO at $MINIO_URL is not ready after 60 s"
            return 1
        fi
        sleep 1
    done
}

mc alias set "$ALIAS" "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
wait_ready

mc mb --ignore-existing "$ALIAS/$MEDIA_BUCKET" "$ALIAS/$RESULTS_BUCKET"

policy_file="${TMPDIR:-/tmp}/omniq-policy.json"
cat >"$policy_file" <<EOF
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::$MEDIA_BUCKET", "arn:aws:s3:::$RESULTS_BUCKET"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject"],
      "Resource": ["arn:aws:s3:::$MEDIA_BUCKET/*"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                 "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::$RESULTS_BUCKET/*"]
    }
  ]
}
EOF
mc admin policy create "$ALIAS" "$POLICY" "$policy_file" >/dev/null
rm -f "$policy_file"
mc admin user add "$ALIAS" "$MINIO_OMNIQ_USER" "$MINIO_OMNIQ_PASSWORD" >/dev/null  # sets the secret again
if ! attached=$(mc admin policy attach "$ALIAS" "$POLICY" --user "$MINIO_OMNIQ_USER" 2>&1); then
    case "$attached" in
        *"already in effect"*) ;;  # attached on an earlier run
        *) log "attaching policy $POLICY to $MINIO_OMNIQ_USER failed: $attached"; exit 1 ;;
    esac
fi
log "buckets $MEDIA_BUCKET and $RESULTS_BUCKET, user $MINIO_OMNIQ_USER with policy $POLICY"

# MinIO sends `Authorization: Bearer <auth_token>`; omniq webhook refuses anything else.
applied=$(mc admin config set "$ALIAS" "notify_webhook:$TARGET" endpoint="$WEBHOOK_ENDPOINT" \
    auth_token="$OMNIQ_WEBHOOK_TOKEN" queue_dir=/events queue_limit=100000)
case "$applied" in
    *"restart"*)
        log "restarting MinIO to load the webhook target"
        mc admin service restart "$ALIAS" >/dev/null
        sleep 2
        wait_ready
        ;;
esac

mc event add "$ALIAS/$MEDIA_BUCKET" "$ARN" --event put --ignore-existing >/dev/null
log "uploads to $MEDIA_BUCKET are posted to $WEBHOOK_ENDPOINT ($ARN)"
