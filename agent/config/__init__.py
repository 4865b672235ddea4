"""Configuration: Cilium-compatible resource models, YAML loading and validation.

``load_dir(path)`` / ``load_files(paths)`` / ``load_documents(text, filename)`` return a
``LoadResult`` with an ``ObjectSet`` of valid objects and a list of ``ConfigError`` (file, object,
field path, what is allowed). See docs/configuration.md for every supported field.
"""

from agent.config.loader import (  # noqa: F401
    KINDS,
    ConfigError,
    LoadResult,
    ObjectSet,
    load_dir,
    load_documents,
    load_files,
    validate_document,
)
