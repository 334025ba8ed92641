# One image for both pipelines: `gateway serve` (the default) and `gateway tag-sync`, plus the
# operator commands (check-config, ranges, replay).
#   docker build -t onesignal-kafka-gateway .
#   docker run -v $PWD/gateway.toml:/etc/gateway/gateway.toml:ro \
#     -e GATEWAY_EVENT_STREAM_SECRETS=... -p 8080:8080 onesignal-kafka-gateway
# Config is a mounted file (GATEWAY_CONFIG); every secret comes from the environment.

# --- build: a wheel's worth of site-packages under /install, no compilers in the final image
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --prefix=/install .

# --- runtime
FROM python:3.11-slim
LABEL org.opencontainers.image.title="onesignal-kafka-gateway" \
      org.opencontainers.image.description="OneSignal webhooks and Event Streams into Kafka; derived tags back to users" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent gateway \
 && mkdir -p /etc/gateway /var/lib/gateway \
 && chown 10001:0 /var/lib/gateway && chmod 0775 /var/lib/gateway
COPY --from=build /install /usr/local
COPY config/gateway.example.toml /etc/gateway/gateway.example.toml
# /etc/gateway/gateway.toml: mount your config here (read-only is fine).
# /var/lib/gateway: writable by the gateway user, e.g. for `ranges update --snapshot` files.
# GATEWAY_HEALTHCHECK_URL: what the HEALTHCHECK polls; the ingress answers /healthz on
# server.port, the tag-sync worker serves /metrics on tag_sync.metrics_port (set
# GATEWAY_HEALTHCHECK_URL=http://127.0.0.1:9102/metrics for it).
ENV GATEWAY_CONFIG=/etc/gateway/gateway.toml \
    GATEWAY_HEALTHCHECK_URL=http://127.0.0.1:8080/healthz \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/gateway
USER 10001:0
# 8080: server.port (webhooks, /healthz, /readyz); 9101: server.metrics_port (/metrics,
# /openapi.json; set server.metrics_host = "0.0.0.0" to scrape it from outside the container);
# 9102: tag_sync.metrics_port (likewise tag_sync.metrics_host)
EXPOSE 8080 9101 9102
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATEWAY_HEALTHCHECK_URL'], timeout=2)"]
# SIGTERM (docker stop) drains: in-flight requests wait for their Kafka acks, tag sync commits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
