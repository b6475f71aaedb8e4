"""The core every layer stands on: errors, the bundle and its manifest, preprocessing,
the wire protocol, decisions, the tissue gate and overlay maths. Imports nothing of the
layers above it (checked by import-linter, ``[tool.importlinter]`` in pyproject.toml)."""
