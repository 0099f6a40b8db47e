"""Serving: an OpenAI-compatible HTTP API with continuous batching and a browser chat page."""

from .app import create_app
from .engine import Engine, Request

__all__ = ["create_app", "Engine", "Request"]
