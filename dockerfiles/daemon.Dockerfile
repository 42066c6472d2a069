# Runs the builder daemon itself in a container.  Not built by the tests
# (the python base image cannot be pulled in the offline CI).
#
#   docker build -f dockerfiles/daemon.Dockerfile -t builder-daemon .
#   docker run -d -p 8080:8080 \
#       -v /var/run/docker.sock:/var/run/docker.sock builder-daemon
#
# The daemon talks to the Docker Engine through the mounted socket.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY builder ./builder
RUN pip install .

EXPOSE 8080
# Expects the engine socket mounted at /var/run/docker.sock (see above).
ENTRYPOINT ["builder", "serve", "--host", "0.0.0.0", "--insecure"]
CMD ["--port", "8080"]
