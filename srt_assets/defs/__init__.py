"""The Dagster layer, one folder per stage: module-level assets and checks, and a small
``definitions(layout)`` per stage that ``srt_assets.definitions`` merges."""
