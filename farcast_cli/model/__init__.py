"""The forecaster: a sampled history of the run (history.py), training pairs by the time rule
(pairs.py), the one linear map (linear.py), its fit (fit.py), and the fitting strategies, shared or
per tensor, shrunk, on the run or on a reference run (forecaster.py). Works on samples in memory;
never reads a whole checkpoint."""
