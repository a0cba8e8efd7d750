"""The quality evaluation harness (filled in below)."""
