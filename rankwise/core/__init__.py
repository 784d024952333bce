"""Core machinery shared by every adapter method: registry, config/adapter bases, layer wrapper, injection, files."""
