"""Meshes, logical axis rules, sharded train state and batches, multi-process launch."""
