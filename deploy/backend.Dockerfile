# The example backend under gunicorn (and the demo frontend, same Flask).
# Non-root, pinned base.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY latency_common/ latency_common/
COPY backend/ backend/
COPY frontend-snippet/demo/ frontend-snippet/demo/

RUN useradd --system --uid 10001 --no-create-home app
USER app

EXPOSE 4567
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:4567/api/health', timeout=2)"]
CMD ["gunicorn", "-c", "backend/gunicorn_conf.py", "backend.wsgi:app"]
