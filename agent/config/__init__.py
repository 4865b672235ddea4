"""Configuration: Cilium-compatible resource models, YAML loading and validation.

``load_dir(path)`` / ``load_files(paths)`` / ``load_documents(text, filename)`` return a
``LoadResult`` with an ``ObjectSet`` of valid objects and a list of ``ConfigError`` (file, object,
field path, what is allowed). See docs/configuration.md for every supported field.
"""

# Loaded on first use (PEP 562): the models cost ~0.3 s of imports, and `vipd run` starts its
# configuration parser process (agent.config.worker) before paying them.
_LOADER_NAMES = frozenset({"KINDS", "ConfigError", "LoadResult", "ObjectSet", "load_dir",
                           "load_documents", "load_files", "validate_document"})
__all__ = sorted(_LOADER_NAMES)


def __getattr__(name: str):
    import importlib

    if name in _LOADER_NAMES:
        return getattr(importlib.import_module("agent.config.loader"), name)
    try:
        return importlib.import_module(f"agent.config.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'agent.config' has no attribute {name!r}") from None
