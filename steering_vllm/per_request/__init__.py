"""Many named vector sets in one engine, chosen per request: choices and configurations (``sets``), the front
end that resolves them (``frontend``), the admission of requests into the engine core, one core for ``LLM`` and
``AsyncLLM`` (``admission``), the workers' table rows (``rows``), and the engine core's last check that no request
runs with vectors it did not ask for (``guard``)."""
