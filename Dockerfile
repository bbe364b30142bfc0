# One image for the gateway and the backend (the same pinned requirements);
# docker-compose.yml picks the command. Non-root, pinned base.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY gateway/ gateway/
COPY backend/ backend/

RUN useradd --system --uid 10001 --no-create-home app
USER app

EXPOSE 8080 4567
CMD ["python", "-m", "gateway", "--host", "0.0.0.0"]
