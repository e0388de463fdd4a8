"""The Dagster layer, one folder per stage: module-level assets and checks, and a small
``definitions(layout)`` per stage that ``srt_assets.definitions`` merges."""

import warnings

# Partitioned asset checks (preview) and observable source assets (beta) in Dagster 1.13: srt relies on
# both on purpose, so their notices would only be noise in every log.
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")
warnings.filterwarnings("ignore", message=".*observable_source_asset.* is currently in beta.*")
warnings.filterwarnings("ignore", message=".*DataVersionsByPartition.* is currently in beta.*")
