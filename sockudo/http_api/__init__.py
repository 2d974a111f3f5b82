"""The REST API: the only place Flask is imported."""

from sockudo.http_api.app import create_app

__all__ = ["create_app"]
