"""Changing what a running engine serves: hot-swap from Python (``hot_swap``), the worker side of it
(``worker``) and the HTTP routes of ``vllm serve`` (``endpoint``)."""
