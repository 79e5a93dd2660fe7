"""How good a forecast is: weight error against held-out checkpoints (backtest.py), the user's own
loss (loss.py), the typed report and its verdict (report.py), and the report printed (render.py)."""
