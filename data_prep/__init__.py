"""Builders of webdataset shards (plus manifest.json) from raw sources."""
