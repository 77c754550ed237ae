"""flower-privacy: private federated learning on Flower.

``flower_privacy.make_private(strategy, config)`` on the server and
``ClientApp(mods=flower_privacy.client_mods())`` on clients; see :mod:`flower_privacy.private`.
Imported lazily, so that ``import flower_privacy.mods`` stays light in ClientApp processes.
"""

_PUBLIC = ("PrivacyConfig", "client_mods", "config_snippet", "make_private")
__all__ = list(_PUBLIC)


def __getattr__(name: str):  # noqa: ANN202
    if name in _PUBLIC:
        from flower_privacy import private

        return getattr(private, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
