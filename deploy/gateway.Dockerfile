# syntax=docker/dockerfile:1
# The gateway and the local viewer (one wheel, two console scripts), installed
# from the wheel with only the runtime dependencies they import: no Flask,
# gunicorn or the example backend. Non-root, pinned base. Needs BuildKit (the
# default builder of docker and docker compose) for the bind mounts.

# Stage 1: build the wheel from the source (the browser snippet goes inside it).
FROM python:3.11.7-slim-bookworm AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The same pin as requirements-dev.txt.
RUN pip install "build==1.6.1"
WORKDIR /src
COPY pyproject.toml README.md CHANGELOG.md LICENSE ./
COPY gateway/ gateway/
COPY viewer/ viewer/
COPY latency_common/ latency_common/
COPY frontend-snippet/snippet.js frontend-snippet/snippet.js
RUN python -m build --wheel --outdir /dist

# Stage 2: the image: the wheel installed with requirements.txt as constraints,
# so its dependencies are the versions CI tested, and nothing else.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    pip install -c /tmp/requirements.txt /dist/latency_gateway-*.whl

RUN useradd --system --uid 10001 --create-home app && mkdir -p /data && chown app /data
USER app
WORKDIR /home/app

EXPOSE 8080
# Readiness: compose starts the load balancer once the replicas are ready; a
# replica that is stopping reports unhealthy, one whose backend is down does
# not (README "Health: liveness and readiness").
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/__gateway/ready', timeout=2)"]
CMD ["latency-gateway", "--host", "0.0.0.0"]
