"""The distributed layer: Ray Train workers, the pseudo-label stream, collectives, placement."""
