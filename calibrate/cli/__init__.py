"""The `surrogate` command line (`main`) and its demo on the bundled real runs (`demo`)."""
