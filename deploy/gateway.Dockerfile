# The gateway (and the local viewer, same package). Non-root, pinned base.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY gateway/ gateway/
COPY viewer/ viewer/
COPY latency_common/ latency_common/
COPY frontend-snippet/snippet.js frontend-snippet/snippet.js

RUN useradd --system --uid 10001 --create-home app && mkdir -p /data && chown app /data
USER app

EXPOSE 8080
# Readiness: compose starts the load balancer once the replicas are ready; a
# replica that is stopping reports unhealthy, one whose backend is down does
# not (README "Health: liveness and readiness").
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/__gateway/ready', timeout=2)"]
CMD ["python", "-m", "gateway", "--host", "0.0.0.0"]
