"""Post-training quantization (Q-TinySAM): fake-quantized models, the scale search,
quantized checkpoints and int8 ONNX export. Needs torch."""
