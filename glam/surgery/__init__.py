"""Checkpoint surgery: commands that read a checkpoint and write a new one (never in place)."""
