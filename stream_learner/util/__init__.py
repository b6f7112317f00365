"""Small helpers every stage shares: stoppable back-off, atomic file writes, sample statistics."""
