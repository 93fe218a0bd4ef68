# dormant's image: workers, beat, Flower and the `dormant` CLI (see docker-compose.yml).
# libvirt-python compiles against libvirt-dev in the build stage; the runtime stage keeps only
# the libvirt client library and runs as an unprivileged user.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libvirt-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md celeryconfig.py ./
COPY worker ./worker
COPY tasks ./tasks
RUN python -m venv /opt/dormant \
 && /opt/dormant/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/dormant/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/dormant dormant \
 && mkdir -p /var/lib/dormant/beat && chown dormant:dormant /var/lib/dormant/beat
COPY --from=build /opt/dormant /opt/dormant
ENV PATH=/opt/dormant/bin:$PATH \
    PYTHONUNBUFFERED=1
USER dormant
WORKDIR /var/lib/dormant
CMD ["celery", "-A", "tasks", "worker", "--pool", "threads", "-l", "info"]
