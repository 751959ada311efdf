"""The agent: holds the key and mints tokens for helpers within grants."""
