"""Reading and writing checkpoints, and nothing about forecasting: find a run on disk (run.py), read
safetensors headers and byte ranges (reader.py), stream chunks of tensors to the compute device
(engine.py), write safetensors files chunk by chunk (writer.py) and whole output folders atomically
(output.py); device.py resolves --device and --max-memory."""
