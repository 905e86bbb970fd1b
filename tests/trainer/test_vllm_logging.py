"""The trainer's commands keep vLLM at warnings unless asked otherwise (the README's first command must be
readable); the end-to-end run in test_rloo_e2e.py checks the output itself."""

import logging
import os

import pytest

from trainer.vllm_logging import set_vllm_log_level


def test_warnings_by_default_the_users_variable_next_and_the_option_first(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    assert set_vllm_log_level(None) == "warning" and os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    assert set_vllm_log_level(None) == "debug"
    assert set_vllm_log_level("info") == "info" and os.environ["VLLM_LOGGING_LEVEL"] == "INFO"


def test_an_already_imported_vllm_is_set_too(monkeypatch):
    import vllm  # noqa: F401

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    logger = logging.getLogger("vllm")
    monkeypatch.setattr(logger, "level", logger.level)
    set_vllm_log_level("error")
    assert logger.getEffectiveLevel() == logging.ERROR


def test_a_bad_level_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="vLLM log level 'loud': expected one of debug, info, warning, error"):
        set_vllm_log_level(None)
