"""The daemon: HTTP layer, build service, engine and storage."""
