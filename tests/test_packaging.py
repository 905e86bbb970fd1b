"""The install itself: our top-level `kernels` package next to transformers, and the command line."""

import subprocess
import sys


def test_transformers_does_not_take_our_kernels_for_hugging_face_kernels():
    """transformers probes for HF's `kernels` package by name; ours must read as absent."""
    script = (
        "import kernels, torch\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert kernels.fused_add_steer_rms_norm is not None\n"
        "assert not is_kernels_available(), 'transformers thinks HF kernels is installed'\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,\n"
        "                  num_attention_heads=1, num_key_value_heads=1, head_dim=64)\n"
        "logits = Qwen2ForCausalLM(cfg)(torch.randint(0, 96, (1, 9))).logits\n"
        "assert logits.shape == (1, 9, 96) and torch.isfinite(logits).all()\n"
        "print('OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_the_command_lines_help_names_vllms_commands_and_ours():
    result = subprocess.run([sys.executable, "-m", "steering_vllm", "--help"], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steering-vllm convert IN OUT" in result.stdout and "steering-vllm inspect FILE" in result.stdout
    assert "serve" in result.stdout  # vLLM's own help follows
