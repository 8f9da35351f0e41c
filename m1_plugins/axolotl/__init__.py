"""Axolotl integration: `plugins: [m1_plugins.axolotl.M1Plugin]` (see README.md beside this file)."""

from .args import M1Args, M1TrainingArgsMixin
from .plugin import M1Plugin

__all__ = ["M1Args", "M1Plugin", "M1TrainingArgsMixin"]
