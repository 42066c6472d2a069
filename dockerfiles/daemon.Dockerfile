# Runs the builder daemon itself in a container.  Not built by the tests
# (the python base image cannot be pulled in the offline CI).
#
# Whoever reaches the daemon can run builds on the engine whose socket is mounted, which is
# root on that host: it listens on all addresses, so it needs bearer tokens and refuses to
# start without them (it is never run with --insecure).  Tokens come from a file mounted as
# a secret (`token namespace` per line):
#
#   docker build -f dockerfiles/daemon.Dockerfile -t builder-daemon .
#   docker run -d -p 8080:8080 \
#       -v /var/run/docker.sock:/var/run/docker.sock \
#       -v "$PWD/builder-tokens:/run/secrets/builder-tokens:ro" builder-daemon
#
# or from the environment instead (no file then):
#
#   docker run -d -p 8080:8080 -v /var/run/docker.sock:/var/run/docker.sock \
#       -e BUILDER_AUTH_TOKENS_FILE= -e BUILDER_AUTH_TOKENS="$TOKEN=team" builder-daemon
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BUILDER_AUTH_TOKENS_FILE=/run/secrets/builder-tokens

WORKDIR /app
COPY pyproject.toml README.md ./
COPY builder ./builder
RUN pip install .

EXPOSE 8080
# Expects the engine socket mounted at /var/run/docker.sock and the tokens (see above).
ENTRYPOINT ["builder", "serve", "--host", "0.0.0.0"]
CMD ["--port", "8080"]
