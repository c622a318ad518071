# clawrouter in a container: non-root, data on a volume, listening on all interfaces inside the
# container — which is why it refuses to start without CLAWROUTER_API_KEY. It never falls back to
# the built-in sandbox (a network not ready at boot would otherwise make it hand out placeholder
# images for good); `-e CLAWROUTER_SANDBOX=true` asks for one.
#   docker build -t clawrouter .
#   docker run -p 127.0.0.1:8402:8402 -v clawrouter:/data -e CLAWROUTER_API_KEY=… clawrouter
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLAWROUTER_HOME=/data \
    CLAWROUTER_HOST=0.0.0.0 \
    CLAWROUTER_PORT=8402 \
    CLAWROUTER_SANDBOX=false \
    CLAWROUTER_SHUTDOWN_GRACE_SECONDS=4
# `docker stop` kills 10 s after its SIGTERM: 4 s for the requests under way, and the rest for
# those cut off to be answered and the ledger closed. With `docker stop -t 40` (compose:
# `stop_grace_period: 40s`), pass -e CLAWROUTER_SHUTDOWN_GRACE_SECONDS=30 for paid images that
# take longer.

WORKDIR /app
COPY pyproject.toml README.md LICENSE config.example.toml ./
COPY clawrouter ./clawrouter
RUN pip install --no-compile . \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin clawrouter \
 && mkdir -p /data && chown clawrouter /data && chmod 700 /data

USER clawrouter
VOLUME ["/data"]
EXPOSE 8402
# Asks where `serve` listens by the same settings (CLAWROUTER_PORT, /data/config.toml), so a
# changed port stays healthy.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; from clawrouter.config import load_settings; sys.exit(0 if urllib.request.urlopen(load_settings().url + '/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["clawrouter", "serve"]
