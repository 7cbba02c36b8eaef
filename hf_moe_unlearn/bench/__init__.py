"""The built-in MoE unlearning benchmark: generated data, a tiny pre-trained MoE and its retrained reference."""
