# One image, two targets: `node` (the queue) and `watcher` (the dashboard).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv
RUN useradd --create-home --uid 10001 lionmq
COPY pyproject.toml README.md ./
COPY client ./client
COPY app ./app
COPY watcher ./watcher
RUN pip install ./client . && mkdir -p /srv/data && chown lionmq /srv/data
USER lionmq

FROM base AS node
ENV HOST=0.0.0.0 PORT=8000 STORE_URL=sqlite:////srv/data/lionmq.db
EXPOSE 8000
VOLUME ["/srv/data"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "app"]

FROM base AS watcher
ENV WATCHER_HOST=0.0.0.0 WATCHER_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WATCHER_PORT', '8080'), timeout=2)"]
CMD ["python", "-m", "watcher"]
