# One image for both pipelines: `gateway serve` (default) and `gateway tag-sync`.
# Config is a mounted file (GATEWAY_CONFIG); secrets come from the environment.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home gateway
COPY --from=build /install /usr/local
COPY config/gateway.example.toml /etc/gateway/gateway.example.toml
ENV GATEWAY_CONFIG=/etc/gateway/gateway.toml \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080 9102
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
ENTRYPOINT ["gateway"]
CMD ["serve"]
