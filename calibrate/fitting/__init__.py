"""Real runs in, a calibrated simulator out: the fit (`fit`), the calibration and its
prediction path (`calibration`), baselines, and accuracy on held-out runs (`validate`,
`metrics`)."""
