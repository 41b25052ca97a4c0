"""Pictures: detections drawn on images (unknowns in magenta) and plots of a run's
numbers (energy histograms with their fits, training curves)."""
