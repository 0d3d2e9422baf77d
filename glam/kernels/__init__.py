"""Hand-written kernels XLA calls as custom calls, each with a portable fallback."""
