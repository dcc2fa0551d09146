"""Training and ONNX export of the demo models. torch is imported here and nowhere else."""
