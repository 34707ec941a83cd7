"""Files in and out: RunLog v1 (`runlog`), recorders of real runs (`recorders`, `hf`), simulated
RunLogs (`simulated`) and the saved simulator folder (`saved`)."""
