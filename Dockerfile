# dormant's image: workers, beat, Flower and the `dormant` CLI (see docker-compose.yml).
# Built FROM the public debian:bookworm-slim with Debian's own Python 3.11; where no registry
# is reachable, scripts/base-images.sh makes a labelled stand-in of that name from Debian
# packages. libvirt-python compiles against libvirt-dev in the build stage; the runtime stage
# keeps only the libvirt client library and runs as an unprivileged user.
FROM debian:bookworm-slim AS build
# A package index reached through a TLS-inspecting proxy: its CA certificates as PEM text,
# e.g. --build-arg BUILD_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)". Trusted by
# this build stage only; the runtime image below never contains them.
ARG BUILD_CA_CERTS=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
      pkg-config libvirt-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && if [ -n "$BUILD_CA_CERTS" ]; then \
      printf '%s\n' "$BUILD_CA_CERTS" >/usr/local/share/ca-certificates/build.crt \
      && update-ca-certificates >/dev/null; fi
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/dormant \
 && /opt/dormant/bin/pip install --no-cache-dir --upgrade pip
WORKDIR /src
# The dependencies first, in their own layer: a change to the code alone reuses it.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /opt/dormant/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md celeryconfig.py ./
COPY worker ./worker
COPY tasks ./tasks
RUN /opt/dormant/bin/pip install --no-cache-dir --no-deps . \
 && /opt/dormant/bin/python -c 'import libvirt, celery, flower, tasks, worker.cli, worker.reclaim.run_store'

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libvirt0 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/dormant dormant \
 && mkdir -p /var/lib/dormant/beat && chown dormant:dormant /var/lib/dormant/beat
COPY --from=build /opt/dormant /opt/dormant
ENV PATH=/opt/dormant/bin:$PATH \
    PYTHONUNBUFFERED=1
USER dormant
WORKDIR /var/lib/dormant
CMD ["celery", "-A", "tasks", "worker", "--pool", "threads", "-l", "info"]
