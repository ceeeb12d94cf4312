"""The Tensor-Core probes, the model of a Tensor-Core unit, and the device profile."""
