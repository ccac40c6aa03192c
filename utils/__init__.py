"""Shared building blocks of the mini_qwen stages: one concern per module, none aware of which stage calls it."""
