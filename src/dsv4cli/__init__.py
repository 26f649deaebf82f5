"""dsv4: a local runner for DeepSeek-V4 (Flash and Pro) on one machine."""

__version__ = "0.1.0"
