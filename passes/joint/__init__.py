"""Passes over AOTAutograd's joint forward-backward graph, before the partitioner."""
