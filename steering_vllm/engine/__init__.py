"""The steered model inside vLLM: which families are steered (``families``), the one mechanism that steers
them (``models``), the steered norms (``norm``) and the scale-out modes they can be served in (``scale_out``)."""
