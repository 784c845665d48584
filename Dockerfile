# callmon: one image for every role (monitor, agent, reflector, probe, token); the
# compose file (docker-compose.yml) picks the role with the command, e.g.
#   docker run --rm callmon monitor --config /etc/callmon/monitor.yaml
# Every dependency installs from binary wheels (PyAV bundles its FFmpeg), so the image
# needs no compiler and no system libraries beyond python:3.11-slim.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The package sources only (see .dockerignore): no tests, benchmarks, tokens or data.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY callmon ./callmon
COPY probes ./probes
COPY reflector ./reflector
COPY monitor ./monitor

# A regular (not editable) install; the wheel carries the shipped rules and the web UI
# (package data). Then check that the installed package finds them and that the probe
# stack imports, so a broken image fails its build, not its first start.
RUN pip install /src \
 && cd / && rm -rf /src \
 && python -c 'from monitor.config import parse_config; from monitor.app import WEB; parse_config({}); assert (WEB / "index.html").is_file(), WEB' \
 && python -c 'import probes.agent, reflector.app' \
 && callmon --version

# Unprivileged; its home holds the monitor's database or an agent's spool (a volume).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/callmon --create-home \
      --shell /usr/sbin/nologin callmon
USER callmon
WORKDIR /var/lib/callmon

# reflector (WHIP; media on ephemeral UDP ports), monitor, agent /metrics
EXPOSE 8089 8090 9101

ENTRYPOINT ["callmon"]
CMD ["--help"]
