"""Files in and out: RunLog v1 (`runlog`), the recorders of real runs (`recorders`, `hf`),
and the raw surrogate on the batches of given runs (`simulated`). Nothing here knows the
calibrated simulator; its folder and its RunLog edge are `calibrate.fitting`'s."""
