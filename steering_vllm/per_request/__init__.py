"""Many named vector sets in one engine, chosen per request: choices and configurations (``sets``), the front
end that resolves them and admits requests (``frontend``), the workers' table rows (``rows``), and the engine
core's last check that no request runs with vectors it did not ask for (``guard``)."""
