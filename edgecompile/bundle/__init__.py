"""The bundle on disk: staging and atomic commit, shared weights, manifest, accounting, summaries."""
