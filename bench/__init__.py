"""The llmhop benchmark: direct vs nginx vs llmhop, pinned, bounded, one command (bench/run)."""
