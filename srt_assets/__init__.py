"""srt: Selective Reflection-Tuning (Li et al., 2024) as a partitioned Dagster asset pipeline."""

__version__ = "0.1.0"
