"""Which file names PUT /v1/steering may load: only files inside --steering-dir, whatever the name says."""

import os

import pytest

from steering_vllm.serve.endpoint import HTTPProblem, resolve_inside


@pytest.fixture
def layout(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "a.safetensors").write_bytes(b"x")
    (allowed / "sub" / "b.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "secret.safetensors", allowed / "link-out.safetensors")
    os.symlink(allowed / "a.safetensors", allowed / "link-in.safetensors")
    os.symlink(tmp_path, allowed / "dir-out")
    return allowed.resolve()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.safetensors", "a.safetensors"),
        ("sub/b.safetensors", "sub/b.safetensors"),
        ("./a.safetensors", "a.safetensors"),
        ("link-in.safetensors", "a.safetensors"),
    ],
)
def test_names_inside_the_directory_resolve(layout, name, expected):
    assert resolve_inside(layout, name) == layout / expected


@pytest.mark.parametrize(
    "name, status, message",
    [
        ("../secret.safetensors", 403, "give a relative name"),
        ("sub/../../secret.safetensors", 403, "give a relative name"),
        ("/etc/passwd", 403, "give a relative name"),
        ("", 403, "give a relative name"),
        ("sub\\..\\..\\secret.safetensors", 403, "give a relative name"),
        ("link-out.safetensors", 403, "resolves outside the steering directory"),
        ("dir-out/secret.safetensors", 403, "resolves outside the steering directory"),
        ("missing.safetensors", 404, "no such file"),
    ],
)
def test_names_that_leave_the_directory_or_miss_are_refused(layout, name, status, message):
    with pytest.raises(HTTPProblem, match=message) as error:
        resolve_inside(layout, name)
    assert error.value.status == status
