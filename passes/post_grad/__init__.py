"""Passes over Inductor's post-grad graphs (forward and backward, after partitioning)."""
