"""The front door and the docs site: the README stays short and its links resolve, the generated pages match
the code they come from, and the site builds with ``mkdocs build --strict`` (a broken link, a missing anchor or
a page left out of the nav fails)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_the_readme_is_a_front_door_with_the_two_commands_first():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    first_screen = "\n".join(text.splitlines()[:50])
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in first_screen, "the README's test command is the one CI runs, in its first screenful"
    assert "python -m trainer.rloo --config configs/toy.yaml" in first_screen


def test_every_relative_link_in_the_readme_resolves():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    relative = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert relative, "the README links into docs/"
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_the_generated_pages_match_the_code():
    result = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_a_marker_that_does_not_parse_is_refused_not_left_as_typed():
    import pytest

    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_docs import with_results

    good = "<!-- value:hot_swap_cpu:0:idle_llm_ms:.0f -->1<!-- /value --> ms"
    assert with_results(good) != good  # refilled from the file
    # a space in a value's format; a results block without its closing marker
    for bad in ("<!-- value:hot_swap_cpu:0:idle_llm_ms:.0f} ms -->1<!-- /value -->", "<!-- results:hot_swap_cpu -->\n"):
        with pytest.raises(ValueError, match="do not parse"):
            with_results(bad)


def test_a_gpu_table_not_yet_measured_says_so_and_any_other_missing_table_is_an_error():
    import pytest

    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_docs import with_results

    page = with_results("<!-- results:never_run_gpu -->\nold\n<!-- /results:never_run_gpu -->")
    assert "Not measured yet" in page and "old" not in page
    with pytest.raises(FileNotFoundError):
        with_results("<!-- results:never_run_cpu -->\n<!-- /results:never_run_cpu -->")


def test_every_training_option_is_on_the_options_page():
    import dataclasses

    from trainer.config import TrainConfig

    page = (ROOT / "docs" / "training-config.md").read_text()
    assert all(f"| `{f.name}` |" in page for f in dataclasses.fields(TrainConfig))


def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1",
                                                                            "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "training-config" / "index.html").exists()
