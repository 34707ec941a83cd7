"""Real runs in, a calibrated simulator out: the fit (`fit`), the calibration and its one
prediction path (`calibration`), its RunLog edge (`runs`), the saved folder (`saved`),
baselines, and accuracy on held-out runs (`validate`, `metrics`)."""
