"""builder: a remote container image builder daemon on the Docker Engine API."""

__version__ = "0.1.0"
