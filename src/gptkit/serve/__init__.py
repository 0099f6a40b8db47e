"""Serving: an OpenAI-compatible HTTP API over the decoding engine, metrics, and a browser chat page."""

from .app import create_app, run_server
from .runner import Runner

__all__ = ["create_app", "run_server", "Runner"]
