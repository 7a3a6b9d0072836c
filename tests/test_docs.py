"""The README and docs/ stay inside the repository and in step with the code."""

import os
import re
import tomllib

from tokenizers_jax.training.workdir import RESUMABLE_FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + [os.path.join("docs", name) for name in
                         sorted(os.listdir(os.path.join(ROOT, "docs")))]


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_links_and_paths_point_inside_the_repository():
    for page in PAGES:
        text = _read(page)
        assert "shared/" not in text and "/work/" not in text, page
        base = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
            if not re.match(r"[a-z]+://", target):
                assert os.path.exists(os.path.join(base, target)), (page, target)
        for path in re.findall(r"`((?:tokenizers_jax|tests|configs|docs)/[\w/.]+\.(?:py|md))`",
                               text):
            assert os.path.exists(os.path.join(ROOT, path)), (page, path)
    assert "[docs/faithfulness.md](docs/faithfulness.md)" in _read("README.md")


def test_readme_documents_resume_errors_and_the_tensorboard_extra():
    readme = _read("README.md")
    assert "\n## Resume\n" in readme and "\n## Errors\n" in readme
    for field in RESUMABLE_FIELDS:
        assert f"`{field}`" in readme, field
    assert '.[tensorboard]"' in readme and "--exit_code_on_preemption" in readme
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(req.startswith("tensorboard>=") for req in extras["tensorboard"])
