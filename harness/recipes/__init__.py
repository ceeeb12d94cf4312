"""Strategies that drive libraries: one module per library (torchao, torch-optimi, bitsandbytes) and
torch.compile. Each is checked against the harness's own exact emulation of the same recipe
(:mod:`harness.core`), which stays the oracle. This package imports only :mod:`harness.core`; a module
here is imported only by a run whose strategy names its library (see :mod:`harness.core.libraries`)."""
