"""The app store: looks apps up by id and by key."""

from __future__ import annotations

from collections.abc import Iterable

from sockudo.config import AppConfig


class AppStore:
    """Apps from configuration, held in memory (Sockudo's ``memory`` app manager)."""

    def __init__(self, apps: Iterable[AppConfig]) -> None:
        self._by_id = {app.id: app for app in apps}
        self._by_key = {app.key: app for app in self._by_id.values()}

    def by_id(self, app_id: str) -> AppConfig | None:
        return self._by_id.get(app_id)

    def by_key(self, key: str) -> AppConfig | None:
        return self._by_key.get(key)

    def all(self) -> list[AppConfig]:
        return list(self._by_id.values())
