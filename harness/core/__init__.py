"""Values: number formats, strategies and their grammar, loss scalers, FP8 and emulated GEMMs, a strategy executed on a device, the scenario type and registry, and the isolation of one run."""
