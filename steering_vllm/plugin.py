"""The ``vllm.general_plugins`` entry point: vLLM calls ``register()`` in every process it starts."""

from steering_vllm.engine.families import ARCHITECTURES


def register() -> None:
    from vllm import ModelRegistry

    from steering_vllm import engine_args
    from steering_vllm.per_request import guard as engine_guard

    for architecture, model_class in ARCHITECTURES.items():
        # A "module:Class" string keeps the model module (and torch ops) unimported until a model is built.
        ModelRegistry.register_model(architecture, model_class)
    engine_args.install()
    engine_guard.install()
